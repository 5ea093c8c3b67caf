"""Batched generation with stock diffusers pipelines, seeded per prompt.

Each image's initial latent comes from its own generator seeded by ``(base seed, prompt index)``, so an image
does not depend on the batch size or on which process made it (the official BK-SDM evaluation drew all latents
from one generator, so its FID changed with the batch size: REFERENCE.md, "Evaluation protocol").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from bksdm.sampling import check_batch_size, check_guidance, check_scheduler_steps, check_side
from bksdm.seeding import mix_seed


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
        pipe: A diffusers text-to-image pipeline (SD or SDXL).
        prompts: The prompts.
        seeds: One seed per prompt.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (1 or 0 turn guidance off).
        batch_size: Prompts per pipeline call; results do not depend on it.
        height, width: Image size (default: the pipeline's native size).
        negative_prompt: Optional negative prompt for every image.
        progress: Show a progress bar over batches.

    Returns:
        PIL images in prompt order.

    Raises:
        SamplingError: Steps below 1, a guidance scale that is not finite, negative or between 0 and 1, a batch
            size below 1, or a side that is not a positive multiple of the VAE's factor (see
            :mod:`bksdm.sampling`).
        ValueError: Not as many seeds as prompts.
    """
    check_scheduler_steps(pipe.scheduler, steps, "steps")
    check_guidance(guidance_scale, "guidance_scale")
    check_batch_size(batch_size, "batch_size")
    factor = getattr(pipe, "vae_scale_factor", None)
    for option, side in (("height", height), ("width", width)):
        if side is not None:
            check_side(side, option, factor)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
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
        )
        images.extend(result.images)
    return images
