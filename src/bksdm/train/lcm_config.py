"""The settings of ``bksdm lcm``: typed sections mirrored by YAML, checked in full before any work starts.

A recipe file (``configs/lcm/*.yaml``) has up to five sections: ``model`` (the pipeline to distil and the output:
a full LCM U-Net or an LCM-LoRA), ``data`` (the image-text pairs or a ``bksdm cache`` folder: the same section as
``bksdm distill``'s, so a cache made for distillation serves here too), ``lcm`` (the consistency objective),
``optim`` and ``train``. The defaults are the LCM paper's objective (Luo et al. 2023, arXiv 2310.04378: guidance
scales 3 to 15 in the pipelines' convention, i.e. ω in [2, 14]; a 50-step DDIM solver, skipping step k = 20; EMA
rate 0.95; Huber loss) with the run of diffusers' full-model LCM example (``train_lcm_distill_sd_wds.py``'s README:
lr 1e-6, no weight decay, batch 12, 1000 steps; its LCM-LoRA example: rank 64, lr 1e-4). The machinery is
:mod:`bksdm.train.settings`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bksdm.train.config import SCHEMA as DISTILL_SCHEMA
from bksdm.train.config import DataConfig, OptimConfig, check_run_sections
from bksdm.train.lcm_step import LOSSES
from bksdm.train.settings import Range, Schema, load_settings, save_settings, settings_to_dict

__all__ = [
    "LCM_LORA_TARGETS",
    "SCHEMA",
    "LcmConfig",
    "LcmModelConfig",
    "LcmObjectiveConfig",
    "LcmOptimConfig",
    "LcmTrainConfig",
    "load_lcm_config",
    "lcm_config_to_dict",
    "save_lcm_config",
]

LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
"""U-Net modules an LCM-LoRA adapts: attention, feed-forward, every ResNet and resampling convolution and the
time projections (diffusers' LCM-LoRA script's default list)."""

MODES = ("full", "lora")


@dataclass
class LcmModelConfig:
    """The pipeline to distil and what comes out."""

    teacher: str | None = None
    """The pipeline whose own U-Net is the ODE-solver teacher and the student's start: a hub id or a local folder
    of an SD-v1/v2 pipeline, a bksdm student (``OUT/student`` of ``bksdm distill``, a ``bksdm prune`` folder), or
    None for the bundled shapes teacher."""
    mode: str = "full"
    """``full``: train every weight of a U-Net with a guidance embedding (``time_cond_proj_dim``) and write a whole
    pipeline with ``LCMScheduler``; ``lora``: train an LCM-LoRA (no guidance embedding) and write
    ``pytorch_lora_weights.safetensors`` for ``load_lora_weights`` beside that pipeline."""
    time_cond_proj_dim: int = 256
    """Width of the full student's guidance embedding (diffusers' ``--unet_time_cond_proj_dim``, 256); its
    projection starts at zero, so the untrained student equals the teacher."""
    lora_rank: int = 64
    """LoRA rank (``mode: lora``). LCM-LoRA: 64."""
    lora_alpha: float = 64.0
    """LoRA alpha; the update is scaled by alpha / rank. LCM-LoRA: 64."""
    lora_targets: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))
    """Module names the LoRA adapts (peft's ``target_modules``, matched at the end of each module's address)."""


@dataclass
class LcmObjectiveConfig:
    """The consistency-distillation objective (LCM, Sec. 4 and Algorithm 1)."""

    guidance_min: float = 3.0
    """Lowest classifier-free guidance scale of the teacher's solver, in the pipelines' convention (1 = no
    guidance; the paper's ω is this minus 1). Paper: ω from 2, so 3."""
    guidance_max: float = 15.0
    """Highest guidance scale. Paper: ω up to 14, so 15. A full student samples at any scale in the range (its
    guidance embedding); an LCM-LoRA learns the range on average (use a narrow one)."""
    num_ddim_timesteps: int = 50
    """Steps of the DDIM schedule the solver walks; the skipping step is k = T / this (T = 1000: k = 20, the
    paper's). ``LCMScheduler`` samples on the same grid (its ``original_inference_steps``)."""
    loss: str = "huber"
    """Distance between the student's and the target's outputs: ``huber`` (pseudo-Huber; the paper's) or ``l2``."""
    huber_c: float = 0.001
    """The pseudo-Huber constant c: ``sqrt(d² + c²) - c``. LCM's released code (and diffusers' ``--huber_c``)."""
    timestep_scaling: float = 10.0
    """s in the boundary scalings c_skip, c_out (LCMScheduler's ``timestep_scaling``: 10)."""
    ema_decay: float = 0.95
    """EMA rate of the target network, per optimizer step (paper: 0.95). 0 makes the target the online student
    itself, as diffusers' LCM-LoRA script (no separate target)."""


@dataclass
class LcmOptimConfig(OptimConfig):
    """AdamW, gradient clipping and the learning-rate schedule (distill's options, LCM's defaults)."""

    lr: float | None = None
    """Learning rate. None: 1e-6 for ``mode: full`` and 1e-4 for ``mode: lora`` (diffusers' LCM examples)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay. diffusers' LCM examples: 0."""

    def resolved_lr(self, mode: str) -> float:
        """``lr``, or the mode's default when it is None."""
        return self.lr if self.lr is not None else {"full": 1e-6, "lora": 1e-4}[mode]


@dataclass
class LcmTrainConfig:
    """The run: length, batch, precision, checkpoints, logging and validation."""

    output_dir: str = "runs/lcm"
    """Folder for checkpoints, logs, validation grids and the final ``student/`` pipeline."""
    max_steps: int = 1000
    """Optimizer steps. diffusers' LCM examples: 1000."""
    batch_size: int = 12
    """Samples per micro-batch per device. diffusers' LCM examples: 12."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: str = "fp16"
    """Autocast precision of the student: ``no``, ``fp16`` (falls back to fp32 without a GPU) or ``bf16``."""
    teacher_dtype: str = "auto"
    """Dtype of the frozen teacher, VAE and text encoder: ``auto`` (the mixed-precision dtype), ``fp32``, ``fp16``
    or ``bf16``."""
    gradient_checkpointing: bool = True
    """Recompute the student's activations in the backward pass to save memory."""
    seed: int = 1234
    """Seed of everything random: data order, timesteps, noise, guidance scales."""
    checkpoint_every: int = 200
    """Save a resumable checkpoint every N optimizer steps; 0 only at the end."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    resume: str | None = None
    """``latest`` (the newest checkpoint in ``output_dir``) or a checkpoint folder; None starts fresh."""
    overwrite: bool = False
    """Start afresh in an ``output_dir`` that holds another run, deleting its checkpoints and logs."""
    log_every: int = 10
    """Log the loss, learning rate and throughput every N optimizer steps."""
    validate_every: int = 200
    """Draw the validation grid every N optimizer steps; 0 never."""
    validation_prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of an astronaut riding a horse on mars",
            "a golden vase with different flowers",
            "a red double-decker bus driving down a city street at night",
        ]
    )
    """Prompts of the validation grid: the teacher at its own steps, then the student at each of
    ``validation_steps`` with ``LCMScheduler``."""
    validation_seed: int = 1234
    """Seed of the validation latents, so grids from different steps compare."""
    validation_steps: list[int] = field(default_factory=lambda: [4, 2, 1])
    """The student's step counts in the grid (LCM's few-step regime)."""
    validation_guidance: float | None = None
    """Guidance scale of the teacher's row and of a full student (fed to its guidance embedding, no classifier-free
    guidance); None: the scale the pipeline's folder records (``bksdm_toy.json``), else 7.5. An LCM-LoRA row is
    drawn at 1 (no guidance), as LCM-LoRA is used."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers (``tensorboard``, ``wandb``); empty logs to the console and metrics.jsonl only."""
    allow_tf32: bool = True
    """Allow TF32 matrix multiplies on Ampere and newer GPUs."""


@dataclass
class LcmConfig:
    """Everything an LCM run needs; the defaults are the LCM paper's objective on diffusers' example run."""

    model: LcmModelConfig = field(default_factory=LcmModelConfig)
    """The pipeline and the output mode."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training pairs or a cache (``bksdm distill``'s data section)."""
    lcm: LcmObjectiveConfig = field(default_factory=LcmObjectiveConfig)
    """The consistency objective."""
    optim: LcmOptimConfig = field(default_factory=LcmOptimConfig)
    """Optimizer and schedule."""
    train: LcmTrainConfig = field(default_factory=LcmTrainConfig)
    """The run itself."""


_SEED_RANGE = (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")
_RANGES: dict[str, Range] = {
    # data.* and optim.* obey distill's rules (the same sections); optim.lr is checked here (None allowed).
    **{k: v for k, v in DISTILL_SCHEMA.ranges.items() if k.startswith(("data.", "optim.")) and k != "optim.lr"},
    "optim.lr": (lambda v: v > 0, "must be > 0 (or null for the mode's default)"),
    "model.time_cond_proj_dim": (lambda v: v >= 2, "must be >= 2"),
    "model.lora_rank": (lambda v: v >= 1, "must be >= 1"),
    "model.lora_alpha": (lambda v: v > 0, "must be > 0"),
    "lcm.guidance_min": (lambda v: v >= 1, "must be >= 1 (1 is no guidance; the paper's ω is the scale minus 1)"),
    "lcm.guidance_max": (lambda v: v >= 1, "must be >= 1 (1 is no guidance; the paper's ω is the scale minus 1)"),
    "lcm.num_ddim_timesteps": (lambda v: v >= 1, "must be >= 1 (the paper: 50)"),
    "lcm.huber_c": (lambda v: v > 0, "must be > 0"),
    "lcm.timestep_scaling": (lambda v: v > 0, "must be > 0"),
    "lcm.ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.max_steps": (lambda v: v >= 1, "must be >= 1"),
    "train.batch_size": (lambda v: v >= 1, "must be >= 1"),
    "train.gradient_accumulation_steps": (lambda v: v >= 1, "must be >= 1"),
    "train.seed": _SEED_RANGE,
    "train.checkpoint_every": (lambda v: v >= 0, "must be >= 0 (0 saves only at the end)"),
    "train.keep_checkpoints": (lambda v: v >= 1, "must be >= 1"),
    "train.log_every": (lambda v: v >= 1, "must be >= 1"),
    "train.validate_every": (lambda v: v >= 0, "must be >= 0 (0 never validates)"),
    "train.validation_seed": _SEED_RANGE,
    "train.validation_steps": (lambda v: len(v) > 0 and min(v) >= 1, "must list step counts of at least 1"),
    "train.validation_guidance": (lambda v: v == 0 or v >= 1, "must be 0, or 1 and above (1: no guidance)"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.mode": MODES,
    "lcm.loss": LOSSES,
    "optim.lr_scheduler": DISTILL_SCHEMA.choices["optim.lr_scheduler"],
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.teacher_dtype": ("auto", "fp32", "fp16", "bf16"),
    "train.trackers": ("tensorboard", "wandb"),
}


def _cross_checks(cfg: LcmConfig, problems: list[str]) -> None:
    """Rules that involve more than one field."""
    m, d, lo, o, t = cfg.model, cfg.data, cfg.lcm, cfg.optim, cfg.train
    if lo.guidance_min > lo.guidance_max:
        problems.append(f"lcm.guidance_min: {lo.guidance_min} is above lcm.guidance_max ({lo.guidance_max})")
    if not d.train and not d.cache:
        problems.append(
            "data: no training data; give data.train (an image-text folder, hf:NAME or shards) or data.cache "
            "(a `bksdm cache` folder)"
        )
    if m.mode == "lora" and not m.lora_targets:
        problems.append("model.lora_targets: empty; a LoRA needs modules to adapt")
    check_run_sections(d, o, t, problems)


SCHEMA = Schema(
    root=LcmConfig,
    choices=_CHOICES,
    ranges=_RANGES,
    cross_checks=_cross_checks,
    choice_hints={("train.mixed_precision", "fp32"): "; full precision is 'no'"},
    header="# Resolved bksdm lcm config (bksdm.train.lcm_config.load_lcm_config reads it back).\n",
)
"""The LCM recipe's settings schema (:mod:`bksdm.train.settings`)."""


def load_lcm_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> LcmConfig:
    """Reads a YAML recipe (or the defaults when ``path`` is None) and applies dotted ``section.key=value``
    overrides (values parsed as YAML, e.g. ``lcm.guidance_max=4``, ``train.validation_steps=[4,1]``).

    Raises:
        ConfigError: the file is missing or not YAML, or the settings have problems (all listed together).
    """
    return load_settings(SCHEMA, path, overrides)


def lcm_config_to_dict(cfg: LcmConfig) -> dict:
    """The dict form: sections and fields in declaration order."""
    return settings_to_dict(cfg)


def save_lcm_config(cfg: LcmConfig, path: str | os.PathLike) -> Path:
    """Writes ``cfg`` as YAML that :func:`load_lcm_config` reads back to an equal config (atomically)."""
    return save_settings(SCHEMA, cfg, path)
