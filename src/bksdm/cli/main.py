"""``bksdm <command>``: thin wrappers that parse arguments, call the library and print results.

Errors a user can fix (a bad plan, a missing teacher, an occupied output folder) print one clear message
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bksdm import __version__
from bksdm.artifacts import WriteFailed
from bksdm.loading import TeacherNotFoundError
from bksdm.plan.prune import OutputExistsError
from bksdm.plan.spec import PRESETS, PlanError
from bksdm.plan.surgery import SurgeryError
from bksdm.plan.unet_layout import LayoutError
from bksdm.train.cache import CacheError
from bksdm.train.checkpoints import CheckpointError, OutputInUseError
from bksdm.train.distill import TrainingSetupError
from bksdm.train.settings import ConfigError

USER_ERRORS = (
    PlanError,
    LayoutError,
    SurgeryError,
    TeacherNotFoundError,
    OutputExistsError,
    ConfigError,
    CacheError,
    TrainingSetupError,
    CheckpointError,
    OutputInUseError,
)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="remove U-Net blocks from a teacher and write a student pipeline folder",
        description="Build a student U-Net from a teacher by a plan, copy the kept weights, and write a complete "
        "diffusers pipeline (teacher's tokenizer, text encoder, VAE, scheduler + student U-Net) with "
        "a report of what was removed.",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="hub id or local folder of a diffusers SD / SDXL pipeline (default: the bundled shapes teacher)",
    )
    p.add_argument("--plan", default="bk-small", help=f"preset ({', '.join(PRESETS)}) or plan YAML (default bk-small)")
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
    t, s = report["unet"]["teacher"], report["unet"]["student"]
    removed = sum(1 for r in report["blocks"] if r["student"] is None)
    print(f"student written to {args.out} (plan {report['plan']['name']}, {removed} blocks removed)")
    print(f"  U-Net params {t['params']:,} -> {s['params']:,} ({100 * (1 - s['params'] / t['params']):.1f}% fewer)")
    print(f"  U-Net MACs/step @{report['resolution']}px {t['macs'] / 1e9:.2f}G -> {s['macs'] / 1e9:.2f}G")
    print(f"  report: {args.out}/prune_report.md")
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="inspect plans")
    plan_sub = p.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="print the blocks a plan keeps and removes, per stage")
    show.add_argument("plan", help=f"preset ({', '.join(PRESETS)}), plan YAML, or a student folder")
    where = show.add_mutually_exclusive_group()
    where.add_argument("--arch", default=None, help="architecture preset to resolve against (default sd-v1.4)")
    where.add_argument("--teacher", default=None, help="hub id or local folder whose U-Net config to use")
    show.add_argument("--json", action="store_true", help="print the resolved plan as JSON")
    show.set_defaults(func=_run_plan_show)
    listing = plan_sub.add_parser("list", help="list the presets")
    listing.set_defaults(func=lambda args: print("\n".join(f"{n:<10} {p.description}" for n, p in PRESETS.items())))


def _run_plan_show(args: argparse.Namespace) -> int:
    from bksdm.loading import load_plan, load_unet_config
    from bksdm.plan.archs import get_arch
    from bksdm.plan.prune import group_macs, unet_macs
    from bksdm.plan.render import block_rows, format_plan
    from bksdm.plan.resolved import resolve
    from bksdm.plan.spec import plan_to_dict
    from bksdm.plan.surgery import block_params

    plan = load_plan(args.plan)
    if args.teacher:
        config, name = load_unet_config(args.teacher), args.teacher
    else:
        arch = get_arch(args.arch or "sd-v1.4")
        config, name = dict(arch.unet_config), f"{arch.name} (architecture preset)"
    resolved = resolve(plan, config)
    resolution = int(config.get("sample_size", 64)) * 8
    macs = unet_macs(config, resolution)
    fates = [a for a, _ in resolved.block_fates()]
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(config)
    params = block_params(resolved, {k: tuple(v.shape) for k, v in teacher.state_dict().items()})
    rows = block_rows(resolved, params, group_macs(macs.per_module, fates))
    if args.json:
        print(
            json.dumps(
                {
                    "plan": plan_to_dict(plan),
                    "resolved": plan_to_dict(resolved.explicit()),
                    "student_config": resolved.student_config(),
                    "blocks": rows,
                    "feature_pairs": [vars(p) for p in resolved.feature_pairs()],
                },
                indent=2,
            )
        )
    else:
        print(format_plan(resolved, rows, teacher=name))
    return 0


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="retrain a student with task loss + output KD + feature KD (BK-SDM recipe)",
        description="Distil a pruned student from its teacher. Settings come from a YAML recipe (configs/distill/) "
        "and/or dotted key=value overrides, e.g. train.max_steps=100 optim.lr=1e-4. Multi-GPU: "
        "accelerate launch -m bksdm.cli distill --config ...",
    )
    p.add_argument("--config", default=None, help="YAML recipe (defaults: the paper's recipe)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as train.resume=...)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output folder that holds another run, deleting its checkpoints and logs "
        "(same as train.overwrite=true)",
    )
    p.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from bksdm.train.config import load_config
    from bksdm.train.distill import distill
    from bksdm.train.runtime import TrainingStopped

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    overrides += ["train.overwrite=true"] if args.overwrite else []
    cfg = load_config(args.config, overrides)
    try:
        target = distill(cfg)
    except TrainingStopped as stopped:
        return _stopped("distill", stopped)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"student pipeline written to {target}")
    return 0


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="encode a data set once (VAE latents + text embeddings) so distill skips the encoders",
        description="Encode model.teacher's VAE latent distributions (both flips when data.random_flip) and text "
        "embeddings of data.train into shards; then train with data.cache=OUT. Reads the same recipe as distill.",
    )
    p.add_argument("--out", required=True, help="cache folder (an interrupted run resumes)")
    p.add_argument("--config", default=None, help="the distill recipe whose model and data sections to use")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.train=DIR")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32", "bf16"), help="storage dtype (fp16)")
    p.add_argument("--shard-size", type=int, default=1024, help="source records per shard (1024)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="encoder batch size (default: sized to the memory available, at most 16; SD's VAE needs about "
        "0.75 GB an image at 512 px)",
    )
    p.set_defaults(func=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from bksdm.train.cache import build_cache
    from bksdm.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    meta = build_cache(cfg, args.out, shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype)
    print(
        f"cached {meta['num_samples']} samples ({meta['num_skipped']} skipped) in {meta['num_shards']} shards: "
        f"{args.out}; train with data.cache={args.out}"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole job on the bundled shapes teacher: prune, distill, generate, evaluate, report (offline)",
        description="Prune the bundled shapes teacher, distil the student with the real recipe, generate with "
        "teacher and student on the same prompts and seeds, evaluate (prompt accuracy, Frechet distance, params, "
        "MACs, latency) and write a report folder. About 3 minutes on 2 idle CPU cores; no network.",
    )
    p.add_argument("--out", default="bksdm-demo", help="report folder (default ./bksdm-demo)")
    p.add_argument("--plan", default="bk-tiny", help="preset or plan YAML (default bk-tiny)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps per student")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also train a task-loss-only and a randomly initialised student with the same budget",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra distill recipe overrides")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from bksdm.world.demo import DemoSettings, run_demo

    settings = DemoSettings(plan=args.plan, ablations=args.ablations, extra=list(args.overrides))
    if args.steps is not None:
        settings.steps = args.steps
    from bksdm.train.runtime import TrainingStopped

    logging.getLogger("bksdm").setLevel(logging.INFO)
    try:
        summary = run_demo(args.out, settings)
    except TrainingStopped as stopped:
        return _stopped("demo", stopped)
    print(f"\nreport: {args.out}/summary.md ({summary['seconds'] / 60:.1f} min)")
    for name, metrics in summary["models"].items():
        print(
            f"  {name:<32} prompt accuracy {metrics['prompt_accuracy']:.3f}  "
            f"Frechet {metrics['frechet_distance']:.2f}  U-Net {metrics['unet_params']:,} params"
        )
    return 0


def _stopped(command: str, stopped: Exception) -> int:
    """A run stopped by SIGTERM after writing its checkpoint: its message, and the shell's status for SIGTERM."""
    print(f"bksdm {command}: {stopped}", file=sys.stderr, flush=True)
    return 128 + signal.SIGTERM


def build_parser() -> argparse.ArgumentParser:
    """The ``bksdm`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="bksdm",
        description="Make Stable Diffusion small and fast: block removal + knowledge distillation.",
    )
    parser.add_argument("--version", action="version", version=f"bksdm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_plan(sub)
    _add_distill(sub)
    _add_cache(sub)
    _add_demo(sub)
    from bksdm.cli.img2img import add_img2img

    add_img2img(sub)
    from bksdm.cli.export import add_export

    add_export(sub)
    from bksdm.cli.profile import add_profile

    add_profile(sub)
    from bksdm.cli.generate import add_coco_prompts, add_generate

    add_generate(sub)
    add_coco_prompts(sub)
    from bksdm.cli.serve import add_serve

    add_serve(sub)
    from bksdm.cli.dreambooth import add_dreambooth, add_dreambooth_eval

    add_dreambooth(sub)
    add_dreambooth_eval(sub)
    from bksdm.cli.evaluate import add_evaluate_commands

    add_evaluate_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bksdm`` command."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        result = args.func(args)
    except (*USER_ERRORS, ValueError) as err:  # ValueError: option values the library rejects with a message
        if args.verbose:
            raise
        return _fail(args.command, str(err), 2)
    except WriteFailed as err:  # full disk, read-only folder: nothing partial was left
        return _fail(args.command, err.strerror or str(err), 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError) as err:
        if args.verbose:
            raise
        return _fail(args.command, _os_message(err), 2)  # a path the user gave: they can fix it
    except OSError as err:  # the environment failed (I/O error, full disk outside an atomic write)
        if args.verbose:
            raise
        return _fail(args.command, _os_message(err), 1)
    except MemoryError:
        return _fail(args.command, "out of memory: use a smaller batch size or resolution", 1)
    except KeyboardInterrupt:
        print(f"bksdm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _fail(command: str, message: str, status: int) -> int:
    print(f"bksdm {command}: error: {message}", file=sys.stderr)
    return status


def _os_message(err: OSError) -> str:
    """An OSError as one line: what failed, on which path (OSError's own text is ``[Errno N] ...``)."""
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        from bksdm.artifacts import describe_failure

        return describe_failure(err, Path(err.filename or "."))
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


def _configure_logging(verbose: bool) -> None:
    """Our INFO logs with -v; the libraries' own chatter (loading bars, dtype notes) only with -v."""
    import warnings

    import diffusers
    import transformers

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")


if __name__ == "__main__":
    sys.exit(main())
