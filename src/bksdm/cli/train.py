"""``bksdm distill`` and ``bksdm cache``: retraining a student, and encoding its data set once beforehand.

The jobs are :func:`bksdm.train.distill.distill` and :func:`bksdm.train.cache.build_cache`, both configured by
the distill recipe (:func:`bksdm.train.config.load_config`: a YAML file plus dotted overrides). A run stopped by
SIGTERM raises :class:`bksdm.train.runtime.TrainingStopped`, which :func:`bksdm.cli.main.main` turns into its
exit status.
"""

from __future__ import annotations

import argparse

__all__ = ["add_cache", "add_distill", "add_recipe_command"]


def add_recipe_command(
    sub: argparse._SubParsersAction, name: str, help: str, description: str, config_help: str, run
) -> argparse.ArgumentParser:
    """A training recipe's sub-command: ``--config`` YAML, dotted ``key=value`` overrides, ``--resume``,
    ``--overwrite``; ``run(args, overrides)`` does the rest. Shared by ``distill`` and ``lcm``."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as train.resume=...)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output folder that holds another run, deleting its checkpoints and logs "
        "(same as train.overwrite=true)",
    )

    def call(args: argparse.Namespace) -> int:
        overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
        overrides += ["train.overwrite=true"] if args.overwrite else []
        message = run(args, overrides)
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(message)
        return 0

    p.set_defaults(func=call)
    return p


def add_distill(sub: argparse._SubParsersAction) -> None:
    """Add the ``distill`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    add_recipe_command(
        sub,
        "distill",
        help="retrain a student with task loss + output KD + feature KD (BK-SDM recipe)",
        description="Distil a pruned student from its teacher. Settings come from a YAML recipe (configs/distill/) "
        "and/or dotted key=value overrides, e.g. train.max_steps=100 optim.lr=1e-4. Multi-GPU: "
        "accelerate launch -m bksdm.cli distill --config ...",
        config_help="YAML recipe (defaults: the paper's recipe)",
        run=_run_distill,
    )


def _run_distill(args: argparse.Namespace, overrides: list[str]) -> str:
    from bksdm.train.config import load_config
    from bksdm.train.distill import distill

    return f"student pipeline written to {distill(load_config(args.config, overrides))}"


def add_cache(sub: argparse._SubParsersAction) -> None:
    """Add the ``cache`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser(
        "cache",
        help="encode a data set once (VAE latents + text embeddings) so distill skips the encoders",
        description="Encode model.teacher's VAE latent distributions (both flips when data.random_flip) and the text "
        "states of all its text encoders (SDXL: both CLIPs + pooled; SD3: CLIP-L, CLIP-G and T5; FLUX.1: T5 + CLIP's "
        "pooled) for data.train into shards; then train with data.cache=OUT. Reads the same recipe as distill. The "
        "size on disk is printed and recorded in OUT/cache.json.",
    )
    p.add_argument("--out", required=True, help="cache folder (an interrupted run resumes)")
    p.add_argument("--config", default=None, help="the distill recipe whose model and data sections to use")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.train=DIR")
    p.add_argument(
        "--dtype",
        default="fp16",
        choices=("fp16", "fp32", "bf16"),
        help="storage dtype of latents and text states (fp16: half of fp32's disk, which T5-XXL's 4096-wide states "
        "fill fastest; fp32: training equals training from the images bit for bit)",
    )
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
    from bksdm.train.cache import build_cache, describe_sizes
    from bksdm.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    meta = build_cache(cfg, args.out, shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype)
    print(
        f"cached {meta['num_samples']} samples ({meta['num_skipped']} skipped) in {meta['num_shards']} shards, "
        f"{describe_sizes(meta['bytes'])}: {args.out}; train with data.cache={args.out}"
    )
    return 0
