"""``bksdm evaluate``, ``bksdm fid-stats`` and ``bksdm report``: thin wrappers over :mod:`bksdm.eval.evaluate` and
:mod:`bksdm.eval.report` that parse options, print tables and write files."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_evaluate_commands", "run_evaluate", "run_fid_stats", "run_report"]


def _device(name: str | None) -> str:
    """The ``--device`` checked by the one rule every command shares (``tpu``, or CUDA without a GPU: exit 2)."""
    from bksdm.devices import resolve_device

    return str(resolve_device(name))


def _go_offline() -> None:
    """``--offline``: as HF_HUB_OFFLINE=1, for what is loaded from here on.

    The Hugging Face libraries read HF_HUB_OFFLINE when they are imported, which ``bksdm.cli`` has done by the
    time the option is parsed: without this a hub id that is not in the cache was retried for ~40 s before the
    error. The environment variable reaches the loaders that read it per call (``local_files_only`` of the
    CLIP loader, the Inception weights); huggingface_hub's own flag makes its downloads fail at once.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # a hub library is not needed for local weights
        return
    constants.HF_HUB_OFFLINE = True


def _progress(command: str):
    def say(message: str) -> None:
        print(f"bksdm {command}: {message} ...", file=sys.stderr, flush=True)

    return say


def _add_network_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth); default: the torch hub cache, "
        "downloaded there when online",
    )
    p.add_argument("--offline", action="store_true", help="never download weights (same as HF_HUB_OFFLINE=1)")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def add_evaluate_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``fid-stats`` and ``report`` to the ``bksdm`` parser."""
    from bksdm.eval.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
    from bksdm.eval.evaluate import METRICS

    p = sub.add_parser(
        "evaluate",
        help="FID, IS, CLIP score, KID or the shapes metrics of a folder of generated images",
        description="Score a folder of images (bksdm generate's output: images + manifest.jsonl with the prompts). "
        "FID against reference statistics (--ref, pytorch-fid's .npz format, or --ref-images), Inception Score "
        "(torch-fidelity's definition), CLIP score (OpenCLIP ViT-g/14 as in the paper, or a Hugging Face CLIP), "
        "KID; for the shapes world, prompt accuracy and Frechet distance of the shapes classifier. Writes JSON "
        "and prints a table.",
    )
    p.add_argument("--images", required=True, help="folder of generated images")
    p.add_argument(
        "--manifest", default=None, help="JSON lines with 'file' and 'prompt' (default: IMAGES/manifest.jsonl)"
    )
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated, from {','.join(METRICS)} (default: shapes for shapes-world prompts, else "
        "is + clip when there are prompts + fid when a reference is given)",
    )
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref", default=None, help="reference statistics .npz (mu, sigma), e.g. from bksdm fid-stats")
    ref.add_argument("--ref-images", default=None, help="folder of real images to compute the reference from")
    p.add_argument("--ref-resize", type=int, default=None, help="resize --ref-images the paper's way first (256)")
    p.add_argument("--save-ref", default=None, help="cache the reference computed from --ref-images in this .npz")
    p.add_argument(
        "--resize", type=int, default=None, help="resize the images the paper's way before scoring (e.g. 256)"
    )
    p.add_argument(
        "--no-jpeg", action="store_true", help="skip the JPEG (quality 75) round trip that follows a paper-style resize"
    )
    p.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        help=f"open_clip:ARCH, hf:HUB_ID or hf:FOLDER (default {DEFAULT_CLIP_MODEL}, the paper's)",
    )
    p.add_argument(
        "--clip-pretrained",
        default=DEFAULT_CLIP_PRETRAINED,
        help=f"OpenCLIP weights: a tag or a checkpoint file (default {DEFAULT_CLIP_PRETRAINED})",
    )
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    p.add_argument(
        "--shapes-reference-count",
        type=int,
        default=2000,
        help="real shapes images behind the shapes Frechet distance (default 2000, as the classifier's default)",
    )
    _add_network_options(p)
    p.add_argument("--out", default=None, help="results JSON (default IMAGES/evaluation.json)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(func=run_evaluate)

    s = sub.add_parser(
        "fid-stats",
        help="Inception statistics (mu, sigma) of a folder of real images, in pytorch-fid's .npz format",
        description="Compute FID reference statistics once (e.g. all 40,504 MS-COCO val2014 images resized to 256 "
        "the paper's way: --resize 256) and reuse them with bksdm evaluate --ref. The file is pytorch-fid's "
        "format (mu, sigma), so pytorch-fid reads ours and bksdm reads published ones.",
    )
    s.add_argument("images", help="folder of real images")
    s.add_argument("--out", required=True, help=".npz to write")
    s.add_argument("--resize", type=int, default=None, help="resize the paper's way first (bicubic squash + JPEG 75)")
    s.add_argument("--no-jpeg", action="store_true", help="skip the JPEG round trip after --resize")
    s.add_argument("--features", action="store_true", help="also store the features (needed for KID; large)")
    _add_network_options(s)
    s.set_defaults(func=run_fid_stats)

    r = sub.add_parser(
        "report",
        help="markdown + HTML report comparing models: profile, evaluation figures, image grids, a chart",
        description="Compare models side by side. Each --model NAME=DIR names a bksdm generate output folder "
        "(images, manifest.jsonl, settings.json) that may hold bksdm evaluate's evaluation.json; the pipeline to "
        "profile is read from settings.json (or given with --pipeline NAME=REF). Writes OUT/report.md, "
        "report.html, report.json, grid.png (the same prompts and seeds for every model) and chart.png.",
    )
    _add_report_arguments(r)
    r.set_defaults(func=run_report)


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bksdm report``."""
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a model's generate output folder (or evaluation JSON); repeat for each model, baseline first",
    )
    p.add_argument("--evaluation", action="append", metavar="NAME=FILE", help="a model's evaluate JSON elsewhere")
    p.add_argument("--pipeline", action="append", metavar="NAME=REF", help="pipeline folder or hub id to profile")
    p.add_argument("--no-profile", action="store_true", help="leave out parameters and MACs")
    p.add_argument("--latency", action="store_true", help="also time each pipeline (loads its weights)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps for the per-image latency (default 25)")
    p.add_argument("--columns", type=int, default=8, help="prompts in the image grid (default 8)")
    p.add_argument("--title", default="bksdm report", help="report title")
    p.add_argument("--device", default=None, help="device for --latency (default: cuda if available)")
    p.add_argument("--out", required=True, help="report folder")


def run_evaluate(args: argparse.Namespace) -> int:
    """Handle ``bksdm evaluate``."""
    from bksdm.eval.evaluate import EvaluationOptions, evaluate_folder
    from bksdm.eval.tables import format_results

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.offline:
        _go_offline()
    options = EvaluationOptions(
        metrics=metrics,
        reference=args.ref,
        ref_images=args.ref_images,
        ref_resize=args.ref_resize,
        save_reference=args.save_ref,
        resize=args.resize,
        jpeg_quality=None if args.no_jpeg else 75,
        batch_size=args.batch_size,
        device=args.device,
        inception_weights=args.inception_weights,
        download=not args.offline,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
        is_splits=args.is_splits,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        shapes_reference_count=args.shapes_reference_count,
        progress=sys.stderr.isatty(),
    )
    result, out = evaluate_folder(args.images, args.manifest, options, args.out, on_stage=_progress("evaluate"))
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else format_results(result))
    if not args.json:
        print(f"\nresults: {out}")
    return 0


def run_fid_stats(args: argparse.Namespace) -> int:
    """Handle ``bksdm fid-stats``."""
    from bksdm.eval.reference import fid_stats

    if args.offline:
        _go_offline()
    stats = fid_stats(
        args.images,
        args.out,
        resize=args.resize,
        jpeg_quality=None if args.no_jpeg else 75,
        features=args.features,
        batch_size=args.batch_size,
        device=_device(args.device),
        inception_weights=args.inception_weights,
        download=not args.offline,
        progress=sys.stderr.isatty(),
        on_stage=_progress("fid-stats"),
    )
    print(f"statistics of {stats.count} images ({stats.dim} features) written to {args.out}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Handle ``bksdm report``."""
    from bksdm.eval.report import ReportOptions, parse_named, write_report

    options = ReportOptions(
        models=parse_named(args.model, "--model"),
        evaluations=parse_named(args.evaluation or [], "--evaluation"),
        pipelines=parse_named(args.pipeline or [], "--pipeline"),
        profile=not args.no_profile,
        latency=args.latency,
        steps=args.steps,
        columns=args.columns,
        title=args.title,
        device=_device(args.device) if args.latency else "cpu",
    )
    report = write_report(args.out, options, on_stage=_progress("report"))
    print(f"report written to {args.out}/report.md and {args.out}/report.html ({len(report['models'])} models)")
    return 0
