"""What ``bksdm dreambooth`` checks before any work: every setting that needs more than a type (ranges, choices,
combinations), the output folder and ``--resume``, and every instance image, decoded once.

All problems are reported together in one :class:`~bksdm.use.dreambooth.config.DreamBoothError`, each setting named
by its flag (``--steps``), else by its dotted key (``optim.adam_beta1``). The types were checked when the settings
were read (:func:`~bksdm.use.dreambooth.config.load_dreambooth_config`); flags arrive typed by the parser, and a
float flag may still be NaN, which these rules refuse.
"""

from __future__ import annotations

import math
from pathlib import Path

from bksdm.artifacts import IMAGE_SUFFIXES
from bksdm.sampling import SamplingError, check_guidance, check_steps
from bksdm.train.checkpoints import CheckpointError, complete_checkpoints, find_checkpoint
from bksdm.train.data.images import BadRecordError, open_image
from bksdm.use.dreambooth.config import RUN_FILE, DreamBoothConfig, DreamBoothError, get_setting, label
from bksdm.use.dreambooth.data import list_images
from bksdm.use.lora import text_encoder_lora_problem

__all__ = ["check_config"]


def check_config(cfg: DreamBoothConfig) -> list[Path]:
    """Checks every setting that can be checked before loading the model, and lists the instance images.

    Args:
        cfg: The settings, :meth:`~DreamBoothConfig.resolved`.

    Raises:
        DreamBoothError: Listing every problem found, each setting named by its flag (else its dotted key).
    """
    m, lo, d, p, o, t = cfg.model, cfg.lora, cfg.data, cfg.prior, cfg.optim, cfg.train
    required = ("data.instance_dir", "data.instance_prompt", "train.output_dir")
    problems = [f"{label(key)} is required (or {key})" for key in required if get_setting(cfg, key) is None]
    images: list[Path] = []
    if d.instance_dir is not None:
        images = _check_instance_images(Path(d.instance_dir), problems)
    if d.instance_prompt is not None and not d.instance_prompt.strip():
        problems.append("--instance-prompt is empty; give e.g. 'a sks dog'")
    if lo.enabled and m.train_text_encoder:
        problem = text_encoder_lora_problem()
        if problem:
            problems.append(problem)
    if p.enabled and not p.class_prompts:
        problems.append("--prior-preservation needs --class-prompt (the subject's class, e.g. 'a dog')")
    keys = ["train.max_steps", "train.batch_size", "train.gradient_accumulation_steps", "lora.rank"]
    keys += ["prior.sample_batch_size", "train.log_every", "train.keep_checkpoints"]
    keys += ["prior.num_class_images"] if p.enabled else []
    problems += [f"{label(k)} must be at least 1, got {get_setting(cfg, k)}" for k in keys if get_setting(cfg, k) < 1]
    non_negative = ["train.checkpoint_every", "train.validate_every", "optim.lr_warmup_steps", "prior.loss_weight"]
    non_negative += ["optim.max_grad_norm", "optim.weight_decay"]
    # NaN compares false with everything, so each number is checked finite first: a NaN weight trained the
    # model to NaN weights and wrote them.
    finite = ["optim.lr", "lora.alpha", *non_negative, "optim.adam_beta1", "optim.adam_beta2", "optim.adam_epsilon"]
    not_finite = [k for k in finite if get_setting(cfg, k) is not None and not math.isfinite(get_setting(cfg, k))]
    problems += [f"{label(k)} must be a finite number, got {get_setting(cfg, k)}" for k in not_finite]
    problems += [
        f"{label(k)} must not be negative, got {get_setting(cfg, k)}"
        for k in non_negative
        if k not in not_finite and get_setting(cfg, k) < 0
    ]
    if p.loss_weight == 0 and p.enabled:
        problems.append("--prior-loss-weight 0 turns the class loss off: give a weight above 0 (paper: 1.0)")
    for key in ("optim.lr", "lora.alpha", "optim.adam_epsilon"):
        if get_setting(cfg, key) is not None and key not in not_finite and not get_setting(cfg, key) > 0:
            problems.append(f"{label(key)} must be positive, got {get_setting(cfg, key)}")
    for key in ("optim.adam_beta1", "optim.adam_beta2"):
        if key not in not_finite and not 0 <= get_setting(cfg, key) < 1:
            problems.append(f"{key} must be in [0, 1), got {get_setting(cfg, key)}")
    # Class and validation images: the rules of bksdm generate (one set, bksdm.sampling).
    for check, key in ((check_steps, "train.validation_steps"), (check_guidance, "train.validation_guidance")):
        if get_setting(cfg, key) is not None:
            try:
                check(get_setting(cfg, key), label(key))
            except SamplingError as err:
                problems.append(str(err))
    if d.resolution is not None and (d.resolution < 8 or d.resolution % 8):
        problems.append(f"--resolution must be a positive multiple of 8, got {d.resolution}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        problems.append(f"--mixed-precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
    if o.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine"):
        problems.append(
            f"--lr-scheduler must be constant, constant_with_warmup, linear or cosine, not {o.lr_scheduler}"
        )
    if t.output_dir is not None:
        out = Path(t.output_dir)
        if t.resume is None and (complete_checkpoints(out) or (out / RUN_FILE).is_file()):
            problems.append(
                f"--out {out} already holds a DreamBooth run: pass --resume latest to continue it, or choose "
                "another --out"
            )
        if t.resume not in (None, "latest"):
            try:
                find_checkpoint(out, t.resume)
            except CheckpointError as err:
                problems.append(str(err))
    if problems:
        n = len(problems)
        raise DreamBoothError(f"cannot start ({n} problem{'s' * (n != 1)}):\n  - " + "\n  - ".join(problems))
    return images


def _check_instance_images(folder: Path, problems: list[str]) -> list[Path]:
    """The instance images, each decoded once (a handful: it costs nothing and fails before any work)."""
    if not folder.is_dir():
        problems.append(f"--instance-dir {folder}: no such folder; give a folder with the subject's images")
        return []
    images = list_images(folder)
    if not images:
        problems.append(f"--instance-dir {folder}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)})")
    for path in images:
        try:
            open_image(path).load()
        except (BadRecordError, OSError) as err:
            problems.append(f"--instance-dir: {path} is not a readable image ({err}); fix or remove it")
    return images
