"""Generation with stock diffusers pipelines, seeded per prompt: a list of images, or a folder (``bksdm generate``).

Each image's initial latent comes from its own generator seeded by ``(base seed, prompt index)``, so an image
does not depend on the batch size or on which process made it (the official BK-SDM evaluation drew all latents
from one generator, so its FID changed with the batch size: REFERENCE.md, "Evaluation protocol").

:func:`generate_folder` is the job of ``bksdm generate``: it loads a stock diffusers pipeline -- SD-v1/v2 or SDXL
(optionally with a student U-Net swapped in), SD3 / SD3.5 or FLUX.1 (a transformer student is a whole pipeline) --,
gives prompt ``i`` the seed ``prompt_seed(seed, i)`` and generates in batches, with the sampling defaults of the
model's pipeline class when the options leave them out (:data:`bksdm.sampling.SAMPLING_TABLE`). Launched
with ``accelerate launch``, each process takes every N-th missing image. Every image is written under a hidden
partial name and renamed (:func:`bksdm.artifacts.atomic_file`), so a killed run or a full disk leaves only whole
images; running the same job again skips them and makes the rest (an image that is there but does not read is
drawn again and logged). A folder made with other settings is refused; a longer prompt file that starts with the
same prompts extends a folder (:mod:`bksdm.eval.image_folder` holds the folder's contract). Every option is checked
before any work (:mod:`bksdm.sampling`): sizes, steps, guidance and batch size, and the memory a call needs at
that size and batch against what the device has free once the model is loaded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from bksdm.eval.prompts import PromptRecord
from bksdm.sampling import (
    check_batch_size,
    check_guidance,
    check_negative_prompt,
    check_scheduler_steps,
    check_side,
    embedded_guidance,
    latent_patch,
)
from bksdm.seeding import mix_seed
from bksdm.threads import governed_threads

__all__ = [
    "GenerateOptions",
    "GenerateSummary",
    "generate_folder",
    "generate_images",
    "model_denoiser",
    "prompt_seed",
    "resize_image",
]

logger = logging.getLogger(__name__)


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """Resize to ``size`` x ``size`` the paper's way: PIL's ``resize`` with its default filter for RGB, bicubic.

    The official evaluation generated at 512 px and called ``img.resize((256, 256))`` before computing FID, IS
    and CLIP score (REFERENCE.md, "Evaluation protocol").
    """
    if image.size == (size, size):
        return image
    return image.resize((size, size), resample=Image.Resampling.BICUBIC)


def prompt_seed(base_seed: int, index: int) -> int:
    """The seed of prompt ``index`` (stable across runs, batch sizes and processes)."""
    return mix_seed(base_seed, index) % 2**32


def model_denoiser(
    model: str | os.PathLike, unet: str | os.PathLike | None = None, option: str = "--model"
) -> dict[str, Any]:
    """The config of ``model``'s denoiser (no weights read), and a check that ``unet`` may replace it.

    What the sampling commands read before loading anything: the denoiser's family picks the sampling defaults
    (:func:`bksdm.sampling.sampling_defaults`), and only a U-Net model takes a ``--unet``: a transformer student
    (SD3, FLUX.1) is a whole stock pipeline, given as the model itself. ``option`` names ``model`` in messages.

    Raises:
        TeacherNotFoundError: ``model`` is not a pipeline folder, or a hub id that cannot be read.
        UnetError: ``unet`` is given for a transformer model.
    """
    from bksdm.families import family_of
    from bksdm.loading import TeacherNotFoundError, UnetError, check_pipeline_ref, load_denoiser_config

    try:
        check_pipeline_ref(model)
        config = load_denoiser_config(model)
    except TeacherNotFoundError as err:
        raise TeacherNotFoundError(f"{option}: {err}") from None
    family = family_of(config)
    if unet is not None and family.denoiser != "unet":
        raise UnetError(
            f"--unet {unet}: {model} is a {config.get('_class_name', family.name)} model, which has no U-Net to "
            f"replace; a transformer student (from bksdm prune or distill) is a whole pipeline: give it as {option}"
        )
    return config


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    progress: bool = False,
) -> list[Image.Image]:
    """One image per prompt, each from its own seeded generator, in batches.

    Args:
        pipe: A diffusers text-to-image pipeline (SD, SDXL, SD3 or FLUX.1).
        prompts: The prompts.
        seeds: One seed per prompt.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (1 or 0 turn guidance off); for FLUX.1 the value fed to its
            guidance embedding.
        batch_size: Prompts per pipeline call; results do not depend on it.
        height, width: Image size (default: the pipeline's native size; FluxPipeline's is 1024).
        negative_prompt: Optional negative prompt for every image (not for FLUX.1).
        progress: Show a progress bar over batches.

    Returns:
        PIL images in prompt order.

    Raises:
        SamplingError: Steps below 1, a guidance scale that is not finite, negative or between 0 and 1, a batch
            size below 1, a side that is not a positive multiple of the VAE's factor (x 2 for a transformer) (see
            :mod:`bksdm.sampling`), or a negative prompt for FLUX.1.
        ValueError: Not as many seeds as prompts.
    """
    check_scheduler_steps(pipe.scheduler, steps, "steps")
    check_guidance(guidance_scale, "guidance_scale")
    check_batch_size(batch_size, "batch_size")
    check_negative_prompt(negative_prompt, embedded_guidance(pipe), "negative_prompt")
    factor = getattr(pipe, "vae_scale_factor", None)
    for option, side in (("height", height), ("width", width)):
        if side is not None:
            check_side(side, option, factor, latent_patch(pipe))
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    with governed_threads(pipe.device) as threads:  # fewer CPU threads, step by step, while others hold cores
        extra = {"callback_on_step_end": threads.step_end_callback} if threads is not None else {}
        for start in tqdm(starts, desc="generate", disable=not progress):
            chunk = list(prompts[start : start + batch_size])
            # Latents are drawn on the CPU from per-image generators, the same on any device and batch size.
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            result = pipe(
                chunk,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                height=height,
                width=width,
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                **extra,
            )
            images.extend(result.images)
    return images


# ------------------------------------------------------------------------------------------- a folder


@dataclass
class GenerateOptions:
    """What :func:`generate_folder` makes: one image per prompt of ``prompts`` in the folder ``out``.

    Every ``None`` means the default the option's help names: the bundled shapes teacher, the model's own
    scheduler and native size (1024 for FLUX.1), the model's recorded sampling settings else the table's for its
    pipeline class (:func:`bksdm.sampling.sampling_defaults`), fp16 on CUDA and fp32 elsewhere, CUDA when available.
    """

    prompts: str | os.PathLike | Sequence[str | PromptRecord]
    """A prompt file (.txt, .json, .jsonl, .csv; see :func:`bksdm.eval.prompts.read_prompts`) or the prompts."""
    out: str | os.PathLike
    """The folder (resumed when it holds a run with the same settings)."""
    model: str | None = None
    """A diffusers pipeline folder or hub id."""
    unet: str | None = None
    """A U-Net to use instead of the model's (see :func:`bksdm.loading.load_pipeline_with_unet`); U-Net models
    only."""
    scheduler: str | None = None
    """A diffusers scheduler class name, e.g. ``PNDMScheduler`` (the paper's)."""
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    dtype: str | None = None
    """``fp32``, ``fp16`` or ``bf16``."""
    batch_size: int = 8
    """Prompts per pipeline call (the images do not depend on it)."""
    seed: int = 0
    """Base seed: prompt ``i`` uses ``prompt_seed(seed, i)``."""
    seeds: Sequence[int] | None = None
    """One seed per prompt instead of ``seed``'s rule (recorded in the manifest; ``seed`` is then ignored)."""
    resize: int | None = None
    """Resize every image to ``resize`` x ``resize`` before saving (the paper: 256)."""
    safety_checker: bool = True
    """False turns off the pipeline's NSFW filter, as the paper's evaluation did (it blacks out images)."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: accelerate's, CUDA if available."""


@dataclass(frozen=True)
class GenerateSummary:
    """What a :func:`generate_folder` call did (complete figures on the main process)."""

    out: Path
    total: int
    generated: int
    redrawn: list[str]
    """Images that were there but did not read, drawn again."""
    seconds: float
    num_processes: int
    device: str
    main_process: bool

    @property
    def skipped(self) -> int:
        """Images already there, kept."""
        return self.total - self.generated

    def describe(self) -> str:
        """One line: how many images, how many made, how fast."""
        rate = f", {self.generated / self.seconds:.2f} images/s" if self.generated and self.seconds > 0 else ""
        redrawn = ""
        if self.redrawn:
            more = f" and {len(self.redrawn) - 1} more" if len(self.redrawn) > 1 else ""
            redrawn = f"; {self.redrawn[0]}{more} did not read and {'were' if more else 'was'} drawn again"
        return (
            f"{self.total} images in {self.out} ({self.generated} generated, {self.skipped} already there"
            f"{redrawn}; {self.seconds:.1f} s on {self.num_processes} process(es){rate})"
        )


def _prompt_records(prompts: str | os.PathLike | Sequence[str | PromptRecord]) -> list[PromptRecord]:
    from bksdm.eval.prompts import PromptFileError, read_prompts

    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    records = [p if isinstance(p, PromptRecord) else PromptRecord(str(p)) for p in prompts]
    if not records:
        raise PromptFileError("no prompts given")
    return records


def generate_folder(options: GenerateOptions, *, progress: bool = True) -> GenerateSummary:
    """Generate one image per prompt into ``options.out``: load, check the folder, generate this process's share
    of the missing images, write the records (see :mod:`bksdm.eval.image_folder`).

    Args:
        options: What to generate (see :class:`GenerateOptions`).
        progress: Show a progress bar (main process only).

    Returns:
        The summary; ``describe()`` gives the line ``bksdm generate`` prints.

    Raises:
        GenerateError: A folder made otherwise, broken records, or images missing after the run.
        PromptFileError: The prompt file is missing or malformed.
        SamplingError: A sampling option that cannot work (steps, guidance, size, batch, memory).
        TeacherNotFoundError, UnetError: The model or U-Net cannot be found, the U-Net does not fit, or a U-Net is
            given for a transformer model.
        WriteFailed: An output could not be written.
    """
    import diffusers
    from accelerate import PartialState

    from bksdm import __version__
    from bksdm.artifacts import PARTIAL_SUFFIX
    from bksdm.devices import dtype_name, resolve_device, resolve_dtype
    from bksdm.eval import image_folder as folder
    from bksdm.loading import load_pipeline_with_unet, teacher_or_default
    from bksdm.sampling import check_memory, check_steps, classifier_free, sampling_defaults

    model = teacher_or_default(options.model)
    # The denoiser's config (no weights read) tells its family: the sampling defaults, and whether --unet applies.
    denoiser = model_denoiser(model, options.unet)
    # A model folder that records its sampling settings (the shapes teachers) gets them; others the table's.
    defaults = sampling_defaults(model, denoiser=denoiser)
    steps = options.steps if options.steps is not None else defaults.steps
    guidance = options.guidance if options.guidance is not None else defaults.guidance_scale
    # Every option that needs no model is checked before anything is loaded or written.
    check_steps(steps)
    check_guidance(guidance)
    check_batch_size(options.batch_size)
    check_negative_prompt(options.negative_prompt, defaults.embedded_guidance)
    for option, side in (("--height", options.height), ("--width", options.width), ("--resize", options.resize)):
        if side is not None:
            check_side(side, option)
    chosen = resolve_device(options.device)
    prompts = _prompt_records(options.prompts)
    seeds = (
        list(options.seeds)
        if options.seeds is not None
        else [prompt_seed(options.seed, i) for i in range(len(prompts))]
    )
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    # Without cpu=True, accelerate runs N independent copies of a multi-process launch on a machine with no GPU.
    state = PartialState(cpu=chosen.type == "cpu")
    device = chosen if options.device not in (None, "cuda") else state.device
    dtype = resolve_dtype(options.dtype, device)

    pipe = load_pipeline_with_unet(model, options.unet, dtype=dtype, device=device, scheduler=options.scheduler)
    if not options.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    settings = _settings_of(options, pipe, model, steps, guidance, dtype_name(dtype), defaults.height)
    out = Path(options.out)
    names = [folder.image_name(i, len(prompts)) for i in range(len(prompts))]
    # Every process checks and lists the folder before anyone writes to it, so all see the same state.
    folder.check_resume(out, settings, prompts, names, seeds)
    # An image left whole by an earlier run is kept; one that is there but does not read is drawn again.
    todo, broken = [], []
    for i, name in enumerate(names):
        problem = folder.unreadable_reason(out / name) if (out / name).exists() else "missing"
        if problem is not None:
            todo.append(i)
            if problem != "missing":
                broken.append(name)
                if state.is_main_process:
                    logger.warning("%s does not read (%s): drawing it again", out / name, problem)
    size = f"--height {settings.height} --width {settings.width}"
    per_call = max(1, min(options.batch_size, len(todo[state.process_index :: state.num_processes])))
    cfg = classifier_free(pipe, settings.guidance_scale)
    check_memory(pipe, settings.height, settings.width, per_call, cfg, device, what=size)
    state.wait_for_everyone()

    started = time.time()
    if state.is_main_process:
        versions = {"bksdm": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}
        folder.write_records(out, settings, versions, prompts, names, seeds)
    state.wait_for_everyone()

    share = todo[state.process_index :: state.num_processes]
    logger.info("process %d: %d of %d missing images", state.process_index, len(share), len(todo))
    # The bar ends its line when the loop ends or fails, so an error message starts on a line of its own.
    with tqdm(
        total=len(share),
        unit="img",
        desc="generate" if state.num_processes == 1 else f"generate (process 0 of {state.num_processes})",
        disable=not (progress and state.is_main_process),
    ) as bar:
        for start in range(0, len(share), options.batch_size):
            chunk = share[start : start + options.batch_size]
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
                image = resize_image(image, settings.resize) if settings.resize else image
                folder.save_image(image, out / names[i])
            bar.update(len(chunk))
    state.wait_for_everyone()

    seconds = time.time() - started
    if state.is_main_process:
        # Partial files left by a killed run (".*.tmp" from older versions); every live process has finished.
        for stale in [*out.glob(f".*{PARTIAL_SUFFIX}"), *out.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
        missing = [n for n in names if not (out / n).is_file()]
        if missing:
            raise folder.GenerateError(
                f"{len(missing)} images are missing after the run (first: {missing[0]}); run again"
            )
        folder.record_run(
            out,
            started,
            seconds,
            generated=len(todo),
            skipped=len(prompts) - len(todo),
            redrawn_unreadable=len(broken),
            num_processes=state.num_processes,
            batch_size=options.batch_size,
            device=str(device),
        )
    return GenerateSummary(
        out=out,
        total=len(prompts),
        generated=len(todo),
        redrawn=broken,
        seconds=seconds,
        num_processes=state.num_processes,
        device=str(device),
        main_process=state.is_main_process,
    )


def _settings_of(
    options: GenerateOptions, pipe, model: str, steps: int, guidance: float, dtype: str, default_side: int | None
):
    """The settings record of this run: every option, with the model's defaults filled in and checked.

    The size: the options', else the native one (the denoiser's ``sample_size`` x the VAE's factor), else
    ``default_side`` (FLUX.1's transformer records no size: the table's 1024).
    """
    from bksdm.eval.image_folder import GenerateError, GenerationSettings, canonical
    from bksdm.families import denoiser_of

    sample_size = denoiser_of(pipe).config.get("sample_size")
    native = sample_size * pipe.vae_scale_factor if isinstance(sample_size, int) else default_side
    height = native if options.height is None else options.height  # (0 is a size to refuse, not "the default")
    width = native if options.width is None else options.width
    if height is None or width is None:
        raise GenerateError("the model has no single native size: pass --height and --width")
    check_side(height, "--height", pipe.vae_scale_factor, latent_patch(pipe))
    check_side(width, "--width", pipe.vae_scale_factor, latent_patch(pipe))
    check_scheduler_steps(pipe.scheduler, steps)
    return GenerationSettings(
        model=canonical(model),
        unet=canonical(options.unet) if options.unet else None,
        scheduler=type(pipe.scheduler).__name__,
        steps=steps,
        guidance_scale=float(guidance),
        height=int(height),
        width=int(width),
        negative_prompt=options.negative_prompt,
        dtype=dtype,
        seed=options.seed if options.seeds is None else None,
        resize=options.resize,
        safety_checker=getattr(pipe, "safety_checker", None) is not None,
    )
