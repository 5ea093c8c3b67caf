"""The distillation config: typed dataclasses mirrored by YAML, checked in full before any work starts.

A recipe file (``configs/distill/*.yaml``) has up to five sections, ``model``, ``data``, ``loss``, ``optim`` and
``train``, each holding fields of the dataclass of the same name; whatever a file leaves out keeps its default,
and the defaults are the BK-SDM paper's recipe (Kim et al., ECCV 2024, Sec. 4; REFERENCE.md step 5).
:func:`load_config` reads a file, applies dotted ``key=value`` overrides and validates everything at once:
unknown sections and keys (with a "did you mean"), wrong types, choices, ranges and a few cross-field rules all
land in one :class:`~bksdm.train.settings.ConfigError` that names each dotted key. :func:`save_config` writes
the resolved config in a form :func:`load_config` reads back to an equal object; the recipe saves it next to every
checkpoint. The machinery (YAML quirks such as ``5e-5`` read as a string, type conversion, messages) is
:mod:`bksdm.train.settings`, shared with the other recipes; this module holds the distill schema.

Relative paths in a config are relative to the working directory the command runs in, not to the YAML file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bksdm.plan.spec import ALL_PRESETS
from bksdm.train.settings import (
    Range,
    Schema,
    load_settings,
    save_settings,
    settings_from_dict,
    settings_to_dict,
    suggest,
    validate_settings,
)

__all__ = [
    "SCHEMA",
    "DataConfig",
    "DistillConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "validate_config",
]


@dataclass
class ModelConfig:
    """Which teacher to distil and how the student is made from it."""

    teacher: str | None = None
    """Teacher pipeline: a Hugging Face hub id or a local diffusers folder, with a U-Net (SD-v1/v2, SDXL) or a
    diffusion transformer (SD3 / SD3.5, FLUX.1). Paper: ``CompVis/stable-diffusion-v1-4`` (and
    ``stabilityai/stable-diffusion-2-1-base`` / ``-2-1`` for the v2 models). None: left to the trainer."""
    plan: str = "bk-small"
    """Which blocks the student keeps: a preset (U-Nets: ``bk-base``, ``bk-small``, ``bk-tiny``; transformers:
    ``keep-half``, ``keep-two-thirds``, ``keep-third``; any: ``identity``) or a plan YAML file. Paper: one of the
    three BK presets. Ignored when ``student`` is set (unless the student folder records no plan)."""
    student: str | None = None
    """An existing student to continue from (a pipeline folder written by ``bksdm prune``, or its ``unet/`` or
    ``transformer/`` folder); when set it replaces plan-based surgery. None (paper): build the student from
    ``teacher`` and ``plan``."""
    init: str = "teacher"
    """Start of the kept blocks: ``teacher`` (copy the teacher's weights; paper) or ``random`` (an ablation)."""
    allow_partial_init: bool = False
    """Let student tensors whose shape differs from the teacher's start from random weights. Paper: not needed
    (False), every BK preset is filled from the teacher exactly."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the teacher. None: the default branch."""
    variant: str | None = None
    """Weight variant of the teacher's files, e.g. ``fp16``. None: the full-precision files."""


@dataclass
class DataConfig:
    """Image–text pairs and how they are turned into training samples."""

    train: str | None = None
    """Training pairs: a folder of images with ``metadata.csv`` or ``metadata.jsonl``, ``hf:NAME`` for a hub
    dataset, or a webdataset shard pattern such as ``shards/{00000..00099}.tar``. Paper: 212,776 pairs of
    LAION-Aesthetics V2 6.5+ (or 2,256,472 pairs of V2 6.25+). None: left to the trainer."""
    cache: str | None = None
    """A folder written by ``bksdm cache`` (precomputed latents and text embeddings); when set, ``train`` is not
    read. None (paper): encode images and captions on the fly."""
    image_column: str = "file_name"
    """Metadata column (or hub dataset feature) holding the image. Paper's data: ``file_name``."""
    caption_column: str = "text"
    """Metadata column (or hub dataset feature) holding the caption. Paper's data: ``text``."""
    hf_split: str = "train"
    """Split read when ``train`` is ``hf:NAME``."""
    resolution: int = 512
    """Training image side, in pixels (a multiple of 8: the VAE downsamples by 8). Paper: 512 (768 for the
    768-px SD-v2.1 teacher)."""
    center_crop: bool = True
    """Resize the short side to ``resolution``, then crop the centre (True; paper) rather than a random crop."""
    random_flip: bool = True
    """Flip images horizontally with probability 0.5. Paper: True."""
    num_workers: int = 4
    """Data-loader worker processes per device; 0 loads in the main process. Not part of the paper's recipe."""
    max_samples: int | None = None
    """Use only the first N pairs (for quick runs). None (paper): all of them."""


@dataclass
class LossConfig:
    """Weights of L = λ_task·L_task + λ_out·L_outKD + λ_feat·L_featKD (all MSE; paper Sec. 3.2)."""

    lambda_task: float = 1.0
    """Weight of the task loss: student prediction vs the true noise (or velocity). Paper: 1.0."""
    lambda_out: float = 1.0
    """Weight of output KD: student prediction vs teacher prediction. Paper: 1.0."""
    lambda_feat: float = 1.0
    """Weight of feature KD: summed MSE between matched student and teacher block outputs. Paper: 1.0."""
    feature_sites: str = "blocks"
    """Where feature KD reads: ``blocks`` (paper: every kept stage's output; a transformer's kept blocks, both
    streams) or ``self_attention`` (U-Nets: every kept transformer block's self-attention output, KOALA's choice for
    SDXL students)."""


@dataclass
class OptimConfig:
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = 5e-5
    """Learning rate (per optimizer step). Paper: 5e-5."""
    adam_beta1: float = 0.9
    """AdamW β1. Paper: 0.9."""
    adam_beta2: float = 0.999
    """AdamW β2. Paper: 0.999."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay. Paper: 1e-2."""
    adam_epsilon: float = 1e-8
    """AdamW ε. Paper: 1e-8."""
    use_8bit_adam: bool = False
    """Use bitsandbytes' 8-bit AdamW to save optimizer memory. Paper: False."""
    fused_adam: bool = True
    """Use PyTorch's fused AdamW kernel (CPU and CUDA): the same update as the for-each implementation up to float
    rounding, one kernel over all parameters instead of a loop of small ones (on a 2-core CPU the bk-small
    optimizer step drops from about 2 s to 0.25 s). Ignored with ``use_8bit_adam``."""
    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 turns clipping off. Paper: 1.0."""
    lr_scheduler: str = "constant"
    """Schedule, by diffusers' ``get_scheduler`` name: ``constant``, ``constant_with_warmup``, ``linear`` or
    ``cosine``. Paper: constant."""
    lr_warmup_steps: int = 0
    """Linear warm-up length, in optimizer steps (not with ``constant``). Paper: 0."""
    scale_lr: bool = False
    """Multiply ``lr`` by batch_size × gradient_accumulation_steps × number of processes. Paper: False."""


@dataclass
class TrainConfig:
    """The run: length, batch, precision, EMA, checkpoints, logging and validation."""

    output_dir: str = "runs/distill"
    """Folder for checkpoints, logs, validation images and the final student pipeline."""
    max_steps: int = 50000
    """Length of the run, in optimizer steps (each of ``gradient_accumulation_steps`` micro-batches). Paper:
    50,000."""
    batch_size: int = 64
    """Images per micro-batch per device. Paper: 64."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step. Paper: 4 (so 256 images a step; 2 for the v2 models, 128 a step)."""
    mixed_precision: str = "fp16"
    """Autocast precision of the student: ``no``, ``fp16`` or ``bf16``. Paper: fp16."""
    teacher_dtype: str = "auto"
    """Dtype the frozen teacher (and VAE, text encoders) runs in: ``auto`` (the mixed-precision dtype, fp32 when
    ``mixed_precision`` is ``no``; what the official code does), ``fp32``, ``fp16`` or ``bf16`` (what SD3.5 and
    FLUX.1 teachers were released in; a 12B FLUX.1 teacher takes 24 GB in bf16, 48 GB in fp32)."""
    gradient_checkpointing: bool = True
    """Recompute student activations in the backward pass to save memory. Paper: True."""
    seed: int = 1234
    """Seed of everything random in training (noise, timesteps, data order, random init). Paper: 1234."""
    use_ema: bool = True
    """Keep an exponential moving average of the student weights and save it as the final model. Paper: True."""
    ema_decay: float = 0.9999
    """EMA decay per optimizer step. Paper: 0.9999 (diffusers' EMAModel default in the official code)."""
    checkpoint_every: int = 1000
    """Save a resumable checkpoint every N optimizer steps; 0 saves only at the end. Official scripts: 5000."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep; older ones are deleted."""
    resume: str | None = None
    """Continue a run: ``latest`` (the newest checkpoint in ``output_dir``) or a checkpoint folder. None: start
    fresh."""
    overwrite: bool = False
    """Start afresh in an ``output_dir`` that holds another run, deleting its checkpoints and logs (without it,
    such a folder is refused: the runs would mix)."""
    log_every: int = 10
    """Log losses, learning rate and throughput every N optimizer steps."""
    validate_every: int = 1000
    """Draw ``validation_prompts`` with the (EMA) student every N optimizer steps; 0 never. Official: 500."""
    validation_prompts: list[str] = field(
        default_factory=lambda: [
            "a golden vase with different flowers",
            "a brown and white cat staring off with pretty green eyes",
            "a photo of an astronaut riding a horse on mars",
            "a red double-decker bus driving down a city street at night",
        ]
    )
    """Fixed prompts of the validation grid (the first two are the official code's)."""
    validation_seed: int = 1234
    """Seed of the validation latents, so that grids from different steps are comparable."""
    validation_steps: int = 25
    """Denoising steps per validation image. Paper's evaluation: 25."""
    validation_guidance: float = 7.5
    """Classifier-free guidance scale of validation images. Paper's evaluation: 7.5. FLUX.1-dev takes it as its
    embedded guidance value instead (its model card uses 3.5); FLUX.1-schnell ignores it."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers to log to, any of ``tensorboard`` and ``wandb``; empty logs to the console only."""
    sharding: str = "none"
    """``fsdp``: split the student's weights, gradients, optimizer state and EMA, and the frozen teacher's weights,
    across the processes (PyTorch's FSDP2; launch with ``accelerate launch --multi_gpu --num_processes N``), for
    models whose training does not fit one device; ``none``: every process holds all of it (DDP). Not part of the
    paper's recipe."""
    attention: str = "sdpa"
    """Attention kernel: ``sdpa`` (PyTorch scaled-dot-product attention) or ``default`` (diffusers' plain
    processor). Not part of the paper's recipe; sdpa computes the same attention, faster and in less memory."""
    allow_tf32: bool = True
    """Allow TF32 matrix multiplies on Ampere and newer GPUs (faster fp32). Not part of the paper's recipe."""

    def total_batch_size(self, num_processes: int = 1) -> int:
        """Images per optimizer step over all devices (paper: 64 × 4 × 1 = 256)."""
        return self.batch_size * self.gradient_accumulation_steps * num_processes

    def resolved_teacher_dtype(self) -> str:
        """``teacher_dtype`` with ``auto`` resolved: ``fp32``, ``fp16`` or ``bf16``."""
        if self.teacher_dtype != "auto":
            return self.teacher_dtype
        return {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision)


@dataclass
class DistillConfig:
    """Everything a distillation run needs; the defaults are the BK-SDM paper's recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Teacher and student."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training pairs and transforms."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The run itself."""


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(DistillConfig)}  # type: ignore[misc]
"""Section name → its dataclass, in file order."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": ("teacher", "random"),
    "optim.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.teacher_dtype": ("auto", "fp32", "fp16", "bf16"),
    "train.trackers": ("tensorboard", "wandb"),
    "train.attention": ("sdpa", "default"),
    "train.sharding": ("none", "fsdp"),
    "loss.feature_sites": ("blocks", "self_attention"),
}

_SEED_RANGE = (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")
_RANGES: dict[str, Range] = {
    "data.resolution": (lambda v: v >= 8 and v % 8 == 0, "must be a positive multiple of 8"),
    "data.num_workers": (lambda v: v >= 0, "must be >= 0"),
    "data.max_samples": (lambda v: v >= 1, "must be >= 1 (or null for all)"),
    "loss.lambda_task": (lambda v: v >= 0, "must be >= 0"),
    "loss.lambda_out": (lambda v: v >= 0, "must be >= 0"),
    "loss.lambda_feat": (lambda v: v >= 0, "must be >= 0"),
    "optim.lr": (lambda v: v > 0, "must be > 0"),
    "optim.adam_beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.adam_beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "optim.adam_epsilon": (lambda v: v > 0, "must be > 0"),
    "optim.max_grad_norm": (lambda v: v >= 0, "must be >= 0 (0 turns clipping off)"),
    "optim.lr_warmup_steps": (lambda v: v >= 0, "must be >= 0"),
    "train.max_steps": (lambda v: v >= 1, "must be >= 1"),
    "train.batch_size": (lambda v: v >= 1, "must be >= 1"),
    "train.gradient_accumulation_steps": (lambda v: v >= 1, "must be >= 1"),
    "train.seed": _SEED_RANGE,
    "train.ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.checkpoint_every": (lambda v: v >= 0, "must be >= 0 (0 saves only at the end)"),
    "train.keep_checkpoints": (lambda v: v >= 1, "must be >= 1"),
    "train.log_every": (lambda v: v >= 1, "must be >= 1"),
    "train.validate_every": (lambda v: v >= 0, "must be >= 0 (0 never validates)"),
    "train.validation_seed": _SEED_RANGE,
    "train.validation_steps": (lambda v: v >= 1, "must be >= 1"),
    "train.validation_guidance": (lambda v: v >= 0, "must be >= 0"),
}


def _cross_checks(cfg: DistillConfig, problems: list[str]) -> None:
    """Rules that involve more than one field, or the meaning of a string."""
    m, d, lo, o, t = cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.train
    if m.student is None and m.plan not in ALL_PRESETS and not os.path.exists(m.plan):
        problems.append(
            f"model.plan: '{m.plan}' is neither a preset ({', '.join(ALL_PRESETS)}) nor an existing plan file"
            f"{suggest(m.plan, list(ALL_PRESETS))}"
        )
    if m.student is not None and m.init == "random":
        problems.append("model.init: 'random' conflicts with model.student (an existing student brings its weights)")
    if lo.lambda_task == lo.lambda_out == lo.lambda_feat == 0:
        problems.append("loss: lambda_task, lambda_out and lambda_feat are all 0; nothing would be learned")
    check_run_sections(d, o, t, problems)


def check_run_sections(d: DataConfig, o: OptimConfig, t: Any, problems: list[str]) -> None:
    """The rules every training recipe on these sections shares (distill, lcm): data source, trackers, warm-up."""
    if d.train is not None and d.train.startswith("hf:") and not d.train[3:].strip():
        problems.append("data.train: 'hf:' needs a dataset name, e.g. hf:lambdalabs/naruto-blip-captions")
    if len(set(t.trackers)) < len(t.trackers):
        problems.append(f"train.trackers: lists a tracker twice: {t.trackers}")
    if o.lr_warmup_steps > 0 and o.lr_scheduler == "constant":
        problems.append(
            f"optim.lr_warmup_steps: {o.lr_warmup_steps} has no effect with lr_scheduler 'constant'; "
            "use 'constant_with_warmup' or set it to 0"
        )
    if o.lr_warmup_steps > t.max_steps:
        problems.append(f"optim.lr_warmup_steps: {o.lr_warmup_steps} is longer than train.max_steps ({t.max_steps})")


SCHEMA = Schema(
    root=DistillConfig,
    choices=_CHOICES,
    ranges=_RANGES,
    cross_checks=_cross_checks,
    choice_hints={("train.mixed_precision", "fp32"): "; full precision is 'no'"},
    header="# Resolved bksdm distill config (bksdm.train.config.load_config reads it back).\n",
)
"""The distill recipe's settings schema (:mod:`bksdm.train.settings`)."""


def config_from_dict(
    data: Mapping[str, Any] | None, overrides: Sequence[str] = (), source: str = "config"
) -> DistillConfig:
    """Builds and validates a config from its dict form (the parsed YAML), after applying ``overrides``.

    Args:
        data: Mapping of section name to a mapping of fields; missing sections and fields keep their defaults.
        overrides: Dotted ``section.key=value`` strings, applied on top of ``data`` (which is not modified).
        source: What ``data`` came from, for the error message.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem found, each naming its dotted key.
    """
    return settings_from_dict(SCHEMA, data, overrides, source=source)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Reads a YAML recipe (or starts from the defaults when ``path`` is None) and applies ``overrides``.

    Args:
        path: A YAML file with sections ``model``, ``data``, ``loss``, ``optim``, ``train``; None for the
            defaults (the paper's recipe).
        overrides: Dotted ``section.key=value`` strings, e.g. ``train.max_steps=10``, ``optim.lr=1e-4``,
            ``train.validation_prompts=["a cat","a dog"]``; values are parsed as YAML.

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing or not YAML, or the config has problems (all listed together).
    """
    return load_settings(SCHEMA, path, overrides)


def config_to_dict(cfg: DistillConfig) -> dict[str, dict[str, Any]]:
    """The dict form of a config: sections and fields in declaration order, lists copied."""
    return settings_to_dict(cfg)


def validate_config(cfg: DistillConfig) -> DistillConfig:
    """Checks a config built in code by the same rules as a file; returns an equal, validated copy.

    Raises:
        ConfigError: listing every problem.
    """
    return validate_settings(SCHEMA, cfg)


def save_config(cfg: DistillConfig, path: str | os.PathLike) -> Path:
    """Writes ``cfg`` as YAML (stable key order) that :func:`load_config` reads back to an equal config.

    Written atomically: a crash never leaves half a config.

    Returns:
        The path written.
    """
    return save_settings(SCHEMA, cfg, path)
