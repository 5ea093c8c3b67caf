"""The img2img job: translate one image or a folder of images towards a prompt and write the results.

What ``bksdm img2img`` runs (:mod:`bksdm.cli.img2img` only parses the options into an :class:`Img2ImgOptions` and
prints the summary). The job owns the files: it lists the inputs, reads them (skipping and counting unreadable
ones), calls :func:`bksdm.use.img2img.translate` batch by batch and writes PNGs plus, for a folder, an
``img2img.json`` record of the settings and of every image's seed.

An input is processed at its own size (rounded down to a multiple of the model's size factor: the VAE's 8, x 2 for
SD3 and FLUX.1) unless ``size`` resizes it. One smaller than the factor, or so large that translating it alone would
need more memory than is free (an 8000x8000 photo needs about 276 GiB with SD-v1.4), is refused naming the file: an
error for a single image file, skipped and counted in a folder. A batch of large images that does not fit runs in
smaller pipeline calls, which changes no image (each has its own generator). Every output is written under a partial
name and renamed (:func:`bksdm.artifacts.atomic_file`), so a full disk leaves the earlier outputs whole and no half
image.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from bksdm.artifacts import IMAGE_SUFFIXES, WriteFailed, atomic_file, describe_failure, write_text
from bksdm.sampling import (
    SAMPLING_TABLE,
    SamplingError,
    check_batch_size,
    check_guidance,
    check_memory,
    check_negative_prompt,
    classifier_free,
    largest_batch,
    sampling_defaults,
    sampling_kind,
    side_factor,
    steps_run,
)
from bksdm.use.img2img import Img2ImgError, check_strength, image_seed, img2img_pipeline, translate

__all__ = [
    "RECORD_FILE",
    "Img2ImgOptions",
    "Img2ImgSummary",
    "check_input",
    "find_inputs",
    "parse_size",
    "read_input",
    "run_img2img",
]

logger = logging.getLogger(__name__)

RECORD_FILE = "img2img.json"
"""Written into an output folder: settings, one entry per image (input, output, seed) and the skipped inputs."""


@dataclass(frozen=True)
class Img2ImgOptions:
    """What to translate, with which model and settings, and where to write it (the options of ``bksdm img2img``).

    Checked by :func:`run_img2img` before any model loads; the messages name the command's options.
    """

    image: str | os.PathLike
    """An image file, or a folder whose top-level image files are the inputs (sorted by name)."""
    prompt: str
    """What the outputs should show."""
    out: str | os.PathLike
    """Output folder (one PNG per input, named after it); for a single image file also a ``.png``/``.jpg`` file."""
    model: str | os.PathLike | None = None
    """A diffusers pipeline folder or hub id; None: the bundled shapes teacher."""
    unet: str | os.PathLike | None = None
    """A student U-Net to use instead of the model's (a pipeline folder, a U-Net folder or a hub id); U-Net models
    only (a transformer student is a whole pipeline: give it as ``model``)."""
    negative_prompt: str | None = None
    """What the outputs should not show."""
    strength: float = SAMPLING_TABLE[("image-to-image", "unet")].strength
    """0 < strength <= 1: how far each input is noised (low keeps it, high follows the prompt)."""
    steps: int | None = None
    """Steps of the full schedule (``int(steps * strength)`` of them run); None: the model's recorded setting."""
    guidance: float | None = None
    """Classifier-free guidance scale (FLUX.1: its embedded guidance); None: the model's recorded setting, else the
    table's for its denoiser (:data:`bksdm.sampling.SAMPLING_TABLE`)."""
    scheduler: str | None = None
    """A diffusers scheduler class name (e.g. ``EulerDiscreteScheduler``); None: the model's own."""
    seed: int = 0
    """Base seed: input ``i`` uses :func:`bksdm.use.img2img.image_seed` ``(seed, i)``."""
    batch_size: int = 4
    """Images per pipeline call (results do not depend on it)."""
    size: str | tuple[int, int] | None = None
    """Resize every input first: ``(width, height)``, or ``"N"`` / ``"WxH"`` as the command takes it."""
    dtype: str | None = None
    """``fp32``, ``fp16`` or ``bf16``; None: fp16 on CUDA, fp32 elsewhere."""
    device: str | None = None
    """``cuda``, ``cuda:N`` or ``cpu``; None: CUDA if available."""
    overwrite: bool = False
    """Replace output files that already exist (otherwise the job refuses before any work)."""


@dataclass
class Img2ImgSummary:
    """What a run did: written outputs (with their seeds) and skipped inputs (with the reason)."""

    written: list[dict[str, Any]] = field(default_factory=list)
    """One ``{"input", "output", "seed"}`` per written image, in input order."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    """One ``{"input", "reason"}`` per input that could not be read or translated."""
    inputs: int = 0
    """Input files found."""
    steps: int = 0
    """Steps of the full schedule."""
    guidance_scale: float = 0.0
    """The guidance scale used."""
    strength: float = 0.0
    """The strength used."""
    steps_run: int = 0
    """Denoising steps each image went through (:func:`bksdm.sampling.steps_run`: ``int(steps * strength)`` for
    SD's pipelines, rounded up for SD3's and FLUX's)."""


# --------------------------------------------------------------------------------------------- inputs


def find_inputs(path: str | os.PathLike) -> list[Path]:
    """The input images: the file itself, or a folder's top-level image files sorted by name.

    A folder's image files are those with a suffix in :data:`bksdm.artifacts.IMAGE_SUFFIXES` (any case); other
    files are ignored.

    A symlink in the folder that is not a folder counts even when it leads nowhere (a loop, a missing target):
    reading it then fails, so it is skipped, named and counted, and keeps its index (the seeds of the images
    after it do not move).

    Raises:
        Img2ImgError: The path does not exist, or the folder holds no image file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        if path.is_symlink():
            raise Img2ImgError(
                f"--image {path}: a symbolic link that leads nowhere (a loop, or its target is missing); give "
                "an image file or a folder"
            )
        raise Img2ImgError(f"--image {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if _is_input_file(p) and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise Img2ImgError(f"--image {path}: the folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _is_input_file(path: Path) -> bool:
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def parse_size(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"512"`` -> (512, 512), ``"768x512"`` -> (768, 512) as (width, height); a tuple or ``None`` as given.

    Raises:
        Img2ImgError: Not N or WxH with positive integers.
    """
    if spec is None or isinstance(spec, tuple):
        return spec
    parts = spec.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise Img2ImgError(f"--size {spec}: give N (a square side) or WxH in pixels, e.g. 512 or 768x512")
    return (values[0], values[-1])


def read_input(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    """An input image as upright 8-bit RGB, optionally resized to ``size`` (width, height).

    Raises:
        Img2ImgError: The file is missing, not an image, corrupt or truncated (the reason is in the message).
    """
    from bksdm.train.data.images import BadRecordError, open_image, to_rgb

    try:
        image = open_image(path)
        image.load()  # decode now, so a truncated file fails here rather than inside the pipeline
        with contextlib.suppress(Exception):  # a corrupt EXIF block raises assorted types; the pixels still work
            image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
    except (BadRecordError, OSError, SyntaxError, ValueError) as err:
        if getattr(err, "errno", None) == errno.ELOOP or (path.is_symlink() and not path.exists()):
            why = "a loop" if getattr(err, "errno", None) == errno.ELOOP else "its target is missing"
            raise Img2ImgError(f"{path}: cannot read the image (a symbolic link that leads nowhere: {why})") from err
        raise Img2ImgError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from err
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def check_input(path: Path, image: Image.Image, pipe, guidance: bool, device: torch.device) -> None:
    """Refuse an input the pipeline cannot translate: a side below its size factor, or too large for memory.

    ``guidance``: whether classifier-free guidance doubles the denoiser's batch
    (:func:`bksdm.sampling.classifier_free`).

    Raises:
        Img2ImgError: The message names the file, its size and the fix.
    """
    factor = side_factor(pipe)
    width, height = image.size
    if min(width, height) < factor:
        raise Img2ImgError(
            f"{path}: {width}x{height} pixels is too small: img2img needs at least {factor} pixels a side (the "
            f"model's size factor); use a larger image or --size"
        )
    try:
        rounded = (height - height % factor, width - width % factor)
        check_memory(pipe, *rounded, 1, guidance, device, what=f"{path} ({width}x{height} pixels)")
    except SamplingError as err:
        raise Img2ImgError(f"{err} (--size WxH resizes every input first)") from None


# -------------------------------------------------------------------------------------------- outputs


def _output_names(inputs: list[Path]) -> list[str]:
    """``<stem>.png`` per input; inputs whose stems collide (``a.jpg``, ``a.png``) keep their suffix."""
    stems = [p.stem for p in inputs]
    return [f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.name}.png" for p in inputs]


def _save(image: Image.Image, target: Path) -> None:
    """Write ``target`` whole or not at all; the format follows its suffix (the partial name has none)."""
    kind = Image.registered_extensions()[target.suffix.lower()]
    with atomic_file(target) as partial:
        image.save(partial, format=kind)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteFailed(err.errno or errno.EIO, describe_failure(err, folder)) from err


def _plan_outputs(inputs: list[Path], out: Path, overwrite: bool) -> tuple[Path, list[Path], bool]:
    """The output folder, one output path per input, and whether ``out`` is a single image file.

    Fails before any work if the outputs would clobber files.
    """
    single_file = len(inputs) == 1 and out.suffix.lower() in IMAGE_SUFFIXES
    if single_file:
        folder, targets = out.parent, [out]
    else:
        if out.exists() and not out.is_dir():
            raise Img2ImgError(f"--out {out} is a file; give a folder for a folder of inputs")
        folder, targets = out, [out / name for name in _output_names(inputs)]
    if not overwrite:
        taken = [t for t in targets if t.exists()]
        if taken:
            more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
            raise Img2ImgError(f"--out: {taken[0]}{more} already exist; choose another --out or pass --overwrite")
    return folder, targets, single_file


# ------------------------------------------------------------------------------------------------ run


def run_img2img(options: Img2ImgOptions, *, on_skip: Callable[[str], None] | None = None) -> Img2ImgSummary:
    """Check everything, load the pipeline, translate batch by batch, write the images and the record.

    Args:
        options: What to translate, with which model and settings, and where to write it.
        on_skip: Called with the reason each time an input of a folder is skipped (default: a logged warning).

    Returns:
        What was written and skipped, with the settings used; at least one image was written.

    Raises:
        Img2ImgError: Bad settings, no readable input image, or outputs that already exist.
        SamplingError: A guidance scale or batch size that cannot work.
        TeacherNotFoundError: ``model`` is neither a pipeline folder nor a reachable hub repo.
        WriteFailed: An output could not be written (the earlier ones are whole).
    """
    from bksdm.devices import resolve_device, resolve_dtype
    from bksdm.eval.generate import model_denoiser
    from bksdm.loading import teacher_or_default

    skip = on_skip or logger.warning
    model = teacher_or_default(options.model)
    inputs = find_inputs(options.image)
    size = parse_size(options.size)
    denoiser = model_denoiser(model, options.unet)  # its config: the family, no weights read
    kind = sampling_kind(denoiser)
    # The model's recorded settings, else the table's for its denoiser (U-Net: 50 / 7.5).
    defaults = sampling_defaults(model, "image-to-image", denoiser)
    steps = options.steps if options.steps is not None else defaults.steps
    guidance = options.guidance if options.guidance is not None else defaults.guidance_scale
    check_strength(options.strength, steps, kind)
    check_guidance(guidance)
    check_batch_size(options.batch_size)
    check_negative_prompt(options.negative_prompt, defaults.embedded_guidance)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    folder, targets, single_file = _plan_outputs(inputs, Path(options.out), options.overwrite)
    single_input = len(inputs) == 1 and Path(options.image).is_file()
    if single_input:
        read_input(inputs[0], size)  # a single named file that cannot be read is an error, not a skip

    pipe = img2img_pipeline(model, options.unet, dtype=dtype, device=device, scheduler=options.scheduler)
    cfg = classifier_free(pipe, guidance)
    run = Img2ImgSummary(
        inputs=len(inputs),
        steps=steps,
        guidance_scale=guidance,
        strength=options.strength,
        steps_run=steps_run(steps, options.strength, kind),
    )
    for start in range(0, len(inputs), options.batch_size):
        batch: list[tuple[int, Image.Image]] = []
        for index in range(start, min(start + options.batch_size, len(inputs))):
            try:
                image = read_input(inputs[index], size)
                check_input(inputs[index], image, pipe, cfg, device)
            except Img2ImgError as err:
                if single_input:  # the one file asked for: an error, not a skip
                    raise
                run.skipped.append({"input": str(inputs[index]), "reason": str(err)})
                skip(str(err))
                continue
            batch.append((index, image))
        if not batch:
            continue
        # Each image fits alone (checked above); a batch of large ones runs in calls as large as memory allows.
        largest = max(batch, key=lambda item: item[1].width * item[1].height)[1]
        factor = side_factor(pipe)
        side = (largest.height - largest.height % factor, largest.width - largest.width % factor)
        per_call = largest_batch(pipe, *side, len(batch), cfg, device)
        seeds = [image_seed(options.seed, index) for index, _ in batch]
        made = translate(
            pipe,
            [image for _, image in batch],
            options.prompt,
            seeds,
            strength=options.strength,
            steps=steps,
            guidance_scale=guidance,
            batch_size=per_call,
            negative_prompt=options.negative_prompt,
        )
        _make_folder(folder)
        for (index, _), seed, image in zip(batch, seeds, made, strict=True):
            _save(image, targets[index])
            run.written.append({"input": str(inputs[index]), "output": str(targets[index]), "seed": seed})

    if not run.written:
        first = run.skipped[0]["reason"] if run.skipped else ""
        raise Img2ImgError(
            f"--image {options.image}: none of the {len(inputs)} image files could be read and translated "
            f"(first: {first})"
        )
    if not single_file:
        record = {
            "model": model,
            "unet": None if options.unet is None else os.fspath(options.unet),
            "prompt": options.prompt,
            "negative_prompt": options.negative_prompt,
            "strength": options.strength,
            "scheduler": type(pipe.scheduler).__name__,
            "steps": steps,
            "denoising_steps_run": run.steps_run,
            "guidance_scale": guidance,
            "seed": options.seed,
            "seed_rule": "image i uses bksdm.use.img2img.image_seed(seed, i), i its index among the sorted inputs",
            "size": list(size) if size else None,
            "dtype": str(dtype).removeprefix("torch."),
            "images": run.written,
            "skipped": run.skipped,
        }
        write_text(folder / RECORD_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return run
