"""The settings of an SD3-shaped teacher training run (:mod:`bksdm.world.train_dit_teacher`).

:class:`DitTeacherRecipe` holds every setting, one field per flag of ``python -m bksdm.world.train_dit_teacher``
(:func:`parse_args` reads them); the reasons for the defaults are in :mod:`bksdm.world.train_dit_teacher` and
:mod:`bksdm.world.dit_teacher`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from bksdm.world.dit_teacher import NUM_BLOCKS, SHIFT
from bksdm.world.teacher import TEACHER_DIR
from bksdm.world.teacher_eval import GUIDANCE_SCALES


@dataclass
class DitTeacherRecipe:
    """Every setting of a run (the script's flags: ``--train-images`` → ``train_images``)."""

    out: str
    """Pipeline folder to write (shipped: ``src/bksdm/world/assets/teacher-sd3``)."""
    work_dir: str = "runs/toy-teacher-sd3"
    """Checkpoints and the latent cache of this run, for resuming."""
    vae_from: str = str(TEACHER_DIR)
    """Pipeline folder whose VAE is reused (the U-Net teacher's)."""
    train_images: int = 20_000
    """Training images of world seed 2 (their latents are cached)."""
    latent_std: float = 1.0
    """Standard deviation of the scaled latents (SD3's convention: 1)."""
    blocks: int = NUM_BLOCKS
    heads: int = 2
    """Attention heads of 32 channels (the transformer's width is 32 x heads)."""
    shift: float = SHIFT
    """The scheduler's timestep shift, saved with the pipeline: sampling and the training density use it."""
    steps: int = 2500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    high_t_share: float = 0.0
    """Share of timesteps drawn uniformly from [high_t_from, 1) instead of the shifted logit-normal."""
    high_t_from: float = 0.8
    seed: int = 0
    """Seed of the initial weights and of the training noise."""
    checkpoint_every: int = 250
    eval_every: int = 0
    """Quick held-out check every N steps (0: never)."""
    guidance: list[float] = field(default_factory=lambda: list(GUIDANCE_SCALES))
    grid_dir: str | None = None
    threads: int | None = None
    eval_only: bool = False


def parse_args(argv: Sequence[str] | None = None) -> DitTeacherRecipe:
    """The script's command line as a :class:`DitTeacherRecipe` (defaults are the recipe's)."""
    d = DitTeacherRecipe(out="")
    parser = argparse.ArgumentParser(
        prog="python -m bksdm.world.train_dit_teacher",
        description="Train the SD3-shaped shapes teacher from scratch on a CPU and save it as a "
        "StableDiffusion3Pipeline folder.",
    )
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--work-dir", default=d.work_dir, help="checkpoints and latents, for resuming (%(default)s)")
    parser.add_argument("--vae-from", default=d.vae_from, help="pipeline folder whose VAE is reused")
    parser.add_argument("--train-images", type=int, default=d.train_images)
    parser.add_argument("--latent-std", type=float, default=d.latent_std, help="std of the scaled latents")
    parser.add_argument("--blocks", type=int, default=d.blocks, help="joint transformer blocks")
    parser.add_argument("--heads", type=int, default=d.heads, help="attention heads of 32 channels")
    parser.add_argument("--shift", type=float, default=d.shift, help="the scheduler's timestep shift")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--high-t-share", type=float, default=d.high_t_share, help="share of uniform high-noise s")
    parser.add_argument("--high-t-from", type=float, default=d.high_t_from, help="lowest s of that range")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="quick check every N steps (0: never)")
    parser.add_argument("--guidance", type=float, nargs="+", default=d.guidance)
    parser.add_argument("--grid-dir", default=d.grid_dir, help="also save sample grids here")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --out and update its bksdm_toy.json")
    return DitTeacherRecipe(**vars(parser.parse_args(argv)))
