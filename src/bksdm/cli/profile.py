"""``bksdm profile``: argument parsing; the job is :func:`bksdm.eval.profile_job.profile_pipeline`, the table
:func:`bksdm.eval.tables.format_profile`."""

from __future__ import annotations

import argparse
import json
import sys

from bksdm.plan.archs import ALL_ARCHS
from bksdm.plan.spec import ALL_PRESETS

__all__ = ["add_profile", "run_profile"]


def add_profile(sub: argparse._SubParsersAction) -> None:
    """Add the ``profile`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser(
        "profile",
        help="params, MACs, latency and peak memory of a pipeline or an architecture preset",
        description="Count parameters and MACs per component (text encoder(s), denoiser -- U-Net or transformer "
        "--, VAE decoder) and time them: one denoiser step with and without classifier-free guidance, and per image "
        "for --steps steps, with each part's share of the image's time and MACs. For a diffusers pipeline folder or "
        "hub id one stock pipeline call is also timed, so the gap the components leave (scheduler, "
        "post-processing, Python) is measured. --arch builds a real architecture with random weights (no download, "
        "no tokenizer: no pipeline call; the transformers, SD3 to FLUX.1, are best counted with --no-latency). "
        "--plan profiles the student a plan makes of the denoiser, with its MACs beside the teacher's.",
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
        help=f"architecture preset with random weights: {', '.join(ALL_ARCHS)}",
    )
    p.add_argument(
        "--plan",
        default=None,
        help=f"apply a plan to the denoiser first: preset ({', '.join(ALL_PRESETS)}) or YAML (U-Net rules for a "
        "U-Net, blocks: rules for a transformer)",
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
        "--no-end-to-end",
        action="store_true",
        help="skip the timed stock pipeline call (one warm-up call of 1 step, then --steps steps with the model's "
        "guidance) that a pipeline folder or hub id gets beside the composed per-image time",
    )
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


def run_profile(args: argparse.Namespace) -> int:
    """Handle ``bksdm profile``: measure, then print a table or JSON (and write ``--out``)."""
    from bksdm.eval.profile_job import ProfileOptions, profile_pipeline

    def progress(message: str) -> None:
        print(f"bksdm profile: {message} ...", file=sys.stderr, flush=True)

    options = ProfileOptions(
        model=args.model if args.model is not None else args.model_option,
        arch=args.arch,
        plan=args.plan,
        resolution=args.resolution,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        latency=not args.no_latency,
        onnx=args.onnx,
        end_to_end=not args.no_end_to_end,
    )
    result = profile_pipeline(options, out=args.out, on_stage=progress)
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else _table(result))
    return 0


def _table(result: dict) -> str:
    """The profile as a table (:func:`bksdm.eval.tables.format_profile`, which labels the denoiser by family)."""
    from bksdm.eval.tables import format_profile

    return format_profile(result)
