"""``bksdm adapt controlnet``: a teacher's ControlNet pruned for a student
(:func:`bksdm.use.adapters.controlnet_job.adapt_controlnet`)."""

from __future__ import annotations

import argparse

__all__ = ["add_adapt_controlnet"]


def add_adapt_controlnet(group: argparse._SubParsersAction) -> None:
    """Add ``adapt controlnet`` to the ``bksdm adapt`` group."""
    p = group.add_parser(
        "controlnet",
        help="prune a teacher's ControlNet with the student's plan",
        description="Prune a ControlNet made for the teacher with the plan that made the student, so that its "
        "residuals match the student's skip connections; optionally distil it briefly against the teacher and its "
        "ControlNet. Writes a ControlNetModel folder that stock StableDiffusionControlNetPipeline takes with the "
        "student's U-Net.",
    )
    p.add_argument("--student", required=True, help="student pipeline folder (from bksdm prune or distill)")
    p.add_argument("--controlnet", required=True, help="the teacher's ControlNet: a diffusers ControlNetModel folder")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--teacher", default=None, help="the teacher, when the student's bksdm_plan.yaml names another path")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from bksdm.use.adapters.controlnet_job import adapt_controlnet

    adapt_controlnet(
        student=args.student,
        controlnet=args.controlnet,
        out=args.out,
        teacher=args.teacher,
        overwrite=args.overwrite,
    )
    return 0
