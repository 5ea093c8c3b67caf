"""The training loop both shapes teachers share (:mod:`bksdm.world.train_teacher`, the U-Net;
:mod:`bksdm.world.train_dit_teacher`, the SD3-shaped transformer).

AdamW with a cosine schedule after a linear warm-up, gradients clipped to norm 1, an EMA of every weight (decay
1 - (1 + step)^-3/4 capped at 0.9995: the average forgets the random init quickly, which matters in a run of a few
thousand steps), a smoothed loss in the log, a checkpoint every N steps that a rerun resumes from (tensors and plain
values, loaded with ``weights_only``: it runs no code), and an optional quick held-out evaluation with the EMA
weights. Each teacher brings its modules and the loss of one batch; the loop owns the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from bksdm.artifacts import atomic_file
from bksdm.world import shapes
from bksdm.world.teacher_eval import EVAL_SEED, held_out_images, prompt_accuracy, save_grid

logger = logging.getLogger("bksdm.world.teacher_loop")

QUICK_EVAL_SCENES = 24
"""Held-out scenes of a mid-training check (always the same ones)."""


class Clock:
    """Wall and CPU seconds a run has spent, carried across resumes (checkpoints store :meth:`spent`)."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self.before = {"wall": 0.0, "cpu": 0.0}
        """What earlier processes of this run had spent when the checkpoint resumed from was written."""

    def spent(self) -> dict[str, float]:
        return {
            "wall": self.before["wall"] + time.perf_counter() - self._wall,
            "cpu": self.before["cpu"] + time.process_time() - self._cpu,
        }


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs of a teacher recipe."""

    name: str
    """What is trained, for the progress bar and the log (``unet``, ``transformer``)."""
    steps: int
    lr: float
    warmup: int
    seed: int
    checkpoint_every: int
    eval_every: int = 0
    """Quick evaluation every N steps, at checkpoints only (0: never)."""


def train_modules(
    modules: Mapping[str, nn.Module],
    settings: LoopSettings,
    batch_loss: Callable[[torch.Generator], torch.Tensor],
    state_file: Path,
    clock: Clock,
    quick_eval: Callable[[int], None] | None = None,
) -> None:
    """Trains ``modules`` jointly; leaves the EMA weights in them, in eval mode and frozen.

    Args:
        modules: The trained modules by name (the names key the checkpoint).
        settings: Steps, optimiser and checkpoint settings.
        batch_loss: The loss of one batch, drawing all its randomness from the generator it is given (which the
            checkpoint saves, so a resumed run draws what the uninterrupted one would have).
        state_file: The checkpoint, resumed from when present and written every ``settings.checkpoint_every``
            steps (not at the last one).
        clock: The run's clock (its time so far is saved with the checkpoint and restored from it).
        quick_eval: Called with the step number at every ``settings.eval_every``-th checkpoint, with the EMA
            weights in the modules and the modules in eval mode; the training weights come back after.
    """
    params = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999), weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup, settings.steps)
    ema = EMAModel(params, decay=0.9995, use_ema_warmup=True, power=3 / 4)
    generator = torch.Generator().manual_seed(settings.seed)
    start = 0
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)  # tensors and plain values only: runs no code
        for name, module in modules.items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        start, clock.before = state["step"], state.get("spent", clock.before)
        logger.info("resumed %s training at step %d", " + ".join(modules), start)
    for module in modules.values():
        module.train()
    bar = tqdm(range(start, settings.steps), desc=settings.name, initial=start, total=settings.steps, mininterval=5)
    running, began = None, time.perf_counter()
    for step in bar:
        loss = batch_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        done = step + 1
        if done % 100 == 0 or done == settings.steps:
            rate = (done - start) / (time.perf_counter() - began)
            logger.info(
                "%s step %d/%d: loss %.4f (smoothed), %.2f steps/s", settings.name, done, settings.steps, running, rate
            )
        if done % settings.checkpoint_every == 0 and done < settings.steps:
            state = {name: module.state_dict() for name, module in modules.items()}
            state.update(optimizer=optimizer.state_dict(), schedule=schedule.state_dict(), ema=ema.state_dict())
            state.update(generator=generator.get_state(), step=done, spent=clock.spent())
            with atomic_file(state_file) as partial:  # an interruption never leaves half a checkpoint
                torch.save(state, partial)
            if quick_eval is not None and settings.eval_every and done % settings.eval_every == 0:
                ema.store(params)
                ema.copy_to(params)
                for module in modules.values():
                    module.eval()
                quick_eval(done)
                ema.restore(params)
                for module in modules.values():
                    module.train()
    ema.copy_to(params)
    for module in modules.values():
        module.eval().requires_grad_(False)


def quick_evaluation(pipe, step: int, guidances: Sequence[float], grid_dir: str | None) -> None:
    """A mid-training check of a shapes pipeline: prompt accuracy (and per attribute, where the classifier is
    shipped) on :data:`QUICK_EVAL_SCENES` held-out pairs at each guidance scale, logged; grids saved to
    ``grid_dir``."""
    picks = np.random.default_rng(0).choice(len(shapes.all_scenes()), size=QUICK_EVAL_SCENES, replace=False)
    scenes = [shapes.all_scenes()[i] for i in picks]
    for guidance in guidances:
        with torch.no_grad():
            images = held_out_images(pipe, scenes, [EVAL_SEED + int(i) for i in picks], guidance)
        accuracy = prompt_accuracy(images, scenes)
        logger.info(
            "step %d: quick eval (%d scenes, guidance %g): prompt accuracy %s", step, len(scenes), guidance, accuracy
        )
        try:
            from bksdm.world import classifier

            per = classifier.attribute_accuracy(classifier.load_classifier(), images, scenes)
            logger.info("step %d: per attribute %s", step, {k: round(v, 3) for k, v in per.items()})
        except FileNotFoundError:
            pass
        if grid_dir:
            save_grid(images, Path(grid_dir) / f"step{step:06d}_g{guidance:g}.png")
