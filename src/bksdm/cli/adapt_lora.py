"""``bksdm adapt lora``: a teacher's LoRA mapped onto a student (:func:`bksdm.use.adapters.lora_job.adapt_lora`)."""

from __future__ import annotations

import argparse

__all__ = ["add_adapt_lora"]


def add_adapt_lora(group: argparse._SubParsersAction) -> None:
    """Add ``adapt lora`` to the ``bksdm adapt`` group."""
    p = group.add_parser(
        "lora",
        help="map a LoRA trained on the teacher onto a student",
        description="Map a LoRA trained on the teacher (diffusers/peft or kohya format) onto a student pruned from "
        "it: adapters of kept blocks move to the student's addresses, adapters of removed blocks are dropped and "
        "listed in the report, the text-encoder part is kept as is. Writes pytorch_lora_weights.safetensors in "
        "diffusers' format, which pipe.load_lora_weights(folder) loads.",
    )
    p.add_argument("--student", required=True, help="student pipeline folder (from bksdm prune or distill)")
    p.add_argument("--lora", required=True, help="the teacher's LoRA: a .safetensors file or a folder holding one")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--teacher", default=None, help="the teacher, when the student's bksdm_plan.yaml names another path")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from bksdm.use.adapters.lora_job import adapt_lora

    report = adapt_lora(
        student=args.student, lora=args.lora, out=args.out, teacher=args.teacher, overwrite=args.overwrite
    )
    a, p = report["adapters"], report["params"]
    print(
        f"wrote {report['out']}/{report['file']}: {a['kept']} of {a['total']} adapters carried ({a['moved']} moved), "
        f"{a['dropped']} dropped with removed blocks ({p['dropped_share']:.1%} of the LoRA's parameters); "
        f"report: {report['out']}/adapt_report.md"
    )
    return 0
