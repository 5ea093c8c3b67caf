"""``bksdm profile``: params, MACs, latency and peak memory of a pipeline or an architecture preset.

A thin wrapper: it parses the options, calls :func:`bksdm.eval.profile.load_components` and
:func:`bksdm.eval.profile.profile_components`, and prints a table (or the JSON object those return).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from bksdm.plan.archs import ARCHS
from bksdm.plan.spec import PRESETS

__all__ = ["add_profile", "format_profile", "run_profile"]


def add_profile(sub: argparse._SubParsersAction) -> None:
    """Add the ``profile`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser(
        "profile",
        help="params, MACs, latency and peak memory of a pipeline or an architecture preset",
        description="Count parameters and MACs per component (text encoder(s), U-Net, VAE decoder) and time "
        "them: one U-Net step with and without classifier-free guidance, and per image for --steps steps. "
        "Give a diffusers pipeline folder or hub id, or --arch for a real architecture with random weights "
        "(no download). --plan profiles the student a plan makes of the U-Net.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "model", nargs="?", default=None, help="diffusers pipeline folder or hub id (default: the bundled teacher)"
    )
    source.add_argument(
        "--model", dest="model_option", metavar="MODEL", default=None, help="same as the positional MODEL"
    )
    source.add_argument(
        "--arch",
        default=None,
        help=f"architecture preset with random weights: {', '.join(ARCHS)}",
    )
    p.add_argument(
        "--plan", default=None, help=f"apply a plan to the U-Net first: preset ({', '.join(PRESETS)}) or YAML"
    )
    p.add_argument(
        "--resolution", type=int, default=None, help="image side in pixels (default: the model's native one)"
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image (default 25)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per component (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-latency", action="store_true", help="only count params and MACs (no weights built)")
    p.add_argument(
        "--onnx",
        default=None,
        metavar="DIR",
        help="also time the U-Net exported to DIR by `bksdm export onnx` in ONNX Runtime (CPU), same inputs, "
        "beside PyTorch's (needs --device cpu, fp32)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    p.set_defaults(func=run_profile)


def _check_memory(parts, resolution: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a --resolution whose timed calls (a guided U-Net step, a VAE decode) would not fit in memory."""
    from bksdm.sampling import SamplingError, available_memory, generation_bytes

    size = dtype.itemsize
    need = generation_bytes(
        parts.unet.config, parts.vae.config, resolution, resolution, 1, guidance=True, unet_dtype_bytes=size,
        vae_dtype_bytes=size,
    )  # fmt: skip
    free, source = available_memory(device)
    if need > free:
        raise SamplingError(
            f"--resolution {resolution} needs about {need / 2**30:,.1f} GiB of memory for its activations, but "
            f"{free / 2**30:,.1f} GiB is {source}; give a smaller --resolution (or --no-latency to count only)"
        )


def run_profile(args: argparse.Namespace) -> int:
    """Handle ``bksdm profile``: measure, then print a table or JSON (and write ``--out``).

    Returns:
        The exit code (0).

    Raises:
        ValueError: Bad option values, or an unknown architecture.
        PlanError: The plan is malformed or does not fit the U-Net.
        TeacherNotFoundError: The model is neither a pipeline folder nor a reachable hub repo.
    """
    from bksdm.artifacts import atomic_file
    from bksdm.eval.profile import load_components, profile_components
    from bksdm.loading import resolve_device, resolve_dtype, teacher_or_default

    model = args.model if args.model is not None else args.model_option
    if model is None and args.arch is None:  # nothing given: the bundled shapes teacher
        model = teacher_or_default(None)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("need --steps >= 1, --repeats >= 1 and --warmup >= 0")
    if args.resolution is not None and args.resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {args.resolution}")
    latency = not args.no_latency
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.onnx is not None:
        _check_onnx_options(args, latency, device, dtype)

    def progress(message: str) -> None:
        print(f"bksdm profile: {message} ...", file=sys.stderr, flush=True)

    if latency:
        progress(f"loading weights onto {device} ({'random' if args.arch else 'from ' + str(model)})")
    parts = load_components(
        model=model, arch=args.arch, plan=args.plan, materialize=latency, device=device, dtype=dtype
    )
    if latency:
        _check_memory(parts, args.resolution or parts.resolution, device, dtype)
    result = profile_components(
        parts.unet,
        parts.text_encoders,
        parts.vae,
        args.resolution or parts.resolution,
        latency=latency,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        device=device if latency else None,
        dtype=dtype if latency else None,
        on_stage=progress if latency else None,
    )
    result = {"source": parts.source, "plan": parts.plan, **result}
    if args.onnx is not None:
        result["onnx"] = _time_onnx(args, parts.unet.config, result, progress)
    text = json.dumps(result, indent=2, allow_nan=False)
    if args.out:
        out = Path(args.out)
        with atomic_file(out) as partial:  # a full disk or read-only folder: WriteFailed, no half file
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(text + "\n")
    print(text if args.json else format_profile(result))
    return 0


def _check_onnx_options(args: argparse.Namespace, latency: bool, device: torch.device, dtype: torch.dtype) -> None:
    """``--onnx`` compares ONNX Runtime on the CPU in fp32 with PyTorch: refuse anything else before loading."""
    from bksdm.use.onnx.runtime import read_report

    if not latency:
        raise ValueError("--onnx times the exported U-Net: drop --no-latency")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError("--onnx times ONNX Runtime on the CPU in fp32: profile with --device cpu --dtype fp32")
    read_report(args.onnx)  # not an export folder: fail before any weights are read


def _time_onnx(args: argparse.Namespace, unet_config: Any, result: dict[str, Any], progress: Any) -> dict[str, Any]:
    """ONNX Runtime U-Net step timings with the same inputs, warm-up, repeats and threads as PyTorch's."""
    from bksdm.use.onnx.runtime import time_onnx_unet

    progress(f"timing the ONNX Runtime U-Net in {args.onnx} ({torch.get_num_threads()} threads)")
    onnx = time_onnx_unet(
        args.onnx,
        unet_config,
        result["latent_size"],
        repeats=args.repeats,
        warmup=args.warmup,
        threads=torch.get_num_threads(),
    )
    # Per image as for PyTorch, with the U-Net steps from ONNX Runtime (text encoder and VAE decoder from PyTorch).
    steps, text, decode = result["steps"], result["text_encoder_s"], result["vae_decode_s"]
    onnx["image_s"] = text + steps * onnx["unet_step_s"] + decode
    onnx["image_cfg_s"] = 2 * text + steps * onnx["unet_step_cfg_s"] + decode
    return onnx


# ------------------------------------------------------------------------------------------ the table


def _macs(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms" if s >= 1e-2 else f"{s * 1e3:.3f} ms"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_profile(result: dict[str, Any]) -> str:
    """Render a :func:`bksdm.eval.profile.profile_components` result (plus ``source``/``plan``) as a table.

    Args:
        result: The dict ``bksdm profile --json`` prints.

    Returns:
        An aligned, multi-line table: one row per component, then the per-image figures and the device.
    """
    timed = bool(result.get("latency"))
    header = ["component", "params", "MACs conv+linear", "MACs incl. attention"]
    header += ["latency median (min)"] if timed else []

    def row(label: str, params: int | None, macs: int, macs_att: int, times: dict[str, Any], key: str) -> list[str]:
        cells = [label, "" if params is None else f"{params:,}", _macs(macs), _macs(macs_att)]
        if timed:
            cells.append(f"{_seconds(times[f'{key}_s'])} (min {_seconds(times[f'{key}_min_s'])})")
        return cells

    r = result
    rows = [
        row(name, enc["params"], enc["macs"], enc["macs_with_attention"], enc, "latency")
        for name, enc in r["text_encoders"].items()
    ]
    rows.append(row("U-Net step", r["unet_params"], r["unet_macs"], r["unet_macs_with_attention"], r, "unet_step"))
    # MACs scale linearly with the batch, so the guided step (batch 2) costs exactly twice.
    rows.append(
        row(
            "U-Net step, CFG (batch 2)",
            None,
            2 * r["unet_macs"],
            2 * r["unet_macs_with_attention"],
            r,
            "unet_step_cfg",
        )
    )
    if r.get("onnx"):
        rows += [
            row(
                "U-Net step, ONNX Runtime", None, r["unet_macs"], r["unet_macs_with_attention"], r["onnx"], "unet_step"
            ),
            row(
                "U-Net step, CFG, ONNX Runtime",
                None,
                2 * r["unet_macs"],
                2 * r["unet_macs_with_attention"],
                r["onnx"],
                "unet_step_cfg",
            ),
        ]
    rows.append(
        row(
            "VAE decoder",
            r["vae_decoder_params"],
            r["vae_decoder_macs"],
            r["vae_decoder_macs_with_attention"],
            r,
            "vae_decode",
        )
    )
    rows.append(["whole (U-Net + text + VAE dec.)", f"{r['whole_params']:,}"] + [""] * (len(header) - 2))

    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    side, latent = result["resolution"], result["latent_size"]
    title = f"bksdm profile: {result.get('source', '?')}"
    if result.get("plan"):
        title += f", plan {result['plan']}"
    lines = [f"{title}, {side}x{side} px (latent {latent}x{latent})", "", line(header)]
    lines += [line(row) for row in rows]
    lines.append("")
    if timed:
        steps = result["steps"]
        lines.append(
            f"per image, {steps} steps: {_seconds(result['image_s'])} without guidance, "
            f"{_seconds(result['image_cfg_s'])} with classifier-free guidance"
        )
        lines += [
            f"  composed from separately timed components: text encoders + {steps} x U-Net step + VAE decode",
            "  (guidance: 2 text-encoder calls, batch-2 steps); apart, as --arch presets have no tokenizer",
            f"  {result['warmup']} warm-up + {result['repeats']} timed calls per component; medians (min)",
        ]
        if result.get("onnx"):
            onnx = result["onnx"]
            lines += [
                f"with the ONNX Runtime U-Net: {_seconds(onnx['image_s'])} without guidance, "
                f"{_seconds(onnx['image_cfg_s'])} with (U-Net step at "
                f"{result['unet_step_s'] / onnx['unet_step_s']:.2f}x PyTorch's speed, "
                f"{result['unet_step_cfg_s'] / onnx['unet_step_cfg_s']:.2f}x with guidance)",
                f"  {onnx['onnx_dir']}: onnxruntime {onnx['onnxruntime_version']}, {onnx['provider']}, "
                f"{onnx['threads']} threads as torch, same inputs; text encoder and VAE decoder from PyTorch",
            ]
        lines.append(f"peak memory: {_bytes(result['peak_memory_bytes'])}, {result['peak_memory_method']}")
    else:
        lines.append("latency: not measured (--no-latency)")
    lines.append(f"device: {result['device']}, {result['dtype']}, torch {result['torch_version']}")
    lines += [
        "MACs: one forward at batch 1 (U-Net: one step; text encoders: 77 tokens); 'conv+linear' is the",
        "  BK-SDM paper's count, 'incl. attention' adds the attention products QK^T and AV",
    ]
    return "\n".join(lines)
