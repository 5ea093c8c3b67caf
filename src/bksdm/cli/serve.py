"""``bksdm serve``: the local demo page; parses the options and runs :func:`bksdm.use.serve.run.serve_models`.

It binds the address first (a busy port fails at once, not after minutes of loading), loads the teacher and
the students once, warms them up, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from bksdm.sampling import table_help

__all__ = ["add_serve", "run_serve"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535; 0 picks a free port)")
    return port


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser(
        "serve",
        help="a local web page: type a prompt, see teacher and student images side by side with their times",
        description="Load the teacher and the students once and serve a page where you type a prompt and a seed "
        "and see every model's image and generation time side by side (the same seed gives every model the same "
        "starting noise). JSON API: POST /api/generate {prompt, seed}; GET /api/models. Binds to 127.0.0.1: "
        "only this machine can open it unless --host says otherwise.",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="hub id or local folder of a diffusers pipeline (default: the bundled shapes teacher)",
    )
    p.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="S",
        help="student pipeline folder or hub id (repeat for several; none: the teacher alone)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps (default: the shapes teacher's own, else {table_help('text-to-image', 'steps')})",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale, for FLUX.1 its embedded guidance (default: the shapes teacher's own, else "
        f"{table_help('text-to-image', 'guidance_scale')})",
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height (default: the shapes teacher's own, else the teacher's native size; 1024 for FLUX.1)",
    )
    p.add_argument("--width", type=int, default=None, help="image width, as --height")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up of each model at start")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Handle ``bksdm serve``: bind, load, warm up, serve until Ctrl-C.

    Raises:
        TeacherNotFoundError: a model cannot be found.
        ValueError: a bad option or an address that cannot be bound (the message says which and why).
    """
    from bksdm.devices import resolve_device, resolve_dtype
    from bksdm.loading import teacher_or_default
    from bksdm.use.serve.app import default_sampling
    from bksdm.use.serve.run import serve_models
    from bksdm.use.serve.server import binding_warning

    teacher = teacher_or_default(args.teacher)
    settings = default_sampling(teacher, args.steps, args.guidance, args.height, args.width)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    warning = binding_warning(args.host)
    if warning:
        print(f"bksdm serve: warning: {warning}", file=sys.stderr, flush=True)
    serve_models(
        teacher,
        args.student,
        settings,
        host=args.host,
        port=args.port,
        device=str(device),
        dtype=dtype,
        warm_up=not args.no_warmup,
        say=lambda line: print(line, flush=True),
        warn=lambda line: print(f"bksdm serve: {line}", file=sys.stderr, flush=True),
    )
    return 0
