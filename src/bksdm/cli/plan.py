"""``bksdm prune``, ``bksdm plan show|list|score|search``: choosing and applying what survives.

The jobs are :func:`bksdm.plan.prune.prune`, :func:`bksdm.plan.prune.describe_plan`,
:func:`bksdm.plan.score_job.score_teacher` and :func:`bksdm.plan.search_job.search_plan`; this module parses their
arguments and prints their results.
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
    from bksdm.devices import parse_dtype
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
    p = sub.add_parser("plan", help="inspect plans, score a teacher's removable units, search a plan for a budget")
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
    _add_score(plan_sub)
    _add_search(plan_sub)


def _add_score(plan_sub: argparse._SubParsersAction) -> None:
    score = plan_sub.add_parser(
        "score",
        help="measure how much removing each unit (layer, block, stage) changes the teacher's prediction",
        description="Score every removable unit of a teacher: its one-shot ablation loss (the relative squared change "
        "of the denoiser's prediction when that unit alone is removed, on a real student as prune builds it) and its "
        "similarity score (1 - cos of its input and output), over N prompts x T timesteps x S seeds. Writes "
        "scores.json, scores.csv, scores.md (ranked per stage) and scores.png to --out.",
    )
    score.add_argument("--teacher", default=None, help="hub id or folder of a diffusers pipeline (default: shapes)")
    score.add_argument("--out", required=True, help="output folder (written atomically)")
    source = score.add_mutually_exclusive_group()
    source.add_argument("--prompts", default=None, help="prompt file (.txt, .json, .jsonl, .csv) to calibrate on")
    source.add_argument("--data", default=None, help="data folder (metadata.csv/.jsonl) or hf:NAME: its captions")
    source.add_argument("--cache", default=None, help="bksdm cache folder: its latents and text states (no sampling)")
    score.add_argument("--num-prompts", type=int, default=16, help="N prompts, evenly spread over the source (16)")
    score.add_argument("--timesteps", type=int, default=4, help="T timesteps spread over the schedule (4)")
    score.add_argument("--seeds", type=int, default=1, help="S samples per prompt (1)")
    score.add_argument("--validate", type=int, default=0, help="K random multi-unit plans: additivity check (0)")
    score.add_argument("--seed", type=int, default=0, help="base seed of every draw (0)")
    score.add_argument("--steps", type=int, default=None, help="sampling steps (default: the teacher's recorded)")
    score.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the teacher's)")
    score.add_argument("--resolution", type=int, default=None, help="image side in px (default: the teacher's)")
    score.add_argument("--batch-size", type=int, default=32, help="inputs per denoiser forward (32)")
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    score.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default: fp16 on CUDA, fp32 elsewhere)")
    score.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    score.set_defaults(func=_run_plan_score)


def _add_search(plan_sub: argparse._SubParsersAction) -> None:
    found = plan_sub.add_parser(
        "search",
        help="the plan with the lowest predicted loss that fits a budget, from a scores folder",
        description="Search the valid plan whose removed units have the lowest summed scores while the student keeps "
        "at most a fraction of the teacher's denoiser parameters, MACs per step or measured step latency. Writes an "
        "ordinary plan YAML (for prune and distill) headed by how it was chosen.",
    )
    found.add_argument("--scores", required=True, help="a folder written by `bksdm plan score`")
    found.add_argument("--budget", required=True, help="params=F | macs=F | latency=F, F in (0, 1] of the teacher's")
    found.add_argument("--out", required=True, help="the plan YAML to write")
    found.add_argument("--keep", nargs="+", default=[], metavar="UNIT", help="units (or module addresses) to keep")
    found.add_argument("--drop", nargs="+", default=[], metavar="UNIT", help="units to remove")
    found.add_argument("--teacher", default=None, help="check that the scores belong to this teacher")
    found.add_argument("--name", default=None, help="the plan's name (default searched-KIND-F)")
    found.add_argument("--device", default=None, help="where a latency budget is measured (default: CUDA if any)")
    found.add_argument("--dtype", default=None, help="dtype of the latency measurement (fp16 on CUDA, else fp32)")
    found.set_defaults(func=_run_plan_search)


def _run_plan_score(args: argparse.Namespace) -> int:
    from bksdm.plan.score_job import ScoreOptions, score_teacher

    options = ScoreOptions(
        out=args.out, teacher=args.teacher, prompts=args.prompts, data=args.data, cache=args.cache,
        num_prompts=args.num_prompts, timesteps=args.timesteps, seeds=args.seeds, validate=args.validate,
        seed=args.seed, steps=args.steps, guidance=args.guidance, resolution=args.resolution,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
    )  # fmt: skip
    record = score_teacher(options)
    units = sorted(record["units"], key=lambda u: u["ablation"])
    print(f"scored {len(units)} units of {record['teacher']} in {record['timing']['total_s']:.1f} s -> {args.out}")
    print("  lowest ablation loss: " + ", ".join(f"{u['address']} {u['ablation']:.3g}" for u in units[:5]))
    print("  highest: " + ", ".join(f"{u['address']} {u['ablation']:.3g}" for u in units[-3:]))
    if record["validation"]:
        rho = record["validation"]["spearman"]
        plans = len(record["validation"]["plans"])
        print(f"  additivity: Spearman {'n/a' if rho is None else f'{rho:.3f}'} over {plans} random plans")
    print(f"  report: {args.out}/scores.md")
    return 0


def _run_plan_search(args: argparse.Namespace) -> int:
    import shlex

    from bksdm.plan.search_job import SearchOptions, search_plan

    words = ["plan", "search", "--scores", args.scores, "--budget", args.budget, "--out", args.out]
    for option in ("keep", "drop"):
        words += [f"--{option}", *getattr(args, option)] if getattr(args, option) else []
    for option in ("teacher", "name", "device", "dtype"):
        words += [f"--{option}", getattr(args, option)] if getattr(args, option) else []
    options = SearchOptions(
        scores=args.scores, budget=args.budget, out=args.out, keep=args.keep, drop=args.drop, teacher=args.teacher,
        device=args.device, dtype=args.dtype, name=args.name, command="bksdm " + shlex.join(words),
    )  # fmt: skip
    summary = search_plan(options)
    p, m = summary["params"], summary["macs"]
    print(f"plan written to {args.out} ({summary['budget']}, predicted loss {summary['predicted_loss']:.4g})")
    print(f"  params {p['student']:,} of {p['teacher']:,} ({p['student'] / p['teacher']:.4f})")
    print(f"  MACs/step {m['student']:,} of {m['teacher']:,} ({m['student'] / m['teacher']:.4f})")
    if summary["latency"]:
        print(f"  measured step latency {summary['latency']['fraction']:.3f} of the teacher's")
    print("  removed: " + (", ".join(summary["units"]) or "nothing"))
    return 0


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
