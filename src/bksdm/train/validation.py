"""Training-time pictures: teacher-vs-student grids on fixed prompts and seeds, and the loss curves.

The grids are drawn by the teacher's own pipeline class with the denoiser swapped (``unet`` or ``transformer``), at
the training resolution passed as ``height`` / ``width`` (FLUX's pipeline would otherwise draw 1024 px). FLUX.1-dev
takes ``validation_guidance`` as its embedded guidance value (it has no classifier-free guidance); schnell ignores
it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from bksdm.train.encoders import text_encoder_modules

logger = logging.getLogger(__name__)


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """Pastes rows of equally sized images into one picture, with an optional label above each row."""
    w, h = rows[0][0].size
    band = 14 if labels else 0
    grid = Image.new("RGB", (w * max(len(r) for r in rows), (h + band) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        top = i * (h + band)
        if labels:
            draw.text((2, top + 1), labels[i], fill="black")
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (j * w, top + band))
    return grid


class Validator:
    """Generates the same prompts with the same seeds from the teacher (once) and the student (each call)."""

    def __init__(self, cfg, models, out: Path, *, write: bool = True):
        self.cfg = cfg
        self.models = models
        self.dir = out / "validation"
        self.write = write  # False: draw only (the other processes of a sharded run draw with the main one)
        self.teacher_images: list[Image.Image] | None = None

    def _generate(self, denoiser) -> list[Image.Image]:
        import inspect

        t = self.cfg.train
        base = self.models.pipe
        kwargs = {**base.components, self.models.family.denoiser: denoiser}
        if "requires_safety_checker" in inspect.signature(type(base).__init__).parameters:
            kwargs["requires_safety_checker"] = False
        pipe = type(base)(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        images = []
        dtype = self._precision(denoiser)
        for i, prompt in enumerate(t.validation_prompts):
            generator = torch.Generator("cpu").manual_seed(t.validation_seed + i)
            with torch.autocast(denoiser.device.type, dtype=dtype, enabled=dtype != torch.float32):
                result = pipe(
                    prompt,
                    num_inference_steps=t.validation_steps,
                    guidance_scale=t.validation_guidance,
                    generator=generator,
                    height=self.cfg.data.resolution,
                    width=self.cfg.data.resolution,
                )
            images.append(result.images[0])
        return images

    def _precision(self, denoiser) -> torch.dtype:
        """The autocast dtype of a grid: the lowest precision among the denoiser and the frozen VAE and text encoders.

        A teacher in bf16 or fp16 (``train.teacher_dtype``) brings its encoders with it, whose states an fp32 student
        cannot take outside autocast ("mat1 and mat2 must have the same dtype"); both rows then run under the same
        autocast. All in fp32: no autocast, as before.
        """
        parts = [denoiser, self.models.pipe.vae, *text_encoder_modules(self.models.pipe)]
        dtypes = {p.dtype for m in parts for p in m.parameters() if p.is_floating_point()}
        return next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), torch.float32)

    @torch.no_grad()
    def run(self, student, step: int) -> Path:
        """Writes ``validation/step-NNNNNNN.png``: teacher row above student row (drawn only, unless ``write``)."""
        was_training = student.training
        student.eval()
        try:
            if self.teacher_images is None:
                self.teacher_images = self._generate(self.models.teacher)
            student_images = self._generate(student)
        finally:
            student.train(was_training)
        path = self.dir / f"step-{step:07d}.png"
        if not self.write:
            return path
        self.dir.mkdir(parents=True, exist_ok=True)
        image_grid([self.teacher_images, student_images], ["teacher", f"student, step {step}"]).save(path)
        return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a truncated last line from a crash is ignored)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring an unreadable line in %s", path)
    return records


def plot_losses(metrics: Path, out: Path) -> Path:
    """Plots every loss term of a metrics.jsonl against the step (log scale) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in ("loss", "loss_task", "loss_kd_out", "loss_kd_feat"):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] > 0]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(np.asarray(steps), np.asarray(values), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("bksdm distill")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
