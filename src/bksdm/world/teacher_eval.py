"""How a trained shapes teacher is judged, and the record it ships with (``bksdm_toy.json``).

Stage 3 of :mod:`bksdm.world.train_teacher`: every scene of :func:`shapes.all_scenes` once, scene ``i`` with noise
seed :data:`EVAL_SEED` ``+ i``, 25 PNDM steps, several guidance scales, judged by the attribute classifier
(:mod:`bksdm.world.classifier`); the best scale is written into the settings file as the recommended one, beside
the provenance of the run (command, time, machine, parameter counts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from bksdm.artifacts import MODEL_RECORD_FILE, atomic_file, write_text
from bksdm.eval.generate import generate_images
from bksdm.profiling import count_params, cpu_model
from bksdm.world import shapes

logger = logging.getLogger("bksdm.world.train_teacher")

EVAL_SEED = 10_000
"""Held-out evaluation: scene i of :func:`shapes.all_scenes` is generated with noise seed ``EVAL_SEED + i``."""
GUIDANCE_SCALES = (2.0, 3.0, 5.0, 7.5)
"""Guidance scales compared by the final evaluation."""


def held_out_images(
    pipe: StableDiffusionPipeline,
    scenes: Sequence[shapes.Scene],
    seeds: Sequence[int],
    guidance_scale: float,
    num_inference_steps: int = 25,
    batch_size: int = 32,
) -> list[Image.Image]:
    """One image per (scene caption, noise seed), each seeded on its own so results do not depend on batching
    (:func:`bksdm.eval.generate.generate_images` on the scenes' captions)."""
    return generate_images(
        pipe,
        [scene.caption for scene in scenes],
        seeds,
        steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )


def prompt_accuracy(images: Sequence[Image.Image], scenes: Sequence[shapes.Scene]) -> float | None:
    """Share of images whose every attribute the classifier reads back as prompted; None without a classifier."""
    try:
        from bksdm.world import classifier

        model = classifier.load_classifier()
    except (ImportError, FileNotFoundError) as err:
        logger.warning("no attribute classifier (%s): prompt accuracy not measured", err)
        return None
    return float(classifier.prompt_accuracy(model, list(images), [scene.caption for scene in scenes]))


def evaluate(pipe: StableDiffusionPipeline, guidance_scales: Sequence[float], grid_dir: str | None) -> dict[str, Any]:
    """Prompt accuracy of every guidance scale on the 96 held-out pairs (scene i, noise seed EVAL_SEED + i).

    Returns:
        ``{str(guidance_scale): accuracy or None}``; with ``grid_dir``, each scale's images are saved there too.
    """
    scenes = shapes.all_scenes()
    seeds = [EVAL_SEED + i for i in range(len(scenes))]
    results: dict[str, Any] = {}
    for guidance in guidance_scales:
        began = time.perf_counter()
        images = held_out_images(pipe, scenes, seeds, guidance)
        results[str(guidance)] = prompt_accuracy(images, scenes)
        logger.info(
            "guidance %.1f: prompt accuracy %s (%.0f s)", guidance, results[str(guidance)], time.perf_counter() - began
        )
        if grid_dir:
            save_grid(images, Path(grid_dir) / f"eval_guidance{guidance:g}.png")
    return results


def save_grid(images: Sequence[Image.Image], path: Path, columns: int = 8) -> None:
    """Save images as one grid PNG (row-major), for looking at by eye."""
    side = images[0].width
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * side, rows * side), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * side, (i // columns) * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        grid.save(partial, format="PNG")


def machine() -> str:
    """A one-line description of this machine's CPU, for the provenance record."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def write_settings(
    out: Path, accuracies: dict[str, Any], record: dict[str, Any], scheduler: str = "PNDMScheduler (SD-v1.4's)"
) -> dict[str, Any]:
    """Write ``bksdm_toy.json``: sampling settings (the best measured guidance scale) plus provenance.

    Args:
        out: The teacher's pipeline folder; an existing settings file there is updated, not replaced.
        accuracies: :func:`evaluate`'s result.
        record: Further top-level entries (``training``, ``parameters``) to set.
        scheduler: The sampler the folder saves, as the record names it.

    Returns:
        The settings as written.
    """
    file = out / MODEL_RECORD_FILE
    settings = json.loads(file.read_text()) if file.is_file() else {}
    measured = {g: a for g, a in accuracies.items() if a is not None}
    sampling = settings.get("sampling", {"num_inference_steps": 25, "guidance_scale": 5.0})
    if measured:  # the best scale; ties go to the lower one (less oversaturation)
        best = max(sorted(measured, key=float), key=lambda g: measured[g])
        sampling["guidance_scale"] = float(best)
    settings["sampling"] = {**sampling, "scheduler": f"{scheduler}, as saved", "height": 64, "width": 64}
    settings["evaluation"] = {
        "pairs": f"every scene of bksdm.world.shapes.all_scenes() once, scene i with noise seed {EVAL_SEED} + i",
        "num_inference_steps": 25,
        "metric": "prompt accuracy: share of images whose four attributes bksdm.world.classifier reads as prompted",
        "prompt_accuracy_by_guidance_scale": accuracies,
    }
    settings.update(record)
    write_text(file, json.dumps(settings, indent=2) + "\n")
    return settings


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of every model of a pipeline (denoiser, text encoders, VAE), for the provenance record."""
    return {name: count_params(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
