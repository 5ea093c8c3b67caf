"""A small ControlNet for the bundled shapes teacher whose control image says where the shape goes.

Usage (the command, time and machine of a run are recorded in the output's ``bksdm_toy.json``)::

    python -m bksdm.world.train_controlnet --out runs/shapes-controlnet

The control image is a white disc on black at the centre of the shape (:func:`control_image`): it fixes the
position and nothing else. The prompts name shape, colour and size but no position (:func:`positionless`), so the
position can only come from the control: without a ControlNet the teacher draws such prompts mostly at the bottom
left, and 20 of the 96 held-out images land in the control's quadrant (0.208, chance is 0.25); with the ControlNet
of the defaults (400 steps, 9.4 min on 2 shared cores), 96 of 96 (``benchmarks/results/adapt_controlnet_shapes.json``).

Training is ControlNet's own (Zhang et al., ICCV 2023): ``ControlNetModel.from_unet`` of the frozen teacher (its
zero convolutions make the untrained ControlNet a no-op), the teacher's diffusion loss (v-prediction, the same
extra share of the noisiest timesteps as the teacher's recipe, where the layout is decided), 10% of prompts
dropped to "" so that classifier-free guidance sees the control in both branches. Pairs are drawn fresh from world
seed :data:`TRAIN_SEED`; evaluation uses scenes of :data:`EVAL_SEED` and noise seeds from :data:`EVAL_NOISE_SEED`.

:func:`placement` measures a pipeline with a ControlNet: the share of images in which the classifier finds the
shape in the control's quadrant (and the shape, colour and size prompted). :func:`export_control_data` writes
pairs with their control images in the layout ``bksdm adapt controlnet --distill-steps`` reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionControlNetPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from bksdm.artifacts import MODEL_RECORD_FILE, atomic_dir, write_text
from bksdm.families.unet import UNET
from bksdm.world import shapes
from bksdm.world.teacher import load_teacher
from bksdm.world.teacher_eval import machine
from bksdm.world.teacher_recipe import CAPTION_DROPOUT, HIGH_T_FROM, HIGH_T_SHARE
from bksdm.world.train_teacher import sample_timesteps

logger = logging.getLogger("bksdm.world.train_controlnet")

TRAIN_SEED = 11
"""World seed of the ControlNet's training pairs (the teacher's are 1 and 2, the classifier's 9100-9102)."""
EVAL_SEED = 12
"""World seed of the held-out scenes whose shape positions make the evaluation's control images."""
EVAL_NOISE_SEED = 60_000
"""Evaluation image ``i`` starts from noise seed ``EVAL_NOISE_SEED + i``."""
CONTROL_RADIUS = 6
"""Radius (px, of 64) of the control image's disc: smaller than every shape, so it shows no size."""
EMBEDDING_CHANNELS = (16, 32, 64)
"""Widths of the control image's embedding: two stride-2 steps, the shapes VAE's 4x (SD's four widths give 8x)."""
CONTROL_COLUMN = "conditioning_image"
"""Metadata column of the control image (diffusers' ``train_controlnet.py`` default)."""


# ------------------------------------------------------------------------------------------------ data


def shape_centre(image: Image.Image) -> tuple[float, float]:
    """``(x, y)`` centroid of the pixels that differ from the world's background: where the shape is."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    mask = np.abs(pixels - np.array(shapes.BACKGROUND, dtype=np.int16)).sum(axis=2) > 60
    if not mask.any():
        raise ValueError("no shape in the image: every pixel is background")
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def control_image(centre: tuple[float, float], size: int = shapes.IMAGE_SIZE) -> Image.Image:
    """A white disc of :data:`CONTROL_RADIUS` on black at ``centre``: the control image (RGB, ``size`` px)."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    x, y = centre
    r = CONTROL_RADIUS * size / shapes.IMAGE_SIZE
    ImageDraw.Draw(image).ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    return image


def positionless(scene: shapes.Scene) -> str:
    """The scene's caption without its position: ``"a small red circle"``."""
    return f"a {scene.size} {scene.color} {scene.shape}"


def control_pairs(seed: int, start: int, count: int) -> tuple[list[Image.Image], list[Image.Image], list[shapes.Scene]]:
    """Pairs ``start .. start+count-1`` of a world seed: images, their control images and their scenes."""
    images, controls, scenes = [], [], []
    for index in range(start, start + count):
        image, scene = shapes.sample(seed, index)
        images.append(image)
        controls.append(control_image(shape_centre(image)))
        scenes.append(scene)
    return images, controls, scenes


def control_tensor(controls: Sequence[Image.Image]) -> torch.Tensor:
    """Control images as the pipelines feed them: (N, 3, H, W) in [0, 1] (no normalisation)."""
    return torch.from_numpy((shapes.to_array(controls) + 1) / 2)


def export_control_data(folder: str | Path, count: int, seed: int) -> Path:
    """Writes ``count`` pairs of world seed ``seed`` with their control images and position-less captions:
    ``NNNNNN.png``, ``NNNNNN-control.png`` and ``metadata.csv`` (``file_name,text,conditioning_image``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["file_name", "text", CONTROL_COLUMN])
        for start in range(0, count, 256):
            images, controls, scenes = control_pairs(seed, start, min(256, count - start))
            for i, (image, control, scene) in enumerate(zip(images, controls, scenes, strict=True)):
                name = f"{start + i:06d}"
                image.save(folder / f"{name}.png")
                control.save(folder / f"{name}-control.png")
                rows.writerow([f"{name}.png", positionless(scene), f"{name}-control.png"])
    return folder


# ------------------------------------------------------------------------------------------------ training


@dataclass
class ControlNetRecipe:
    """Every setting of a run (the script's flags)."""

    out: str
    steps: int = 400
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 50
    seed: int = 0
    threads: int | None = None
    """Torch CPU threads (None: torch's default)."""


def build_controlnet(unet) -> ControlNetModel:
    """The untrained ControlNet of a shapes U-Net: ``ControlNetModel.from_unet`` with a 4x control embedding."""
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)


def train_controlnet(recipe: ControlNetRecipe, command: str = "") -> dict[str, Any]:
    """Trains a ControlNet on the bundled teacher and writes it to ``recipe.out`` (atomically) with its record.

    Returns:
        The record written to ``bksdm_toy.json``: settings, losses, command, wall and CPU time, machine.
    """
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    pipe = load_teacher()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    torch.manual_seed(recipe.seed)
    controlnet = build_controlnet(pipe.unet).train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=recipe.lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup, recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    captions = sorted({positionless(s) for s in shapes.all_scenes()}) + [""]
    with torch.no_grad():
        states = pipe.encode_prompt(captions, "cpu", 1, False)[0]  # (25, 77, D); the last row is ""
    index = {c: i for i, c in enumerate(captions)}
    scale = pipe.vae.config.scaling_factor
    losses: list[float] = []
    began, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(recipe.steps), desc="controlnet", mininterval=5)
    for step in bar:
        images, controls, scenes = control_pairs(TRAIN_SEED, step * recipe.batch, recipe.batch)
        with torch.no_grad():
            latents = pipe.vae.encode(torch.from_numpy(shapes.to_array(images))).latent_dist.sample(generator) * scale
        rows = torch.tensor([index[positionless(s)] for s in scenes])
        rows[torch.rand(len(rows), generator=generator) < CAPTION_DROPOUT] = len(captions) - 1
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = sample_timesteps(recipe.batch, HIGH_T_SHARE, HIGH_T_FROM, generator)
        noisy, target = UNET.noise(scheduler, latents, noise, timesteps)
        text = states[rows]
        down, mid = controlnet(noisy, timesteps, text, control_tensor(controls), return_dict=False)
        pred = pipe.unet(
            noisy, timesteps, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = F.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        if (step + 1) % 100 == 0:
            logger.info("step %d/%d: loss %.4f (mean of 50)", step + 1, recipe.steps, np.mean(losses[-50:]))
    controlnet.eval()
    record = {
        "training": {
            "command": command,
            "settings": asdict(recipe),
            "wall_time_s": round(time.perf_counter() - began, 1),
            "cpu_time_s": round(time.process_time() - cpu, 1),
            "machine": machine(),
            "data": f"shapes world seed {TRAIN_SEED}, fresh pairs every step; control: disc of radius "
            f"{CONTROL_RADIUS} px at the shape's centre; position-less prompts, {CAPTION_DROPOUT:.0%} dropped",
            "loss_first_50": float(np.mean(losses[:50])),
            "loss_last_50": float(np.mean(losses[-50:])),
        },
        "teacher": "bksdm.world.teacher (the bundled shapes teacher)",
    }
    with atomic_dir(Path(recipe.out)) as partial:
        controlnet.save_pretrained(partial, safe_serialization=True)
        (partial / MODEL_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


# ------------------------------------------------------------------------------------------------ evaluation


def controlnet_pipeline(pipe, controlnet: ControlNetModel) -> StableDiffusionControlNetPipeline:
    """The stock ControlNet pipeline from a text-to-image pipeline's components (its U-Net: teacher or student)."""
    parts = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    out = StableDiffusionControlNetPipeline(
        **parts, controlnet=controlnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    out.set_progress_bar_config(disable=True)
    return out


@torch.no_grad()
def placement(
    pipe: StableDiffusionControlNetPipeline,
    count: int = 96,
    *,
    steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """How well a ControlNet pipeline puts the shape where the control says, on held-out scenes.

    Scene ``i`` of world seed :data:`EVAL_SEED` gives the prompt (:func:`positionless`) and the control (a disc at
    its shape's centre); the image starts from noise seed ``EVAL_NOISE_SEED + i``. The classifier then reads each
    image.

    Returns:
        ``position_accuracy`` (share of images with the shape in the control's quadrant), ``attribute_accuracy``
        (shape, colour and size as prompted), ``all_accuracy`` (all four), ``count`` and the seconds taken.
    """
    from bksdm.world.classifier import load_classifier, predict

    _, controls, scenes = control_pairs(EVAL_SEED, 0, count)
    images: list[Image.Image] = []
    began = time.perf_counter()
    for start in range(0, count, batch_size):
        end = min(start + batch_size, count)
        generators = [torch.Generator().manual_seed(EVAL_NOISE_SEED + i) for i in range(start, end)]
        images += pipe(
            [positionless(s) for s in scenes[start:end]],
            image=controls[start:end],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=shapes.IMAGE_SIZE,
            width=shapes.IMAGE_SIZE,
        ).images
    seconds = time.perf_counter() - began
    read = predict(load_classifier(), images)
    position = [p.position == s.position for p, s in zip(read, scenes, strict=True)]
    rest = [(p.shape, p.color, p.size) == (s.shape, s.color, s.size) for p, s in zip(read, scenes, strict=True)]
    return {
        "position_accuracy": float(np.mean(position)),
        "attribute_accuracy": float(np.mean(rest)),
        "all_accuracy": float(np.mean([a and b for a, b in zip(position, rest, strict=True)])),
        "count": count,
        "seconds": round(seconds, 1),
    }


def parse_args(argv: Sequence[str] | None = None) -> ControlNetRecipe:
    """The script's command line as a :class:`ControlNetRecipe`."""
    d = ControlNetRecipe(out="")
    parser = argparse.ArgumentParser(
        prog="python -m bksdm.world.train_controlnet",
        description="Train a small ControlNet on the bundled shapes teacher: the control image (a disc at the "
        "shape's centre) says where the shape goes.",
    )
    parser.add_argument("--out", required=True, help="ControlNetModel folder to write")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's)")
    return ControlNetRecipe(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = parse_args(argv)
    command = shlex.join(["python", "-m", "bksdm.world.train_controlnet", *(sys.argv[1:] if argv is None else argv)])
    record = train_controlnet(recipe, command)
    pipe = controlnet_pipeline(load_teacher(), ControlNetModel.from_pretrained(recipe.out))
    record["evaluation"] = placement(pipe)
    write_text(Path(recipe.out) / MODEL_RECORD_FILE, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
