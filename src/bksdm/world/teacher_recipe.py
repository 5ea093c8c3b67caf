"""The settings of a shapes-teacher training run (:mod:`bksdm.world.train_teacher`), and the choices behind them.

:class:`TeacherRecipe` holds every setting, one field per flag of ``python -m bksdm.world.train_teacher``
(:func:`parse_args` reads them); the constants document the measured reasons for the defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from bksdm.world.teacher_eval import GUIDANCE_SCALES

VAE_WORLD_SEED = 1
"""World seed of the VAE's training images."""
UNET_WORLD_SEED = 2
"""World seed of the text encoder's and U-Net's training pairs."""
CAPTION_DROPOUT = 0.1
"""Share of training captions replaced by "" so the same model also predicts unconditionally (CFG)."""
MIN_SNR_GAMMA = 5.0
"""Cap of the x0-space loss weight of the epsilon objective (``--prediction-type epsilon`` only)."""
LATENT_SCALE = 0.35
"""Standard deviation of the scaled latents (``scaling_factor`` = LATENT_SCALE / std of the raw latents).

SD scales its latents to unit variance. Here that leaks the answer: a shapes latent is one small, high-contrast
blob on a flat background, and at unit variance SD's schedule never hides it, so the U-Net learns to read the
shape's position off the noise instead of the prompt (measured: an unconditional model trained that way finds the
right quadrant in 66% of x_t at t=961, the first PNDM step, and 55% at t=999; chance is 25%). Sampling from pure
noise then puts shapes wherever the noise suggests: position accuracy stayed at chance after 2000 steps. Scaling
the data down is Chen (2023)'s input scaling, equivalent to shifting SD's log-SNR curve by 2 ln(0.35) = -2.1; the
noise schedule itself stays SD's. At 0.35 the same measurement gives 31% at t=961: the prompt has to decide."""
SNR_FLOOR = 0.2
"""Floor of the x0-space loss weight of the epsilon objective (``--prediction-type epsilon`` only)."""
HIGH_T_SHARE = 0.3
HIGH_T_FROM = 800
"""30% of every batch has timesteps in [800, 1000), where the layout is decided; the rest is uniform."""


@dataclass
class TeacherRecipe:
    """Every setting of a teacher training run (the script's flags, ``--vae-steps`` → ``vae_steps``)."""

    out: str
    """Pipeline folder to write (shipped: ``src/bksdm/world/assets/teacher``)."""
    work_dir: str = "runs/toy-teacher"
    """Checkpoints of this run, for resuming."""
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    """Weight of the KL term per latent value."""
    train_images: int = 20_000
    """U-Net training images (their latents are cached)."""
    unet_steps: int = 2500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    prediction_type: str = "v_prediction"
    """U-Net objective: ``v_prediction`` or ``epsilon``."""
    latent_scale: float = LATENT_SCALE
    """Standard deviation of the scaled latents."""
    snr_floor: float = SNR_FLOOR
    """Floor of the x0-space loss weight (epsilon objective only)."""
    high_t_share: float = HIGH_T_SHARE
    """Share of timesteps drawn from the top range."""
    high_t_from: int = HIGH_T_FROM
    """Lowest timestep of that top range."""
    seed: int = 0
    """Seed of the initial weights and of the training noise."""
    checkpoint_every: int = 250
    eval_every: int = 0
    """Quick held-out check every N steps (0: never)."""
    guidance: list[float] = field(default_factory=lambda: list(GUIDANCE_SCALES))
    """Guidance scales the final evaluation compares."""
    grid_dir: str | None = None
    """Also save sample grids here."""
    threads: int | None = None
    """Torch CPU threads (None: torch's default)."""
    eval_only: bool = False
    """Only evaluate ``out`` and update its ``bksdm_toy.json``."""


def parse_args(argv: Sequence[str] | None = None) -> TeacherRecipe:
    """The script's command line as a :class:`TeacherRecipe` (defaults are the recipe's)."""
    d = TeacherRecipe(out="")
    parser = argparse.ArgumentParser(
        prog="python -m bksdm.world.train_teacher",
        description="Train the embedded shapes teacher from scratch on a CPU and save it as a diffusers pipeline "
        "folder.",
    )
    parser.add_argument(
        "--out", required=True, help="pipeline folder to write (shipped: src/bksdm/world/assets/teacher)"
    )
    parser.add_argument(
        "--work-dir", default=d.work_dir, help="checkpoints of this run, for resuming (default %(default)s)"
    )
    parser.add_argument("--vae-steps", type=int, default=d.vae_steps)
    parser.add_argument("--vae-batch", type=int, default=d.vae_batch)
    parser.add_argument("--vae-lr", type=float, default=d.vae_lr)
    parser.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL term per latent value")
    parser.add_argument(
        "--train-images", type=int, default=d.train_images, help="U-Net training images (latents cached)"
    )
    parser.add_argument("--unet-steps", type=int, default=d.unet_steps)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument(
        "--prediction-type", default=d.prediction_type, choices=["v_prediction", "epsilon"], help="U-Net objective"
    )
    parser.add_argument("--latent-scale", type=float, default=d.latent_scale, help="std of the scaled latents")
    parser.add_argument("--snr-floor", type=float, default=d.snr_floor, help="floor of the x0-space loss weight")
    parser.add_argument("--high-t-share", type=float, default=d.high_t_share, help="share of timesteps from the top")
    parser.add_argument("--high-t-from", type=int, default=d.high_t_from, help="lowest timestep of that top range")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the initial weights and of training noise")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="quick held-out check every N steps (0: never)"
    )
    parser.add_argument("--guidance", type=float, nargs="+", default=d.guidance)
    parser.add_argument("--grid-dir", default=d.grid_dir, help="also save sample grids here")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --out and update its bksdm_toy.json")
    return TeacherRecipe(**vars(parser.parse_args(argv)))
