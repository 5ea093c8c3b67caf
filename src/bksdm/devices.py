"""Devices and dtypes as the options name them (``--device cuda:1``, ``--dtype bf16``), checked against this machine.

Every command resolves its ``--device`` and ``--dtype`` here, so a name the machine cannot run gives the same
one-line error everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "dtype_name", "parse_dtype", "resolve_device", "resolve_dtype"]


def parse_dtype(name: str) -> torch.dtype:
    """``fp32``/``float32``, ``fp16``/``float16``, ``bf16``/``bfloat16`` → torch dtype."""
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype '{name}'; use fp32, fp16 or bf16")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"fp16"``: the spelling the options take and the records (settings.json, profiles) keep."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def resolve_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """``--dtype``: the named dtype (see :func:`parse_dtype`); None: fp16 on CUDA, fp32 elsewhere.

    Raises:
        ValueError: ``name`` is not a dtype bksdm knows.
    """
    if name is not None:
        return parse_dtype(name)
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class DeviceError(ValueError):
    """A ``--device`` this machine cannot run on (unknown, or CUDA/MPS without the hardware)."""


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """The torch device a ``--device`` value names, checked against this machine; None/``auto``: CUDA if available.

    Every command that takes ``--device`` resolves it here, so an unknown name (``tpu``), CUDA on a machine
    without it, or a GPU index past the last one gives the same one-line error rather than a traceback.

    Args:
        name: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, or None (or ``auto``) for the default.
        option: The option's name, for the message.

    Raises:
        DeviceError: The name is not a device bksdm runs on, or this machine lacks it.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{option} {name}: not a device bksdm runs on; use cpu, cuda or cuda:N (mps on Apple)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} {name}: CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{option} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option} {name}: MPS (Apple GPUs) is not available on this machine; use --device cpu")
    return device
