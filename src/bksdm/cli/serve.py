"""``bksdm serve``: the local demo page (a thin wrapper around :mod:`bksdm.use.serve`).

It binds the address first (a busy port fails at once, not after minutes of loading), loads the teacher and
the students once, warms them up, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from bksdm.signals import handling

__all__ = ["add_serve", "default_sampling", "run_serve"]


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
        "--steps", type=int, default=None, help="denoising steps (default: the shapes teacher's own, else 25)"
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the shapes teacher's own, else 7.5)"
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up of each model at start")
    p.set_defaults(func=run_serve)


def default_sampling(teacher: str, steps: int | None = None, guidance: float | None = None):
    """Sampling settings: the given values, else the shapes teacher's recorded ones, else SD's usual 25 / 7.5.

    Args:
        teacher: The teacher's folder or hub id.
        steps: ``--steps``, or None.
        guidance: ``--guidance``, or None.

    Returns:
        A :class:`bksdm.use.serve.app.SamplingSettings`.

    Raises:
        ValueError: steps below 1 or a negative guidance scale.
    """
    from bksdm.use.serve.app import SamplingSettings
    from bksdm.world.teacher import SETTINGS_FILE, recommended_settings

    base: dict = {"steps": 25, "guidance_scale": 7.5}
    if (Path(teacher) / SETTINGS_FILE).is_file():  # a shapes-world teacher records how it samples best
        recorded = recommended_settings(teacher)
        base = {
            "steps": recorded["num_inference_steps"],
            "guidance_scale": recorded["guidance_scale"],
            "height": recorded["height"],
            "width": recorded["width"],
        }
    if steps is not None:
        base["steps"] = steps
    if guidance is not None:
        base["guidance_scale"] = guidance
    return SamplingSettings(**base)


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    from bksdm.loading import parse_dtype, resolve_device

    resolved = resolve_device(device)
    device = str(resolved)
    if dtype is None:
        return device, torch.float16 if resolved.type == "cuda" else torch.float32
    return device, parse_dtype(dtype)


def run_serve(args: argparse.Namespace) -> int:
    """Handle ``bksdm serve``: bind, load, warm up, serve until Ctrl-C.

    Raises:
        TeacherNotFoundError: a model cannot be found.
        ValueError: a bad option or an address that cannot be bound (the message says which and why).
    """
    from bksdm.loading import teacher_or_default
    from bksdm.use.serve.app import DemoApp, load_models
    from bksdm.use.serve.server import binding_warning, make_server

    teacher = teacher_or_default(args.teacher)
    settings = default_sampling(teacher, args.steps, args.guidance)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    warning = binding_warning(args.host)
    if warning:
        print(f"bksdm serve: warning: {warning}", file=sys.stderr, flush=True)
    try:
        server = make_server(None, args.host, args.port)  # the app is attached once the models are loaded
    except OSError as err:
        raise ValueError(
            f"cannot listen on {args.host}:{args.port}: {err.strerror or err}; "
            "pick another --port (0 picks a free one) or check --host"
        ) from None
    stop = _Stop()
    with handling([signal.SIGINT, signal.SIGTERM], stop):  # Ctrl-C or SIGTERM: stop within seconds
        try:
            print(f"loading {1 + len(args.student)} model(s) on {device} ...", flush=True)
            app = DemoApp(load_models(teacher, args.student, dtype=dtype, device=device), settings)
            if not args.no_warmup:
                app.warm_up()
            server.app = app
            print(
                f"serving {', '.join(m.name for m in app.models)} at {server.url} "
                f"({settings.steps} steps, guidance {settings.guidance_scale}); Ctrl-C to stop",
                flush=True,
            )
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopping (a generation in progress stops after its current step)", flush=True)
        finally:
            server.server_close()  # ends every connection, then waits for their threads (seconds)
    print("stopped", flush=True)
    return 0


class _Stop:
    """The signal handler: the first Ctrl-C (or SIGTERM) stops the server; it ends all requests within seconds.

    A second one while stopping is told to wait rather than raising inside the stop (a traceback, and threads
    left inside PyTorch, which aborts the process at exit).
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.requested:
            print("bksdm serve: already stopping; it takes a few seconds", file=sys.stderr, flush=True)
            return
        self.requested = True
        raise KeyboardInterrupt(signal.Signals(signum).name)
