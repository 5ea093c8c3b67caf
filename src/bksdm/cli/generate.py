"""``bksdm generate`` and ``bksdm coco-prompts``: a prompt set to a folder of images, the paper's way but faster.

``bksdm generate`` loads a stock diffusers pipeline (optionally with a student U-Net swapped in), gives prompt
``i`` the seed ``prompt_seed(seed, i)`` and generates in batches (:func:`bksdm.eval.generate.generate_images`), so an
image depends on its prompt, its index and the settings, never on the batch size or on how many processes share
the work. Launched with ``accelerate launch``, each process takes every N-th missing image.

The output folder::

    OUT/settings.json    what determines the images (model, U-Net, scheduler, steps, guidance, size, dtype,
                         seed, resize, ...), the versions, and one entry per run (processes, batch size, device)
    OUT/manifest.jsonl   one line per prompt: index, prompt, seed, file, plus the prompt file's other fields
                         (e.g. a COCO image_id)
    OUT/000000.png ...   one image per prompt, named by index

Every image is written under a hidden partial name and renamed (:func:`bksdm.artifacts.atomic_file`), so a killed
run or a full disk leaves only whole images; running the same command again skips them and makes the rest (an
image that is there but does not read, e.g. truncated by an older version, is drawn again and logged). A
folder made with other settings is refused (mixing them would corrupt an evaluation); a longer prompt file that
starts with the same prompts extends a folder.

Every option is checked before any work (:mod:`bksdm.sampling`): sizes, steps, guidance and batch size, and the
memory a call needs at that size and batch against what the device has free once the model is loaded.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bksdm import __version__
from bksdm.artifacts import (
    MANIFEST_FILE,
    PARTIAL_SUFFIX,
    SETTINGS_FILE,
    WriteFailed,
    atomic_file,
    describe_failure,
    write_text,
)
from bksdm.eval.prompts import PromptFileError, PromptRecord

__all__ = [
    "GenerateError",
    "GenerationSettings",
    "add_coco_prompts",
    "add_generate",
    "image_name",
    "run_coco_prompts",
    "run_generate",
]

logger = logging.getLogger(__name__)

_RESERVED = ("index", "prompt", "seed", "file")


class GenerateError(ValueError):
    """A user error of ``bksdm generate`` (the message says what is wrong and how to fix it)."""


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides what the images look like (compared when a run resumes)."""

    model: str
    unet: str | None
    scheduler: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None
    dtype: str
    seed: int
    resize: int | None
    safety_checker: bool


def add_generate(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` sub-command to the ``bksdm`` parser."""
    p = sub.add_parser(
        "generate",
        help="generate one image per prompt of a prompt file (seeded per prompt, resumable, multi-GPU)",
        description="Generate one image per prompt with a stock diffusers pipeline. Prompt i gets the seed "
        "prompt_seed(--seed, i), so images do not depend on --batch-size or on the number of processes. Run it "
        "again to resume (finished images are skipped). Multi-GPU: accelerate launch --multi_gpu --num_processes "
        "N -m bksdm.cli generate ...",
    )
    p.add_argument(
        "--model", default=None, help="diffusers pipeline folder or hub id (default: the bundled shapes teacher)"
    )
    p.add_argument(
        "--unet",
        default=None,
        help="use this U-Net instead of the model's: a student pipeline folder (with unet/), a U-Net folder "
        "(with config.json) or a hub id whose unet/ to load",
    )
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line), .json, .jsonl or .csv")
    p.add_argument("--out", required=True, help="output folder (resumed when it holds a run with the same settings)")
    p.add_argument(
        "--scheduler",
        default=None,
        help="scheduler class name, e.g. PNDMScheduler (the paper's), DPMSolverMultistepScheduler, "
        "EulerDiscreteScheduler (default: the model's own)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the model's recorded setting, as the shapes teachers have, else 25 as in "
        "the paper)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale, 1 (or 0) for none, else above 1 (default: the model's recorded "
        "setting, as the shapes teachers have, else 7.5 as in the paper)",
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height, a multiple of the VAE's factor (8 for SD) (default: the model's native size); a size "
        "whose estimated memory exceeds what is free is refused before any work",
    )
    p.add_argument("--width", type=int, default=None, help="image width, as --height (default: the native size)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses prompt_seed(seed, i) (default 0)")
    p.add_argument(
        "--resize", type=int, default=None, help="resize every image to SIZE x SIZE before saving (paper: 256)"
    )
    p.add_argument(
        "--no-safety-checker",
        action="store_true",
        help="turn off the pipeline's NSFW filter, as the paper's evaluation did (it blacks out images)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: accelerate's, CUDA if available)")
    p.set_defaults(func=run_generate)


def add_coco_prompts(sub: argparse._SubParsersAction) -> None:
    """Add the ``coco-prompts`` sub-command to the ``bksdm`` parser."""
    from bksdm.eval.coco import COCO_30K

    p = sub.add_parser(
        "coco-prompts",
        help="build the MS-COCO 30K prompt file (one caption per image, chosen by seed) from captions_val2014.json",
        description="Pick --count images of a COCO captions file and one caption for each, reproducibly by --seed "
        "(a smaller count gives a prefix of a larger one). Writes image_id, file_name, caption and annotation_id "
        "per prompt, so generated images can be matched with the real ones.",
    )
    p.add_argument("--captions", required=True, help="COCO captions annotations, e.g. captions_val2014.json")
    p.add_argument("--out", required=True, help="prompt file to write: .jsonl or .csv")
    p.add_argument(
        "--count", default=str(COCO_30K), help=f"images to pick, or 'all' (default {COCO_30K}, the paper's 30K)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of images and captions (default 0)")
    p.set_defaults(func=run_coco_prompts)


def run_coco_prompts(args: argparse.Namespace) -> int:
    """Handle ``bksdm coco-prompts``."""
    from bksdm.eval.coco import load_coco_captions, select_captions, write_prompt_file

    if args.count == "all":
        count = None
    else:
        try:
            count = int(args.count)
        except ValueError:
            raise PromptFileError(f"--count takes a number or 'all', got '{args.count}'") from None
    data = load_coco_captions(args.captions)
    records = select_captions(data, count, args.seed)
    write_prompt_file(records, args.out)
    print(
        f"wrote {len(records)} prompts (one caption per image, seed {args.seed}) of {len(data['images'])} images "
        f"to {args.out}"
    )
    return 0


def image_name(index: int, total: int) -> str:
    """File name of image ``index`` in a set of ``total``: zero-padded to 6 digits or more."""
    return f"{index:0{max(6, len(str(total - 1)))}d}.png"


def _settings_of(args: argparse.Namespace, pipe, model: str, dtype: str) -> GenerationSettings:
    from bksdm.sampling import check_scheduler_steps, check_side

    sample_size = pipe.unet.config.sample_size
    native = sample_size * pipe.vae_scale_factor if isinstance(sample_size, int) else None
    height = native if args.height is None else args.height  # (0 is a size to refuse, not "the default")
    width = native if args.width is None else args.width
    if height is None or width is None:
        raise GenerateError("the model has no single native size: pass --height and --width")
    check_side(height, "--height", pipe.vae_scale_factor)
    check_side(width, "--width", pipe.vae_scale_factor)
    check_scheduler_steps(pipe.scheduler, args.steps)
    return GenerationSettings(
        model=_canonical(model),
        unet=_canonical(args.unet) if args.unet else None,
        scheduler=type(pipe.scheduler).__name__,
        steps=args.steps,
        guidance_scale=float(args.guidance),
        height=int(height),
        width=int(width),
        negative_prompt=args.negative_prompt,
        dtype=dtype,
        seed=args.seed,
        resize=args.resize,
        safety_checker=getattr(pipe, "safety_checker", None) is not None,
    )


def _canonical(ref: str) -> str:
    """Local folders as absolute paths (the same folder compares equal from any working directory)."""
    return str(Path(ref).resolve()) if Path(ref).is_dir() else ref


def _check_resume(out: Path, settings: GenerationSettings, prompts: list[PromptRecord], names: list[str]) -> None:
    """Refuse a folder whose images were made with other settings or for other prompts."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GenerateError(f"--out {out} is a file; give a folder")
    settings_file = out / SETTINGS_FILE
    if not settings_file.is_file():
        if any(out.iterdir()):
            raise GenerateError(f"--out {out} is not empty and holds no {SETTINGS_FILE}; give a new or empty folder")
        return
    previous = _read_settings(settings_file).get("settings", {})
    if not isinstance(previous, dict):
        raise GenerateError(_broken_record(settings_file, "its 'settings' entry is not a JSON object"))
    current = json.loads(json.dumps(asdict(settings)))
    changed = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in current.items() if previous.get(k) != v]
    if changed:
        raise GenerateError(
            f"--out {out} holds images made with other settings ({'; '.join(changed)}); use a new --out, or delete "
            "the folder to start over"
        )
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        for number, line in enumerate(_read_text(manifest).splitlines(), start=1):
            entry = _manifest_entry(manifest, number, line)
            if entry is None:
                continue
            i = entry["index"]
            if i < len(prompts) and entry["prompt"] != prompts[i].prompt and (out / names[i]).is_file():
                raise GenerateError(
                    f"--out {out}: image {names[i]} was made for the prompt {entry['prompt']!r}, but prompt {i} of the "
                    f"prompt file is {prompts[i].prompt!r}; use a new --out for another prompt file"
                )


def _broken_record(path: Path, problem: str) -> str:
    return (
        f"{path} is broken ({problem}); it records how the images in {path.parent} were made, so bksdm cannot "
        f"tell whether they match this command: restore the file, or delete the folder (or use a new --out) to "
        "start over"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GenerateError(_broken_record(path, f"not UTF-8 text at byte {err.start}")) from None


def _read_settings(path: Path) -> dict[str, Any]:
    """``OUT/settings.json`` as written by an earlier run.

    Raises:
        GenerateError: The file is not UTF-8, not JSON, or not a JSON object (the message names it and the fix).
    """
    try:
        record = json.loads(_read_text(path), parse_constant=_refuse_constant)
    except ValueError as err:
        if isinstance(err, GenerateError):
            raise
        raise GenerateError(_broken_record(path, f"not valid JSON: {err}")) from None
    if not isinstance(record, dict):
        raise GenerateError(_broken_record(path, "not a JSON object"))
    return record


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _manifest_entry(path: Path, number: int, line: str) -> dict[str, Any] | None:
    """Line ``number`` of ``OUT/manifest.jsonl``: an entry with an integer index and a prompt (None if blank)."""
    if not line.strip():
        return None
    try:
        entry = json.loads(line, parse_constant=_refuse_constant)
    except ValueError as err:
        raise GenerateError(_broken_record(path, f"line {number} is not valid JSON: {err}")) from None
    if not isinstance(entry, dict) or type(entry.get("index")) is not int or not isinstance(entry.get("prompt"), str):
        raise GenerateError(_broken_record(path, f"line {number} is not an entry with an index and a prompt"))
    return entry


def _unreadable_reason(path: Path) -> str | None:
    """Why the image at ``path`` cannot be kept on resume (None when it is a whole PNG).

    A run of an older version killed mid-write, or a disk that filled before writes were atomic, can leave a
    truncated image under its final name. PIL's ``verify`` reads every chunk and checks its CRC without decoding
    the pixels (well under a millisecond for a 512 px image), so it finds any truncation before the last chunk.
    """
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return f"a {image.format} file, not a PNG"
            image.verify()
    except Exception as err:  # PIL raises assorted types (OSError, SyntaxError, struct.error) for a broken file
        return f"{type(err).__name__}: {err}"
    return None


def _json(record: Any, **kwargs: Any) -> str:
    """Strict JSON: a NaN or infinity is an error here, never a bare ``NaN`` that JSON readers refuse."""
    return json.dumps(record, allow_nan=False, **kwargs)


def _save_image(image, path: Path) -> None:
    """Write under a partial name, then rename: a crash or a full disk never leaves a half image that counts as done.

    Raises:
        WriteFailed: The image could not be written (full disk, read-only folder); the partial file is removed.
    """
    with atomic_file(path) as partial:
        image.save(partial, format="PNG")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteFailed(err.errno or errno.EIO, describe_failure(err, out)) from err


def run_generate(args: argparse.Namespace) -> int:
    """Handle ``bksdm generate``: load, check the folder, generate this process's share, write the records."""
    import diffusers
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from bksdm.eval.generate import generate_images, prompt_seed, resize_image
    from bksdm.eval.prompts import read_prompts
    from bksdm.loading import dtype_name, load_pipeline_with_unet, resolve_device, resolve_dtype, teacher_or_default
    from bksdm.sampling import (
        check_batch_size,
        check_guidance,
        check_memory,
        check_side,
        check_steps,
        sampling_defaults,
    )

    model = teacher_or_default(args.model)
    # A model folder that records its sampling settings (the shapes teachers) gets them; others the table's.
    defaults = sampling_defaults(model)
    args.steps = args.steps if args.steps is not None else defaults.steps
    args.guidance = args.guidance if args.guidance is not None else defaults.guidance_scale
    # Every option that needs no model is checked before anything is loaded or written.
    check_steps(args.steps)
    check_guidance(args.guidance)
    check_batch_size(args.batch_size)
    for option, side in (("--height", args.height), ("--width", args.width), ("--resize", args.resize)):
        if side is not None:
            check_side(side, option)
    chosen = resolve_device(args.device)
    prompts = read_prompts(args.prompts)
    # Without cpu=True, accelerate runs N independent copies of a multi-process launch on a machine with no GPU.
    state = PartialState(cpu=chosen.type == "cpu")
    device = chosen if args.device not in (None, "cuda") else state.device
    dtype = resolve_dtype(args.dtype, device)

    pipe = load_pipeline_with_unet(model, args.unet, dtype=dtype, device=device, scheduler=args.scheduler)
    if args.no_safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    settings = _settings_of(args, pipe, model, dtype_name(dtype))
    out = Path(args.out)
    names = [image_name(i, len(prompts)) for i in range(len(prompts))]
    seeds = [prompt_seed(args.seed, i) for i in range(len(prompts))]
    # Every process checks and lists the folder before anyone writes to it, so all see the same state.
    _check_resume(out, settings, prompts, names)
    # An image left whole by an earlier run is kept; one that is there but does not read is drawn again.
    todo, broken = [], []
    for i, name in enumerate(names):
        problem = _unreadable_reason(out / name) if (out / name).exists() else "missing"
        if problem is not None:
            todo.append(i)
            if problem != "missing":
                broken.append(name)
                if state.is_main_process:
                    logger.warning("%s does not read (%s): drawing it again", out / name, problem)
    size = f"--height {settings.height} --width {settings.width}"
    per_call = max(1, min(args.batch_size, len(todo[state.process_index :: state.num_processes])))
    check_memory(pipe, settings.height, settings.width, per_call, settings.guidance_scale > 1, device, what=size)
    state.wait_for_everyone()

    started = time.time()
    if state.is_main_process:
        _make_folder(out)
        settings_path = out / SETTINGS_FILE
        runs = _read_settings(settings_path).get("runs", []) if settings_path.is_file() else []
        runs = runs if isinstance(runs, list) else []
        record = {"settings": asdict(settings), "versions": _versions(diffusers.__version__), "runs": runs}
        write_text(settings_path, _json(record, indent=2) + "\n")
        lines = []
        for i, (p, name) in enumerate(zip(prompts, names, strict=True)):
            extra = {(f"source_{k}" if k in _RESERVED else k): v for k, v in p.extra.items()}
            entry = {"index": i, "prompt": p.prompt, "seed": seeds[i], "file": name, **extra}
            lines.append(_json(entry, ensure_ascii=False))
        write_text(out / MANIFEST_FILE, "\n".join(lines) + "\n")
    state.wait_for_everyone()

    share = todo[state.process_index :: state.num_processes]
    logger.info("process %d: %d of %d missing images", state.process_index, len(share), len(todo))
    # The bar ends its line when the loop ends or fails, so an error message starts on a line of its own.
    with tqdm(
        total=len(share),
        unit="img",
        desc="generate" if state.num_processes == 1 else f"generate (process 0 of {state.num_processes})",
        disable=not state.is_main_process,
    ) as bar:
        for start in range(0, len(share), args.batch_size):
            chunk = share[start : start + args.batch_size]
            images = generate_images(
                pipe,
                [prompts[i].prompt for i in chunk],
                [seeds[i] for i in chunk],
                steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                batch_size=len(chunk),
                height=settings.height,
                width=settings.width,
                negative_prompt=settings.negative_prompt,
            )
            for i, image in zip(chunk, images, strict=True):
                _save_image(resize_image(image, settings.resize) if settings.resize else image, out / names[i])
            bar.update(len(chunk))
    state.wait_for_everyone()

    if state.is_main_process:
        # Partial files left by a killed run (".*.tmp" from older versions); every live process has finished.
        for stale in [*out.glob(f".*{PARTIAL_SUFFIX}"), *out.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
        missing = [n for n in names if not (out / n).is_file()]
        if missing:
            raise GenerateError(f"{len(missing)} images are missing after the run (first: {missing[0]}); run again")
        seconds = time.time() - started
        record = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
        record["runs"].append(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "seconds": round(seconds, 3),
                "generated": len(todo),
                "skipped": len(prompts) - len(todo),
                "redrawn_unreadable": len(broken),
                "num_processes": state.num_processes,
                "batch_size": args.batch_size,
                "device": str(device),
            }
        )
        write_text(out / SETTINGS_FILE, _json(record, indent=2) + "\n")
        rate = f", {len(todo) / seconds:.2f} images/s" if todo and seconds > 0 else ""
        redrawn = ""
        if broken:
            more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
            redrawn = f"; {broken[0]}{more} did not read and {'were' if more else 'was'} drawn again"
        print(
            f"{len(prompts)} images in {out} ({len(todo)} generated, {len(prompts) - len(todo)} already there"
            f"{redrawn}; {seconds:.1f} s on {state.num_processes} process(es){rate})"
        )
    return 0


def _versions(diffusers_version: str) -> dict[str, str]:
    return {"bksdm": __version__, "diffusers": diffusers_version, "torch": torch.__version__}
