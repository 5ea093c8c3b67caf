"""Running what ``bksdm export onnx`` wrote: ONNX Runtime sessions, the export report, U-Net step timing.

``bksdm profile --onnx DIR`` times the exported U-Net here beside PyTorch's, on the same inputs as
:func:`bksdm.profiling.unet_inputs` (zeros, timestep 999, 77 text tokens) with the same warm-up and repeats, and
with ONNX Runtime limited to as many threads as torch uses, so the two rows compare like with like.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bksdm.profiling import measure_latency

__all__ = [
    "ONNX_FILE",
    "REPORT_FILE",
    "ExportError",
    "onnx_session",
    "onnx_unet_feeds",
    "read_report",
    "require_onnx",
    "time_onnx_unet",
]

ONNX_FILE = "model.onnx"
"""Each network's graph, in a folder named after it (optimum's and diffusers' layout)."""

REPORT_FILE = "export_report.json"
"""The export report at the top of an exported folder."""

# U-Net config fields that decide the architecture: an exported U-Net is the profiled one when they agree.
_ARCHITECTURE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "cross_attention_dim",
    "attention_head_dim",
    "transformer_layers_per_block",
)


class ExportError(ValueError):
    """A user error of ONNX export or of using an export: bad options, a wrong folder, a missing package."""


def require_onnx():
    """Import ``onnx`` and ``onnxruntime``, or fail with the command that installs them.

    Returns:
        The ``(onnx, onnxruntime)`` modules.

    Raises:
        ExportError: One of them is not installed.
    """
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(
            f"ONNX export needs the onnx and onnxruntime packages ({err.name} is missing): "
            "pip install 'bksdm[onnx]' (or pip install onnx onnxruntime)"
        ) from None
    return onnx, onnxruntime


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session for a ``model.onnx`` (or a component folder holding one).

    Args:
        path: The ``.onnx`` file or its folder.
        threads: Intra-op threads (``None``: ONNX Runtime's default, one per physical core).

    Returns:
        An ``onnxruntime.InferenceSession`` on ``CPUExecutionProvider``.
    """
    _, ort = require_onnx()
    path = Path(path)
    if path.is_dir():
        path = path / ONNX_FILE
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: constant-folding notes are not the user's business
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def read_report(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``export_report.json`` of a folder written by ``bksdm export onnx``.

    Raises:
        ExportError: The folder holds no report (it was not written by ``bksdm export onnx``).
    """
    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        raise ExportError(f"{folder} holds no {REPORT_FILE}: give a folder written by `bksdm export onnx`")
    return json.loads(path.read_text())


def onnx_unet_feeds(unet_config: Any, latent_side: int, batch: int) -> dict[str, np.ndarray]:
    """The inputs of one exported U-Net step, as :func:`bksdm.profiling.unet_inputs` makes them for PyTorch.

    Zeros (the values do not change the cost), timestep 999 per image, 77 text tokens, float32.
    """
    config = dict(unet_config)
    return {
        "sample": np.zeros((batch, config.get("in_channels", 4), latent_side, latent_side), dtype=np.float32),
        "timestep": np.full((batch,), 999, dtype=np.float32),
        "encoder_hidden_states": np.zeros((batch, 77, config["cross_attention_dim"]), dtype=np.float32),
    }


def _check_same_unet(folder: Path, unet_config: Any) -> None:
    exported = json.loads((folder / "unet" / "config.json").read_text())
    profiled = dict(unet_config)

    def norm(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    differ = [k for k in _ARCHITECTURE_KEYS if norm(exported.get(k)) != norm(profiled.get(k))]
    if differ:
        raise ExportError(
            f"--onnx {folder}: its U-Net is not the profiled one ({', '.join(differ)} differ); export the same "
            "model (bksdm export onnx --model MODEL) or profile the model that was exported (and no --plan)"
        )


def time_onnx_unet(
    folder: str | os.PathLike,
    unet_config: Any,
    latent_side: int,
    *,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time one step of an exported U-Net in ONNX Runtime (CPU) at batch 1 and at batch 2 (guidance).

    Args:
        folder: A folder written by ``bksdm export onnx`` that holds ``unet/``.
        unet_config: The config of the U-Net profiled in PyTorch; the exported one must have its architecture.
        latent_side: Latent side of the step (resolution / VAE scale factor).
        repeats: Timed calls.
        warmup: Untimed calls first.
        threads: ONNX Runtime intra-op threads (pass torch's count to compare like with like).

    Returns:
        ``onnx_dir``, ``provider``, ``threads``, ``onnxruntime_version``, ``opset``, ``exporter``,
        ``unet_step_s`` / ``unet_step_cfg_s`` (medians) with ``_min_s`` and ``_times_s``.

    Raises:
        ExportError: Not an export folder, no U-Net in it, another U-Net than the profiled one, or a latent
            side the exported graph cannot take.
    """
    _, ort = require_onnx()
    folder = Path(folder)
    report = read_report(folder)
    if "unet" not in report.get("components", {}) or not (folder / "unet" / ONNX_FILE).is_file():
        raise ExportError(f"--onnx {folder} holds no unet/{ONNX_FILE}: export with --components including unet")
    _check_same_unet(folder, unet_config)
    multiple = int(report.get("latent_side_multiple", 1))
    if latent_side % multiple:
        raise ExportError(
            f"latent side {latent_side} is not a multiple of {multiple}, which the exported U-Net needs; "
            "choose another --resolution"
        )
    session = onnx_session(folder / "unet", threads=threads)
    result: dict[str, Any] = {
        "onnx_dir": str(folder),
        "provider": "CPUExecutionProvider",
        "threads": threads,
        "onnxruntime_version": ort.__version__,
        "opset": report.get("opset"),
        "exporter": report.get("exporter"),
    }
    for key, batch in (("unet_step", 1), ("unet_step_cfg", 2)):
        feeds = onnx_unet_feeds(unet_config, latent_side, batch)
        stat = measure_latency(lambda feeds=feeds: session.run(None, feeds), warmup=warmup, repeats=repeats)
        result |= {f"{key}_s": stat.median, f"{key}_min_s": stat.min, f"{key}_times_s": list(stat.times)}
    return result
