"""The ``bksdm dreambooth-eval`` job: score a folder of personalised images (DINO, CLIP-I, CLIP-T), optionally
generating it first.

The metrics themselves are in :mod:`bksdm.use.dreambooth.metrics`; this module reads the folders (the real subject
images, the generated images and their prompts), draws the generated images when a model is given (the paper's
protocol: several seeded images per prompt, listed with their prompts in ``manifest.jsonl``), and writes the
scores as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bksdm.artifacts import IMAGE_SUFFIXES, MANIFEST_FILE, write_text
from bksdm.use.dreambooth.data import SubjectDataError, list_images, save_image_atomic
from bksdm.use.dreambooth.metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    MetricModelError,
    SubjectScores,
    clip_spec,
    load_dino,
    subject_scores,
)

__all__ = [
    "SubjectEvalOptions",
    "evaluate_subject",
    "generate_subject_images",
    "images_and_prompts",
    "read_images",
    "score_images",
]


@dataclass
class SubjectEvalOptions:
    """A ``dreambooth-eval`` run."""

    images: str
    """Folder of generated images (written first when ``model`` is given)."""
    instance_dir: str
    """Folder of the real subject images."""
    prompts: list[str] | None = None
    """Prompts of the generated images: one for all, or one per image in name order. None: the folder's
    ``manifest.jsonl``. With ``model``: the prompts to generate."""
    dino_model: str | None = DEFAULT_DINO_MODEL
    """DINO ViT folder or hub id; None skips DINO."""
    clip_model: str | None = DEFAULT_CLIP_MODEL
    """CLIP folder, hub id, ``hf:ID`` or ``open_clip:ARCH``; None skips CLIP-I and CLIP-T."""
    model: str | None = None
    """Pipeline (folder or hub id) to generate the images with first; None scores ``images`` as they are."""
    lora: str | None = None
    """LoRA adapter (folder or file) loaded onto ``model``."""
    num_images_per_prompt: int = 4
    """Images generated per prompt (paper: 25 prompts x 4 images)."""
    seed: int = 0
    """Base seed: generated image i gets ``prompt_seed(seed, i)``."""
    steps: int = 25
    """Denoising steps of the generated images."""
    guidance_scale: float = 7.5
    """Guidance scale of the generated images."""
    batch_size: int = 8
    """Images per pipeline call."""
    device: str | None = None
    """``cpu`` or ``cuda``; None: CUDA if available."""
    out: str | None = None
    """Also write the scores as JSON to this file."""


def evaluate_subject(options: SubjectEvalOptions) -> SubjectScores:
    """Runs ``dreambooth-eval``: generates the images when ``options.model`` is set, scores them, writes the JSON.

    Raises:
        SubjectDataError: A missing or empty folder, prompts that do not match the images, bad generation options.
        MetricModelError: A metric model that cannot be loaded (the message says what to download).
    """
    from bksdm.devices import resolve_device

    device = str(resolve_device(options.device))
    real = read_images(options.instance_dir, "--instance-dir")
    prompts = options.prompts
    if options.model:
        generate_subject_images(
            options.model,
            options.images,
            prompts or [],
            lora=options.lora,
            num_images_per_prompt=options.num_images_per_prompt,
            seed=options.seed,
            steps=options.steps,
            guidance_scale=options.guidance_scale,
            batch_size=options.batch_size,
            device=device,
        )
        prompts = None  # the manifest now pairs every image with its prompt
    files, prompts = images_and_prompts(options.images, prompts)
    generated = [_open(f) for f in files]
    scores = score_images(
        generated, real, prompts, dino_model=options.dino_model, clip_model=options.clip_model, device=device
    )
    if options.out:
        record = {**dataclasses.asdict(scores), "dino_model": options.dino_model, "clip_model": options.clip_model}
        write_text(Path(options.out), json.dumps(record, indent=2, allow_nan=False) + "\n")
    return scores


def score_images(
    generated: Sequence[Image.Image],
    real: Sequence[Image.Image],
    prompts: Sequence[str],
    *,
    dino_model: str | None,
    clip_model: str | None,
    device: str,
) -> SubjectScores:
    """Loads the metric models (None skips one) and scores ``generated`` against ``real``.

    Raises:
        MetricModelError: A model that cannot be loaded.
    """
    dino = None if dino_model is None else load_dino(dino_model, device)
    clip = None
    if clip_model is not None:
        from bksdm.eval.clip_models import ClipNotAvailableError, load_clip

        try:
            clip = load_clip(clip_spec(clip_model), device=device)
        except ClipNotAvailableError as err:
            raise MetricModelError(str(err)) from err
    return subject_scores(generated, real, prompts, dino=dino, clip=clip)


def read_images(folder: str | Path, option: str) -> list[Image.Image]:
    """The images of ``folder`` (sorted by name) as RGB; ``option`` names the folder in messages.

    Raises:
        SubjectDataError: No such folder, or no images in it.
    """
    paths = list_images(folder, option.removeprefix("--").removesuffix("-dir"))
    if not paths:
        raise SubjectDataError(f"{option} {folder}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)})")
    return [_open(p) for p in paths]


def images_and_prompts(folder: str | Path, prompts: Sequence[str] | None) -> tuple[list[Path], list[str]]:
    """The generated image files and one prompt per file: from ``prompts``, else from the folder's manifest.

    Raises:
        SubjectDataError: No such folder, no images, a manifest naming missing files, or prompts that do not
            match the images.
    """
    folder_path = Path(folder)
    if not folder_path.is_dir():
        raise SubjectDataError(f"--images {folder}: no such folder")
    manifest = folder_path / MANIFEST_FILE
    if prompts is None and manifest.is_file():
        records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [r["file"] for r in records if not (folder_path / r["file"]).is_file()]
        if missing:
            raise SubjectDataError(f"{manifest} names {len(missing)} missing image(s), e.g. {missing[0]}")
        return [folder_path / r["file"] for r in records], [r["prompt"] for r in records]
    files = list_images(folder_path, "images")
    if not files:
        raise SubjectDataError(f"--images {folder}: no images in it")
    if prompts is None:
        raise SubjectDataError(
            f"--images {folder}: give --prompts (one for all images, or one per image) or a manifest.jsonl"
        )
    if len(prompts) == 1:
        return files, list(prompts) * len(files)
    if len(prompts) != len(files):
        raise SubjectDataError(
            f"{len(prompts)} prompts for {len(files)} images in {folder}: give one prompt for all images, one per "
            "image (in file-name order), or a manifest.jsonl with file and prompt per image"
        )
    return files, list(prompts)


def generate_subject_images(
    model: str,
    folder: str | Path,
    prompts: Sequence[str],
    *,
    lora: str | None = None,
    num_images_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    device: str = "cpu",
) -> list[Path]:
    """Generates ``num_images_per_prompt`` images per prompt into ``folder``, with a ``manifest.jsonl``.

    Image i (prompts repeated in turn) is drawn with seed ``prompt_seed(seed, i)`` and written as ``NNNNNN.png``.

    Returns:
        The image files, in order.

    Raises:
        SubjectDataError: No prompts, a bad count, or a folder that already holds images.
        SamplingError: Bad steps, guidance or batch size (:mod:`bksdm.sampling`'s rules).
    """
    from bksdm.eval.generate import generate_images, prompt_seed
    from bksdm.loading import load_pipeline
    from bksdm.sampling import check_batch_size, check_guidance, check_steps

    if not prompts:
        raise SubjectDataError("--model needs --prompts (the prompts to generate)")
    if num_images_per_prompt < 1:
        raise SubjectDataError(f"--num-images-per-prompt must be at least 1, got {num_images_per_prompt}")
    check_steps(steps)
    check_guidance(guidance_scale, "--guidance-scale")
    check_batch_size(batch_size)
    out = Path(folder)
    if out.is_dir() and list_images(out, "images"):
        raise SubjectDataError(f"--images {out} already holds images; give an empty or new folder with --model")
    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    every = [p for p in prompts for _ in range(num_images_per_prompt)]
    seeds = [prompt_seed(seed, i) for i in range(len(every))]
    images = generate_images(pipe, every, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    files, lines = [], []
    for i, (image, prompt, image_seed) in enumerate(zip(images, every, seeds, strict=True)):
        files.append(out / f"{i:06d}.png")
        save_image_atomic(image, files[-1])
        lines.append(json.dumps({"index": i, "prompt": prompt, "seed": image_seed, "file": files[-1].name}))
    write_text(out / MANIFEST_FILE, "\n".join(lines) + "\n")
    return files


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
