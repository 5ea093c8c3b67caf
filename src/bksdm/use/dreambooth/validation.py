"""Images a DreamBooth run draws with the model it trains: the sampling settings of class and validation images,
and the validation images on fixed prompts and seeds (a grid per validation, its first row drawn before training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bksdm.sampling import sampling_defaults
from bksdm.use.dreambooth.data import save_image_atomic

__all__ = ["ValidationRow", "sample_images", "sampling_settings", "write_validation"]

ValidationRow = tuple[str, list[Image.Image]]
"""A row of a validation grid: its label and one image per validation prompt."""


def sampling_settings(model_ref: str, steps: int | None, guidance_scale: float | None) -> dict[str, Any]:
    """Steps and guidance for class and validation images: the given ones, else the model's
    (:func:`bksdm.sampling.sampling_defaults`: its recorded settings, else 25 steps at guidance 7.5)."""
    defaults = sampling_defaults(model_ref)
    return {
        "steps": steps if steps is not None else defaults.steps,
        "guidance_scale": guidance_scale if guidance_scale is not None else defaults.guidance_scale,
    }


@torch.no_grad()
def sample_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    resolution: int,
    sampling: dict[str, Any],
    trained: Sequence[torch.nn.Module],
    dtype: torch.dtype,
) -> list[Image.Image]:
    """Validation images with the current weights (the trained modules in eval mode meanwhile).

    Under mixed precision the frozen parts are in ``dtype`` and the trained ones in fp32: autocast lets them meet.
    """
    from bksdm.eval.generate import generate_images

    modes = [m.training for m in trained]
    for module in trained:
        module.eval()
    try:
        with torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return generate_images(pipe, prompts, seeds, height=resolution, width=resolution, **sampling)
    finally:
        for module, mode in zip(trained, modes, strict=True):
            module.train(mode)


def write_validation(folder: Path, step: int, images: list[Image.Image], earlier: Sequence[ValidationRow]) -> None:
    """Writes ``step-NNNNNNN.png`` (a grid: the ``earlier`` rows, then this step's) and each image on its own."""
    from bksdm.train.validation import image_grid

    shown = [*earlier, (f"step {step}", images)]
    folder.mkdir(parents=True, exist_ok=True)
    save_image_atomic(image_grid([r[1] for r in shown], [r[0] for r in shown]), folder / f"step-{step:07d}.png")
    for i, image in enumerate(images):
        save_image_atomic(image, folder / f"step-{step:07d}-{i}.png")
