"""Run the demo page: bind the address, load the models once, warm them up, serve until Ctrl-C or SIGTERM.

What ``bksdm serve`` runs (:mod:`bksdm.cli.serve` only parses the options, prints the binding warning and calls
:func:`serve_models`). The address is bound before the models load, so a busy port fails at once rather than
after minutes of loading; requests that arrive meanwhile are answered with 503.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence

import torch

from bksdm.signals import handling
from bksdm.use.serve.app import DemoApp, SamplingSettings, load_models
from bksdm.use.serve.server import make_server

__all__ = ["serve_models"]

logger = logging.getLogger(__name__)


def serve_models(
    teacher: str,
    students: Sequence[str],
    settings: SamplingSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    warm_up: bool = True,
    say: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Serve the teacher and the students on one page until SIGINT or SIGTERM; return once every request ended.

    Args:
        teacher: Hub id or local folder of the teacher's pipeline.
        students: Hub ids or local folders of student pipelines (none: the teacher alone).
        settings: Sampling settings shared by every model.
        host: Address to listen on (a non-loopback one opens the page to the network: see
            :func:`bksdm.use.serve.server.binding_warning`).
        port: Port to listen on (0: any free port).
        device: Device to run the models on.
        dtype: Torch dtype of the weights (default float32).
        warm_up: Run each model once for one step before serving, so that the first request is timed fairly.
        say: Called with each progress line (loading, the address being served, stopping); default: logged.
        warn: Called with a line for the user when a second signal arrives while stopping; default: logged.

    Raises:
        ValueError: The address cannot be bound (the message says why and which option to change).
        TeacherNotFoundError: A model cannot be found.
    """
    say = say or logger.info
    try:
        server = make_server(None, host, port)  # the app is attached once the models are loaded
    except OSError as err:
        raise ValueError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; "
            "pick another --port (0 picks a free one) or check --host"
        ) from None
    stop = _Stop(warn or logger.warning)
    with handling([signal.SIGINT, signal.SIGTERM], stop):  # Ctrl-C or SIGTERM: stop within seconds
        try:
            say(f"loading {1 + len(students)} model(s) on {device} ...")
            app = DemoApp(load_models(teacher, students, dtype=dtype, device=device), settings)
            if warm_up:
                app.warm_up()
            server.app = app
            say(
                f"serving {', '.join(m.name for m in app.models)} at {server.url} "
                f"({settings.steps} steps, guidance {settings.guidance_scale}); Ctrl-C to stop"
            )
            server.serve_forever()
        except KeyboardInterrupt:
            say("stopping (a generation in progress stops after its current step)")
        finally:
            server.server_close()  # ends every connection, then waits for their threads (seconds)
    say("stopped")


class _Stop:
    """The signal handler: the first Ctrl-C (or SIGTERM) stops the server; it ends all requests within seconds.

    A second one while stopping is told to wait rather than raising inside the stop (a traceback, and threads
    left inside PyTorch, which aborts the process at exit).
    """

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.requested = False
        self._warn = warn

    def __call__(self, signum: int, frame: object) -> None:
        if self.requested:
            self._warn("already stopping; it takes a few seconds")
            return
        self.requested = True
        raise KeyboardInterrupt(signal.Signals(signum).name)
