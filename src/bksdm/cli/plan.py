"""``bksdm prune``, ``bksdm plan show`` and ``bksdm plan list``: choosing and applying what survives.

The jobs are :func:`bksdm.plan.prune.prune` and :func:`bksdm.plan.prune.describe_plan`; this module parses
their arguments and prints their results.
"""

from __future__ import annotations

import argparse
import json

from bksdm.plan.spec import ALL_PRESETS, PRESETS, TRANSFORMER_PRESETS

__all__ = ["add_plan", "add_prune"]


def add_prune(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser(
        "prune",
        help="remove denoiser blocks (U-Net or transformer) from a teacher and write a student pipeline folder",
        description="Build a student denoiser (a U-Net, or an SD3 / FLUX.1 transformer) from a teacher by a plan, "
        "copy the kept weights, and write a complete diffusers pipeline (the teacher's tokenizers, text encoders, "
        "VAE, scheduler + the student denoiser) with a report of what was removed.",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="hub id or local folder of a diffusers SD / SDXL / SD3 / FLUX.1 pipeline "
        "(default: the bundled shapes teacher)",
    )
    p.add_argument(
        "--plan", default="bk-small", help=f"preset ({', '.join(ALL_PRESETS)}) or plan YAML (default bk-small)"
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument(
        "--init",
        choices=("teacher", "random"),
        default="teacher",
        help="start kept blocks from the teacher's weights (default) or from random weights (ablation)",
    )
    p.add_argument(
        "--allow-partial-init",
        action="store_true",
        help="let tensors whose shape differs from the teacher's start from random weights",
    )
    p.add_argument("--save-dtype", default="fp32", help="dtype of the saved weights: fp32 (default), fp16, bf16")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run_prune)


def _run_prune(args: argparse.Namespace) -> int:
    from bksdm.loading import parse_dtype
    from bksdm.plan.prune import prune
    from bksdm.plan.render import DENOISER_LABELS

    report = prune(
        args.teacher,
        args.plan,
        args.out,
        init=args.init,
        allow_partial_init=args.allow_partial_init,
        overwrite=args.overwrite,
        save_dtype=parse_dtype(args.save_dtype),
        seed=args.seed,
    )
    denoiser = report["denoiser"]
    label = DENOISER_LABELS[denoiser["attribute"]]
    t, s = denoiser["teacher"], denoiser["student"]
    removed = sum(1 for r in report["blocks"] if r["student"] is None)
    print(f"student written to {args.out} (plan {report['plan']['name']}, {removed} blocks removed)")
    print(f"  {label} params {t['params']:,} -> {s['params']:,} ({100 * (1 - s['params'] / t['params']):.1f}% fewer)")
    print(f"  {label} MACs/step @{report['resolution']}px {t['macs'] / 1e9:.2f}G -> {s['macs'] / 1e9:.2f}G")
    if report.get("resolution_note"):
        print(f"  (MACs at {report['resolution_note']})")
    print(f"  report: {args.out}/prune_report.md")
    return 0


def add_plan(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-command (``show``, ``list``) to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser("plan", help="inspect plans")
    plan_sub = p.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser(
        "show", help="print the blocks a plan keeps and removes, per U-Net stage or transformer stack"
    )
    show.add_argument("plan", help=f"preset ({', '.join(ALL_PRESETS)}), plan YAML, or a student folder")
    where = show.add_mutually_exclusive_group()
    where.add_argument("--arch", default=None, help="architecture preset to resolve against (default sd-v1.4)")
    where.add_argument(
        "--teacher", default=None, help="hub id or local folder whose denoiser config (U-Net or transformer) to use"
    )
    show.add_argument("--json", action="store_true", help="print the resolved plan as JSON")
    show.set_defaults(func=_run_plan_show)
    listing = plan_sub.add_parser("list", help="list the presets, U-Net and transformer ones apart")
    listing.set_defaults(func=_run_plan_list)


def _run_plan_show(args: argparse.Namespace) -> int:
    from bksdm.plan.prune import describe_plan

    description = describe_plan(args.plan, teacher=args.teacher or None, arch=args.arch)
    print(json.dumps(description.to_dict(), indent=2) if args.json else description.to_text())
    return 0


def _run_plan_list(args: argparse.Namespace) -> int:
    from bksdm.plan.render import format_presets

    groups = {
        "U-Net presets (SD-v1.x, SD-v2.x, SDXL)": PRESETS,
        "transformer presets (SD3, SD3.5, FLUX.1; identity fits them too)": TRANSFORMER_PRESETS,
    }
    print(format_presets(groups))
    return 0
