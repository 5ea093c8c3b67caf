"""What every training recipe (``distill``, ``dreambooth``) shares besides checkpoints (:mod:`bksdm.train.checkpoints`):
the accelerator set-up, the SIGTERM stop, the loss window of the logs and the peak-memory figure.

A recipe's loop uses them the same way::

    accelerator, mixed = make_accelerator(out, cfg.mixed_precision, accum)
    window = LossWindow(accum)
    with stop_on_sigterm() as stop:
        while step < max_steps:
            ...                                  # one micro step: forward, backward, optimizer
            window.add(losses)                   # on the device: no synchronisation
            if not accelerator.sync_gradients:
                continue
            step += 1
            window.step_done()
            if step % log_every == 0:
                record = window.flush(accelerator)   # the window's one reduction and device->host copy
            ...                                  # checkpoint when due
            if step < max_steps and stop.requested(accelerator):
                raise TrainingStopped(step, write_checkpoint(...))
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from bksdm.signals import handling

__all__ = [
    "LossWindow",
    "StopRequest",
    "TrainingStopped",
    "make_accelerator",
    "peak_memory_mb",
    "status_line",
    "stop_on_sigterm",
]

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


# ------------------------------------------------------------------------------------------------ SIGTERM stop


class TrainingStopped(Exception):
    """The run was asked to stop (SIGTERM: a scheduler's preemption, ``kill``), wrote a checkpoint of the step it
    had reached and stopped; ``--resume latest`` continues it exactly."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by SIGTERM at step {step}; checkpoint {checkpoint} written: run the same command with "
            "--resume latest to continue"
        )
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Whether SIGTERM arrived; the loop asks :meth:`requested` at the end of each optimizer step."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.agreed = False  # several processes: the outcome of the last vote (taken by LossWindow.flush)

    def __bool__(self) -> bool:
        return bool(self.signals)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether the run should stop now. Every process must call it at the same step.

        One process reads its own flag (no device work), so it stops at the end of the optimizer step in progress.
        Several processes must all stop at the same step (the checkpoint write is a collective), even when only
        one was signalled (``kill PID``): they vote, and the vote rides on the log step's one all-reduce
        (:meth:`LossWindow.flush`), so a multi-process run stops within ``log_every`` optimizer steps of the signal
        and does not synchronise on the other steps.
        """
        if accelerator.num_processes == 1:
            return bool(self.signals)
        return self.agreed


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """Runs the block with SIGTERM recorded in the :class:`StopRequest` it yields instead of killing the process.

    The loop then ends at the end of the optimizer step in progress, writes a checkpoint and raises
    :class:`TrainingStopped`. The previous handler is restored on exit (:func:`bksdm.signals.handling`).
    """
    stop = StopRequest()
    with handling([signal.SIGTERM], lambda signum, frame: stop.signals.append(signum)):
        yield stop


# ------------------------------------------------------------------------------------------------ loss window


class LossWindow:
    """The loss terms of a logging window, summed on the device and reduced across processes once, when logged.

    Reading a loss (``.item()``) or reducing it across processes waits for the device and for every process; doing
    it once per ``log_every`` optimizer steps instead of on every micro step keeps the device busy. The logged
    value of a term is its mean over the window's micro steps and over processes, as before: the sum over
    processes of each process's window sum, divided by the number of processes and of micro steps. Sums are kept
    in float64 (float32 on Apple's MPS, which has no float64), so the order of additions does not show.
    """

    def __init__(self, accumulation: int) -> None:
        self.accumulation = accumulation
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.skipped = 0  # this process's skipped samples since the last flush (a host count)
        self.skipped_total = 0  # every process's skipped samples, as of the last flush

    def add(self, losses: Mapping[str, torch.Tensor], skipped: int = 0) -> None:
        """Adds one micro step's scalar loss terms (on the device; nothing is read) and its skipped samples."""
        for key, value in losses.items():
            value = value.detach()
            value = value.to(torch.float32 if value.device.type == "mps" else torch.float64) / self.accumulation
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.skipped += skipped

    def step_done(self) -> None:
        """Counts one completed optimizer step."""
        self.steps += 1

    def flush(self, accelerator: Accelerator, stop: StopRequest | None = None) -> dict[str, float]:
        """The window's mean loss terms over its micro steps and the processes; starts the next window.

        Every process must call it at the same step: one all-reduce and one device->host copy for the whole
        window. Afterwards :attr:`skipped_total` counts every process's skipped samples since the run started here,
        and ``stop.agreed`` says whether any process was signalled (the stop vote travels in the same all-reduce).
        """
        keys = list(self.sums)
        device = accelerator.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        skipped = torch.tensor(self.skipped, dtype=dtype, device=device)
        signalled = torch.tensor(float(bool(stop)), dtype=dtype, device=device)
        local = torch.stack([*(self.sums[k].to(device, dtype) for k in keys), skipped, signalled])  # (terms + 2,)
        totals = accelerator.reduce(local, "sum").tolist()  # one process: a copy, no communication
        steps = max(self.steps, 1)
        means = {k: totals[i] / accelerator.num_processes / steps for i, k in enumerate(keys)}
        self.skipped_total += int(round(totals[-2]))
        if stop is not None:
            stop.agreed = totals[-1] > 0
        self.sums, self.steps, self.skipped = {}, 0, 0
        return means


def tracker_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A recipe's config flattened for trackers (TensorBoard, W&B take scalars): ``{"optim.lr": 5e-05, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(tracker_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def status_line(record: dict[str, Any]) -> str:
    """One log record as the progress bar and the log show it: step, loss terms, lr, throughput, peak memory."""
    terms = " ".join(
        f"{k}={record[k]:.4f}" for k in ("loss", "loss_task", "loss_kd_out", "loss_kd_feat") if k in record
    )
    return (
        f"step {record['step']} {terms} lr={record['lr']:.2e} {record['samples_per_s']:.1f} samples/s "
        f"peak {record['peak_memory_mb']:.0f} MB"
    )
