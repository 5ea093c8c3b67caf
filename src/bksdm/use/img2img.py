"""Image-to-image translation (SDEdit) with the stock diffusers img2img pipeline, on any SD model or student.

SDEdit (Meng et al., 2022) noises an input image's latent to an intermediate step and denoises it under a new
prompt: ``strength`` picks the step (0: the image back, 1: pure noise, i.e. text-to-image). The BK-SDM paper
shows its compact U-Nets doing this with the stock pipeline (REFERENCE.md, "Downstream"), so this module adds
no sampler of its own: it builds the img2img variant of a text-to-image pipeline from its components with
diffusers' ``from_pipe`` (``StableDiffusionImg2ImgPipeline``, ``StableDiffusionXLImg2ImgPipeline``,
``StableDiffusion3Img2ImgPipeline``, ``FluxImg2ImgPipeline``), with a student U-Net swapped in when asked, and
calls it with one seeded generator per image. The transformer variants would draw at their native size whatever
the input's (measured: a 96x64 input came back 128x128 from the tiny SD3 pipeline, 1024x1024 from FLUX), so they
are given the input's size.

Each image's randomness (its VAE latent sample and its noise) comes from its own generator seeded by ``(base
seed, image index)``, so a result does not depend on the batch size or on the other images of a batch. Pure:
reading and writing files belong to :mod:`bksdm.use.img2img_job`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from bksdm.eval.generate import prompt_seed
from bksdm.loading import load_pipeline_with_unet
from bksdm.sampling import (
    SamplingError,
    check_batch_size,
    check_guidance,
    check_negative_prompt,
    embedded_guidance,
    pipe_kind,
    side_factor,
)
from bksdm.sampling import check_strength as _check_strength

__all__ = [
    "Img2ImgError",
    "check_strength",
    "image_seed",
    "img2img_pipeline",
    "translate",
]


class Img2ImgError(SamplingError):
    """A user error of image-to-image translation: a bad option value, input image or student U-Net."""


def image_seed(base_seed: int, index: int) -> int:
    """The seed of input image ``index`` (stable across runs, batch sizes and the other images)."""
    return prompt_seed(base_seed, index)


def check_strength(strength: float, steps: int, kind: str = "unet") -> None:
    """Fail early, with a fix, on a strength and step count the img2img pipeline cannot run.

    The pipeline runs the last :func:`bksdm.sampling.steps_run` of ``steps`` denoising steps (``int(steps *
    strength)`` for SD's, ``kind`` ``"unet"``), so at least one must be left.

    Raises:
        Img2ImgError: ``strength`` not a finite number in (0, 1], ``steps`` < 1, or no step left to run.
    """
    try:
        _check_strength(strength, steps, kind=kind)
    except SamplingError as err:
        raise Img2ImgError(str(err)) from None


def img2img_pipeline(
    model: str | os.PathLike,
    unet: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scheduler: str | None = None,
):
    """Build the stock img2img pipeline from a text-to-image pipeline's components.

    Args:
        model: A diffusers pipeline folder or hub id (SD-v1/v2, SDXL, SD3, FLUX.1), e.g. the bundled teacher or a
            student folder written by ``bksdm prune`` / ``bksdm distill``.
        unet: Optionally a student U-Net that replaces a U-Net pipeline's: a student pipeline folder, a U-Net
            folder or a hub id (see :func:`bksdm.loading.load_pipeline_with_unet`, which checks that it fits).
        dtype: Dtype of every component.
        device: Where to run.
        scheduler: A diffusers scheduler class name (e.g. ``EulerDiscreteScheduler``) made from the model's
            scheduler config; None keeps the model's own.

    Returns:
        A ``StableDiffusionImg2ImgPipeline`` (or the SDXL, SD3 or FLUX one) sharing the loaded components,
        progress bar off.

    Raises:
        TeacherNotFoundError: ``model`` is neither a pipeline folder nor a reachable hub repo.
        UnetError: ``unet`` holds no U-Net, one that does not fit the pipeline, or is given for a transformer
            model.
        Img2ImgError: The pipeline has no image-to-image counterpart.
        ValueError: ``scheduler`` is not a diffusers scheduler.
    """
    from diffusers import AutoPipelineForImage2Image

    from bksdm.eval.generate import model_denoiser

    if unet is not None:
        model_denoiser(model, unet)  # a transformer model has no U-Net to swap: one clear message
    base = load_pipeline_with_unet(model, unet, dtype=dtype, device="cpu", scheduler=scheduler)
    try:
        pipe = AutoPipelineForImage2Image.from_pipe(base)
    except ValueError as err:
        raise Img2ImgError(f"{model} ({type(base).__name__}) has no image-to-image counterpart: {err}") from err
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def translate(
    pipe,
    images: Sequence[Image.Image],
    prompt: str,
    seeds: Sequence[int],
    *,
    strength: float,
    steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    negative_prompt: str | None = None,
) -> list[Image.Image]:
    """Translate each image towards ``prompt``, each with its own seeded generator, in batches.

    Images of different sizes are fine: a batch is split into runs of equal size (a pipeline call needs one
    size), which changes nothing since every image has its own generator.

    Args:
        pipe: An img2img pipeline (see :func:`img2img_pipeline`).
        images: RGB input images; each output has the input's size rounded down to a multiple of the model's size
            factor (:func:`bksdm.sampling.side_factor`: the VAE's, x 2 for SD3 and FLUX.1).
        prompt: What the images should show.
        seeds: One seed per image.
        strength: How far to noise the input (0, 1]: low keeps it, high follows the prompt.
        steps: Denoising steps of the full schedule; :func:`bksdm.sampling.steps_run` of them run (``int(steps *
            strength)`` for SD's pipelines, rounded up for SD3's and FLUX's).
        guidance_scale: Classifier-free guidance scale (1 turns guidance off); FLUX.1: its embedded guidance.
        batch_size: Images per pipeline call; results do not depend on it.
        negative_prompt: Optional negative prompt (not for FLUX.1).

    Returns:
        The translated images, in input order.

    Raises:
        Img2ImgError: Bad ``strength``/``steps``/``batch_size``, or as many seeds as images not given.
        SamplingError: A guidance scale that is not finite, negative or between 0 and 1; a negative prompt for
            FLUX.1.
    """
    kind = pipe_kind(pipe)
    check_strength(strength, steps, kind)
    check_guidance(guidance_scale, "guidance_scale")
    check_negative_prompt(negative_prompt, embedded_guidance(pipe), "negative_prompt")
    try:
        check_batch_size(batch_size)
    except SamplingError as err:
        raise Img2ImgError(str(err)) from None
    if len(images) != len(seeds):
        raise Img2ImgError(f"{len(images)} images but {len(seeds)} seeds")
    factor = side_factor(pipe)
    for index, image in enumerate(images):
        if min(image.size) < factor:
            raise Img2ImgError(
                f"image {index} is {image.width}x{image.height} pixels: img2img needs at least {factor} pixels a "
                f"side (the model's size factor); resize it"
            )
    # SD's img2img pipelines keep the input's size (rounded down); the transformers' must be told it.
    sized = kind != "unet"
    out: list[Image.Image] = []
    for start in range(0, len(images), batch_size):
        chunk = list(zip(images[start : start + batch_size], seeds[start : start + batch_size], strict=True))
        results: list[Image.Image | None] = [None] * len(chunk)
        for size in dict.fromkeys(image.size for image, _ in chunk):  # sizes in order of first appearance
            members = [i for i, (image, _) in enumerate(chunk) if image.size == size]
            # Latent samples and noise are drawn on the CPU from per-image generators: the same on any device.
            generators = [torch.Generator("cpu").manual_seed(int(chunk[i][1])) for i in members]
            width, height = size
            shape = {"width": width - width % factor, "height": height - height % factor} if sized else {}
            made = pipe(
                prompt=[prompt] * len(members),
                image=[chunk[i][0] for i in members],
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                negative_prompt=[negative_prompt] * len(members) if negative_prompt else None,
                generator=generators,
                **shape,
            ).images
            for i, image in zip(members, made, strict=True):
                results[i] = image
        out.extend(image for image in results if image is not None)
    return out
