"""What every training recipe shares: the accelerator set-up and atomic, rotated checkpoints.

``bksdm dreambooth`` uses these; they follow ``bksdm distill``'s conventions exactly (same folder names, same
``trainer_state.json`` marker, so :func:`bksdm.train.find_checkpoint` finds checkpoints of either recipe).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from bksdm.train import CHECKPOINT_PREFIX, STATE_FILE

__all__ = ["make_accelerator", "write_checkpoint"]

logger = logging.getLogger(__name__)


def make_accelerator(
    out: Path, mixed_precision: str, gradient_accumulation_steps: int = 1, trackers: list[str] | None = None
) -> tuple[Accelerator, str]:
    """The Accelerator of a training recipe, and the mixed precision it really uses.

    Args:
        out: The run's output folder (trackers log under ``out/logs``).
        mixed_precision: ``no``, ``fp16`` or ``bf16``. fp16 needs a GPU: without one the run falls back to
            fp32 with a warning.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        trackers: Experiment trackers (``tensorboard``, ``wandb``); none logs to the console only.

    Returns:
        ``(accelerator, mixed precision in use)``.
    """
    mixed = mixed_precision
    if not torch.cuda.is_available() and mixed == "fp16":
        logger.warning("no CUDA device: training in fp32 (mixed precision fp16 needs a GPU)")
        mixed = "no"
    # accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision
    # ("AcceleratorState has already been initialized"), which breaks a second recipe in the same process (the
    # demo's students, a notebook, a test session). The per-run part is dropped; the process group is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Without cpu=True, accelerate ignores a multi-process launch on a machine with no GPU (it runs N
        # independent single-process trainings); with it, processes join one gloo group.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    return accelerator, mixed


def write_checkpoint(
    accelerator: Accelerator, out: Path, step: int, keep: int, write_files: Callable[[Path], None]
) -> Path:
    """Writes ``out/checkpoints/checkpoint-NNNNNNN``: accelerate's state plus ``write_files(folder)``.

    The folder is written under a ``.partial`` name and renamed when complete (``trainer_state.json`` last),
    so a crash mid-write never leaves a folder that ``--resume latest`` would pick; then only the newest
    ``keep`` checkpoints are kept. Every process must call it; ``write_files`` runs on the main process only.

    Returns:
        The checkpoint folder.
    """
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        write_files(partial)
        (partial / STATE_FILE).write_text(json.dumps({"step": step, "time": time.time()}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        done = sorted(root.glob(CHECKPOINT_PREFIX + "*"), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))
        for old in done[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
