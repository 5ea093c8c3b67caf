"""``bksdm export onnx``: a pipeline's networks to ONNX, checked against PyTorch (see :mod:`bksdm.use.onnx.export`)."""

from __future__ import annotations

import argparse
import json
import sys

from bksdm.use.onnx.export import COMPONENTS, DEFAULT_COMPONENTS, DEFAULT_TOLERANCE, EXPORTERS

__all__ = ["add_export", "run_export_onnx"]


def add_export(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command (with its ``onnx`` target) to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser("export", help="export a teacher or student to other runtimes (ONNX)")
    targets = p.add_subparsers(dest="export_target", required=True)
    onnx = targets.add_parser(
        "onnx",
        help="U-Net, text encoder and VAE decoder to ONNX, with a parity check against PyTorch",
        description="Export the networks of an SD-v1/v2 pipeline (a student folder from bksdm prune or distill "
        "works as is) to ONNX in the folder layout of optimum's ORTStableDiffusionPipeline and diffusers' "
        "OnnxStableDiffusionPipeline, run each in ONNX Runtime and in PyTorch on the same random inputs at two "
        "shapes, and report the largest absolute difference (also in OUT/export_report.json). Exit status 1 when "
        "a network misses --tolerance (the files are kept for inspection). Needs pip install 'bksdm[onnx]'. SDXL, "
        "SD3 and FLUX.1 pipelines are refused before any weights are read, with a pointer to Hugging Face optimum "
        "(optimum-cli export onnx), which exports them.",
    )
    onnx.add_argument(
        "--model", default=None, help="diffusers pipeline folder or hub id (default: the bundled shapes teacher)"
    )
    onnx.add_argument("--out", required=True, help="output folder (written atomically)")
    onnx.add_argument(
        "--components",
        default=",".join(DEFAULT_COMPONENTS),
        help=f"comma-separated, from {', '.join(COMPONENTS)} (default {','.join(DEFAULT_COMPONENTS)})",
    )
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 18 with --exporter dynamo)")
    onnx.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="torchscript",
        help="torch.onnx back end: the TorchScript tracer (default: several times faster to export; optimum's "
        "SD exports use it) or the torch.export-based one",
    )
    onnx.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest accepted |ONNX Runtime - PyTorch| (default {DEFAULT_TOLERANCE:g})",
    )
    onnx.add_argument("--seed", type=int, default=0, help="seed of the random parity inputs (default 0)")
    onnx.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    onnx.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    onnx.set_defaults(func=run_export_onnx)


def run_export_onnx(args: argparse.Namespace) -> int:
    """Handle ``bksdm export onnx``.

    Returns:
        0 when every network passed the parity check, 1 otherwise.

    Raises:
        ExportError: Bad options, onnx/onnxruntime missing, or an unsupported pipeline.
        OutputExistsError: ``--out`` is not empty and ``--overwrite`` was not given.
        TeacherNotFoundError: ``--model`` is neither a pipeline folder nor a reachable hub repo.
    """
    from bksdm.loading import teacher_or_default
    from bksdm.use.onnx.export import export_onnx, format_export, parse_components

    components = parse_components(args.components)  # fail on a typo before the model is read
    model = teacher_or_default(args.model)

    def progress(message: str) -> None:
        print(f"bksdm export onnx: {message} ...", file=sys.stderr, flush=True)

    report = export_onnx(
        model,
        args.out,
        components=components,
        opset=args.opset,
        exporter=args.exporter,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
        seed=args.seed,
        on_stage=progress,
    )
    print(json.dumps(report, indent=2) if args.json else format_export(report))
    if not report["passed"]:
        failed = [name for name, c in report["components"].items() if not c["passed"]]
        print(
            f"bksdm export onnx: parity check failed for {', '.join(failed)} (tolerance {report['tolerance']:g}); "
            f"the files are in {args.out} for inspection",
            file=sys.stderr,
        )
        return 1
    return 0
