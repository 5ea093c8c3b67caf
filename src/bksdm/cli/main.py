"""``bksdm <command>``: the parser, the entry point and the mapping of errors to exit statuses.

Each command family parses its own arguments in its own module (:mod:`bksdm.cli.plan`, :mod:`bksdm.cli.train`,
:mod:`bksdm.cli.world`, :mod:`bksdm.cli.generate`, ...) and calls one library job. Errors a user can fix (a bad
plan, a missing teacher, an occupied output folder) print one clear message and exit with status 2; no
traceback. A failed write or another OS error exits with 1; a run stopped by SIGTERM after its checkpoint with
143 (the shell's status for SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bksdm import __version__
from bksdm.artifacts import WriteFailed
from bksdm.cli.lcm import add_lcm
from bksdm.cli.plan import add_plan, add_prune
from bksdm.cli.train import add_cache, add_distill
from bksdm.cli.world import add_demo
from bksdm.loading import TeacherNotFoundError
from bksdm.plan.prune import OutputExistsError
from bksdm.plan.spec import PlanError
from bksdm.plan.surgery import SurgeryError
from bksdm.plan.unet_layout import LayoutError
from bksdm.train.cache import CacheError
from bksdm.train.checkpoints import CheckpointError, OutputInUseError
from bksdm.train.distill import TrainingSetupError
from bksdm.train.runtime import TrainingStopped
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
    add_prune(sub)
    add_plan(sub)
    add_distill(sub)
    add_cache(sub)
    add_lcm(sub)
    add_demo(sub)
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
    from bksdm.cli.adapt import add_adapt

    add_adapt(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bksdm`` command."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        result = args.func(args)
    except TrainingStopped as stopped:  # SIGTERM: the run wrote its checkpoint and stopped
        return _stopped(args.command, stopped)
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
