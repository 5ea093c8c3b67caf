"""What every training recipe shares besides checkpoints (:mod:`bksdm.train.checkpoints`): the accelerator set-up and
the peak-memory figure of the logs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

__all__ = ["make_accelerator", "peak_memory_mb"]

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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA's allocated maximum on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
