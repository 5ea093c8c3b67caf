"""``bksdm demo``: the whole job on the bundled shapes world (the job is :func:`bksdm.world.demo.run_demo`)."""

from __future__ import annotations

import argparse
import logging

__all__ = ["add_demo"]


def add_demo(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser(
        "demo",
        help="the whole job on the bundled shapes teacher: prune, distill, generate, evaluate, report (offline)",
        description="Prune the bundled shapes teacher, distil the student with the real recipe, generate with "
        "teacher and student on the same prompts and seeds, evaluate (prompt accuracy, Frechet distance, params, "
        "MACs, latency) and write a report folder. About 3 minutes on 2 idle CPU cores; no network.",
    )
    p.add_argument("--out", default="bksdm-demo", help="report folder (default ./bksdm-demo)")
    p.add_argument(
        "--teacher",
        default="bundled",
        help="bundled (the U-Net shapes teacher, default), bundled-sd3 (the SD3-shaped transformer one), or the "
        "folder of a pipeline trained on the shapes world",
    )
    p.add_argument(
        "--plan", default=None, help="preset or plan YAML (default bk-tiny for a U-Net, keep-half for a transformer)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="distillation steps per student (default 400 for a U-Net teacher, 1000 for a transformer)",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also train a task-loss-only and a randomly initialised student with the same budget",
    )
    p.add_argument(
        "--lcm",
        action="store_true",
        help="then distil the KD student to a 4-step latent consistency model (bksdm lcm) and evaluate it too",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra distill recipe overrides")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from bksdm.world.demo import LCM_STEPS, DemoSettings, run_demo

    settings = DemoSettings(teacher=args.teacher, plan=args.plan, ablations=args.ablations, extra=list(args.overrides))
    settings.lcm_steps = LCM_STEPS if args.lcm else 0
    if args.steps is not None:
        settings.steps = args.steps
    logging.getLogger("bksdm").setLevel(logging.INFO)
    summary = run_demo(args.out, settings)
    print(f"\nreport: {args.out}/summary.md ({summary['seconds'] / 60:.1f} min)")
    for name, metrics in summary["models"].items():
        print(
            f"  {name:<32} prompt accuracy {metrics['prompt_accuracy']:.3f}  "
            f"Frechet {metrics['frechet_distance']:.2f}  denoiser {metrics['denoiser_params']:,} params"
        )
    return 0
