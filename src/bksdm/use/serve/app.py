"""A local demo page: type a prompt, see the teacher's and the students' images side by side with their times.

Built on the standard library's :class:`http.server.ThreadingHTTPServer`: one HTML page and a small JSON API,
no web framework to install. The pieces are separate so that each can be tested on its own:

- :class:`DemoApp` holds the loaded pipelines and answers requests as plain Python (validate, generate,
  encode); it knows nothing about HTTP.
- :func:`make_server` wraps an app in an HTTP server (``GET /``, ``GET /api/models``, ``POST /api/generate``).
- ``bksdm serve`` (:mod:`bksdm.cli.serve`) loads the models once, builds both and serves until Ctrl-C.

Every model draws from the same seed for a request, so the images differ only by the model (the same
initial latent), and the same prompt and seed always give the same image. Generation is serialised with a
lock: one request at a time uses the models, others wait.

What a client sends cannot take the server down or hold it: every malformed request is answered with a 4xx
status and a JSON ``{"error": ...}`` saying what was wrong (never a 500), a client has
:data:`REQUEST_TIMEOUT_S` to send its whole request, and :meth:`DemoServer.server_close` ends within seconds
whatever the clients are doing (a generation in progress stops after its current denoising step).
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from bksdm.eval.generate import generate_images
from bksdm.sampling import check_guidance, check_scheduler_steps, check_side, check_steps
from bksdm.use.serve.page import PAGE

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "REQUEST_TIMEOUT_S",
    "STOP_GRACE_S",
    "DemoApp",
    "DemoServer",
    "RequestError",
    "SamplingSettings",
    "ServedModel",
    "binding_warning",
    "decode_json_body",
    "is_loopback",
    "load_models",
    "make_server",
    "parse_generate_request",
]

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 500
"""Longest prompt accepted. CLIP reads at most 77 tokens anyway; this only stops absurd request bodies."""

MAX_SEED = 2**32 - 1
"""Largest seed accepted (seeds are 32-bit, as everywhere in bksdm)."""

MAX_BODY_BYTES = 16 * 1024
"""Largest request body read; a prompt and a seed need a few hundred bytes."""

REQUEST_TIMEOUT_S = 15.0
"""Time a client has to send its whole request (request line, headers and body), and to take each answer.

A deadline for the whole request, not per read: a client that sends half a request and waits, or one byte every
few seconds, has its connection closed (with a 408 answer if it had started a request) instead of holding a
handler thread. Read when each connection opens, so tests can lower it."""

STOP_GRACE_S = 2.0
"""At stop, how long connections get to end on their own after their reading side is shut, before they are cut."""

_MAX_INT_DIGITS = 20
"""Longer integers in a request body are not converted (a seed has at most 10 digits; Python refuses to convert
more than 4300 digits and would raise)."""

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status to answer and a message saying what to fix."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SamplingSettings:
    """How every model samples: the same settings for all, so only the model differs between images."""

    steps: int = 25
    """Denoising steps per image."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (1 turns guidance off)."""
    height: int | None = None
    """Image height in pixels (None: the pipeline's native size)."""
    width: int | None = None
    """Image width in pixels (None: the pipeline's native size)."""

    def __post_init__(self) -> None:  # the rules of every sampling command (bksdm.sampling)
        check_steps(self.steps, "steps")
        check_guidance(self.guidance_scale, "guidance")
        for option, side in (("height", self.height), ("width", self.width)):
            if side is not None:
                check_side(side, option, 8)


@dataclass(frozen=True)
class ServedModel:
    """One pipeline on the page."""

    name: str
    """Label on the page and in the API (``teacher``, ``student``, ``student 2``, ...)."""
    source: str
    """Where it was loaded from (folder or hub id), shown under the label."""
    pipe: Any
    """A diffusers text-to-image pipeline."""

    @property
    def unet_params(self) -> int:
        """Parameters of the pipeline's U-Net."""
        return sum(p.numel() for p in self.pipe.unet.parameters())


def parse_generate_request(payload: Any) -> tuple[str, int]:
    """Validate the body of ``POST /api/generate``: ``{"prompt": str, "seed": int (optional, default 0)}``.

    Args:
        payload: The decoded JSON body.

    Returns:
        ``(prompt, seed)``, the prompt with surrounding white space removed.

    Raises:
        RequestError: the body is not an object, has unknown fields, an empty or too long prompt, or a seed
            that is not an integer in ``[0, MAX_SEED]``. The message names the field and the fix.
    """
    if not isinstance(payload, dict):
        raise RequestError('expected a JSON object like {"prompt": "a red circle", "seed": 0}')
    unknown = sorted(set(payload) - {"prompt", "seed"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are 'prompt' and 'seed'")
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"'prompt' must be a string (got {_json_type(prompt)}): type what to draw")
    surrogate = re.search("[\ud800-\udfff]", prompt)
    if surrogate:  # a lone half of a UTF-16 pair ("\ud800" in JSON): no text, and the tokenizer cannot take it
        raise RequestError(
            f"'prompt' holds an unpaired UTF-16 surrogate (\\u{ord(surrogate.group()):04x} at character "
            f"{surrogate.start() + 1}), which is not text: send the prompt as valid Unicode"
        )
    prompt = prompt.strip()
    if not prompt:
        raise RequestError("'prompt' is empty: type what to draw")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    seed = payload.get("seed", 0)
    # bool is an int subclass in Python; a JSON true is not a seed.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestError(f"'seed' must be an integer from 0 to {MAX_SEED} (got {_echo(seed)})")
    return prompt, seed


class _Unconverted:
    """A number of a request body kept as its text: too many digits for an int, too large for a float."""

    def __init__(self, text: str, kind: str) -> None:
        self.text = text
        self.kind = kind

    def __str__(self) -> str:
        if self.kind == "int":
            sign = "-" if self.text.startswith("-") else ""
            return f"a {sign}{len(self.text.lstrip('-'))}-digit integer"
        return f"{self.text[:20]}{'...' if len(self.text) > 20 else ''}, too large for a number"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return value.kind if isinstance(value, _Unconverted) else type(value).__name__


def _echo(value: Any, limit: int = 40) -> str:
    """A received value as JSON, shortened, for an error message."""
    if isinstance(value, _Unconverted):
        return str(value)
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_int(text: str) -> int | _Unconverted:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _Unconverted(text, "int")


def _parse_float(text: str) -> float | _Unconverted:
    value = float(text)
    return value if math.isfinite(value) else _Unconverted(text, "float")


def _refuse_constant(name: str) -> None:
    raise RequestError(f"request body is not valid JSON ({name} is not a JSON value)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:  # json.loads would keep the last silently: the user meant one of them
            raise RequestError(f"field {_echo(key)} is given twice: give each field once")
        result[key] = value
    return result


def decode_json_body(body: bytes) -> Any:
    """Decode a request body as strict JSON in UTF-8.

    Stricter than :func:`json.loads`: ``NaN`` and ``Infinity`` are refused (they are not JSON), a key given twice
    is refused (rather than silently keeping the last), and an integer of more than 20 digits or a number beyond
    a float's range (``1e400``) is kept as its text (Python refuses to convert more than 4300 digits and turns
    ``1e400`` into infinity; no such number is a valid value here).

    Raises:
        RequestError: not UTF-8, not JSON, nested too deeply to parse, a key given twice.
    """
    if not body:
        raise RequestError('request body is empty: send a JSON object like {"prompt": "a red circle", "seed": 0}')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(
            f"request body is not UTF-8 (byte 0x{body[err.start]:02x} at offset {err.start}): send JSON in UTF-8"
        ) from None
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as err:
        raise RequestError(f"request body is not valid JSON ({err})") from None
    except RecursionError:
        raise RequestError(
            'request body is nested too deeply to parse: send a flat JSON object like {"prompt": "a red circle"}'
        ) from None


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class DemoApp:
    """The demo's logic, without HTTP: the models, their sampling settings, and one lock around generation.

    Args:
        models: The pipelines to show, in page order (the teacher first); names must be unique.
        settings: Sampling settings shared by every model.

    Raises:
        ValueError: no models, or two models with the same name.
    """

    def __init__(self, models: Sequence[ServedModel], settings: SamplingSettings | None = None) -> None:
        if not models:
            raise ValueError("the demo needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique (got {names})")
        self.models = list(models)
        self.settings = settings or SamplingSettings()
        for model in self.models:  # refused at start, not at every request
            check_scheduler_steps(model.pipe.scheduler, self.settings.steps, "steps")
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def busy(self) -> bool:
        """Whether a generation (or the warm-up) is running."""
        return self._lock.locked()

    def stop(self) -> None:
        """Refuse new generations (503) and end the one in progress after its current denoising step.

        Called from another thread (the server's, at Ctrl-C); the generating thread then raises
        :class:`RequestError` with status 503. Final: the app does not generate again.
        """
        self._stopping.set()

    def info(self) -> dict[str, Any]:
        """What ``GET /api/models`` answers: the models and the sampling settings."""
        return {
            "models": [{"name": m.name, "source": m.source, "unet_params": m.unet_params} for m in self.models],
            "steps": self.settings.steps,
            "guidance_scale": self.settings.guidance_scale,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_seed": MAX_SEED,
        }

    def warm_up(self) -> None:
        """Run each model once for one step, so that one-time costs do not land in the first timed request."""
        with self._lock:
            for model in self.models:
                generate_images(
                    model.pipe,
                    ["warm up"],
                    [0],
                    steps=1,
                    guidance_scale=self.settings.guidance_scale,
                    batch_size=1,
                    height=self.settings.height,
                    width=self.settings.width,
                )

    def generate(self, prompt: str, seed: int) -> dict[str, Any]:
        """One image per model for ``prompt`` from ``seed``, with each model's wall-clock time.

        Returns:
            ``{"prompt", "seed", "steps", "guidance_scale", "models": [{"name", "source", "image", "seconds",
            "width", "height"}]}`` where ``image`` is a ``data:image/png;base64,...`` URL.
        """
        results = []
        with self._lock:  # one request at a time: timings stay honest and memory stays bounded
            for model in self.models:
                if self._stopping.is_set():  # queued behind the lock while the server was stopped
                    raise _stopping_error()
                started = time.perf_counter()
                (image,) = generate_images(
                    _Stoppable(model.pipe, self._stopping),
                    [prompt],
                    [seed],
                    steps=self.settings.steps,
                    guidance_scale=self.settings.guidance_scale,
                    batch_size=1,
                    height=self.settings.height,
                    width=self.settings.width,
                )
                seconds = time.perf_counter() - started  # PIL output: the device has finished
                results.append(
                    {
                        "name": model.name,
                        "source": model.source,
                        "image": _png_data_url(image),
                        "seconds": round(seconds, 4),
                        "width": image.width,
                        "height": image.height,
                    }
                )
        return {
            "prompt": prompt,
            "seed": seed,
            "steps": self.settings.steps,
            "guidance_scale": self.settings.guidance_scale,
            "models": results,
        }

    def handle_generate(self, payload: Any) -> dict[str, Any]:
        """Validate a decoded ``POST /api/generate`` body, then generate.

        Raises:
            RequestError: a bad request (see :func:`parse_generate_request`).
        """
        prompt, seed = parse_generate_request(payload)
        return self.generate(prompt, seed)


def _stopping_error() -> RequestError:
    return RequestError("the server is stopping: the request was not answered", HTTPStatus.SERVICE_UNAVAILABLE)


class _Stopped(Exception):
    """Raised between denoising steps to end a generation when the server stops."""


class _Stoppable:
    """A pipeline that ends its call between two denoising steps once ``stopping`` is set.

    Stopping between steps (rather than leaving a thread inside PyTorch at exit, which aborts the process) keeps
    Ctrl-C within one step of any request. Pipelines whose call has no ``callback_on_step_end`` run to the end.
    """

    def __init__(self, pipe: Any, stopping: threading.Event) -> None:
        self._pipe = pipe
        self._stopping = stopping

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "callback_on_step_end" in inspect.signature(self._pipe.__call__).parameters:
            kwargs["callback_on_step_end"] = self._check
        try:
            return self._pipe(*args, **kwargs)
        except _Stopped:
            raise _stopping_error() from None

    def _check(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._stopping.is_set():
            raise _Stopped
        return callback_kwargs


def load_models(
    teacher: str,
    students: Sequence[str],
    *,
    dtype: Any = None,
    device: str = "cpu",
) -> list[ServedModel]:
    """Load the teacher and the students once, named ``teacher`` and ``student`` (``student 1``, ... if several).

    Args:
        teacher: Hub id or local folder of a diffusers pipeline.
        students: Hub ids or local folders of student pipelines (``bksdm prune`` / ``distill`` outputs).
        dtype: Torch dtype of the weights (default float32).
        device: Device to run on.

    Raises:
        TeacherNotFoundError: a model is neither a local pipeline folder nor reachable on the hub.
    """
    import torch

    from bksdm.loading import load_pipeline

    dtype = dtype or torch.float32
    named = [("teacher", teacher)]
    if len(students) == 1:
        named.append(("student", students[0]))
    else:
        named.extend((f"student {i + 1}", ref) for i, ref in enumerate(students))
    models = []
    for name, ref in named:
        pipe = load_pipeline(ref, dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        models.append(ServedModel(name=name, source=os.fspath(ref), pipe=pipe))
    return models


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def binding_warning(host: str) -> str | None:
    """The warning to print before serving on ``host``, or None for a loopback address."""
    if is_loopback(host):
        return None
    return (
        f"binding to {host}: anyone who can reach this machine on the network can use the page and the models "
        "(no authentication, no TLS). Use the default --host 127.0.0.1 unless you mean to share it."
    )


class DemoServer(ThreadingHTTPServer):
    """An HTTP server that serves one :class:`DemoApp`; each connection runs in its own thread.

    The server keeps each connection's socket and thread, so that :meth:`server_close` ends within seconds
    whatever the clients do: it shuts every connection's reading side (idle and half-sent requests end at once),
    stops the generation in progress after its current step, cuts the connections still open after
    :data:`STOP_GRACE_S` (a client that does not read its answer), then joins the threads. Joining matters:
    a thread left inside PyTorch when the process exits makes it abort ("terminate called without an active
    exception", exit status -6, seen in about 1 run in 3 with unjoined daemon threads). The threads are daemon
    threads only as a last resort, should one never end.
    """

    daemon_threads = True
    block_on_close = False  # server_close joins the threads itself, after ending their connections

    def __init__(self, address: tuple[str, int], app: DemoApp | None) -> None:
        self.app = app  # None until the models are loaded: requests are then answered with 503
        self.stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        if ":" in address[0]:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        # Bound to loopback, only loopback Host headers are accepted: a web page the user visits cannot use
        # DNS rebinding to reach the demo through a name of its own.
        self.check_host = is_loopback(address[0])

    @property
    def url(self) -> str:
        """The page's address, with the port actually bound (useful with port 0)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    @property
    def open_connections(self) -> int:
        """Connections whose handler thread is still running."""
        with self._connections_lock:
            return len(self._connections)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Handle the connection in a new thread, kept with its socket until it ends."""
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                del self._connections[request]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A handler failed unexpectedly (bad requests and lost clients are answered or logged by the handler)."""
        logger.exception("request from %s failed", client_address[0])

    def server_close(self) -> None:
        """Stop listening and end every connection; returns within about :data:`STOP_GRACE_S` plus the time of
        one denoising step (the generation in progress, if any, stops after its current step)."""
        self.stopping.set()
        if self.app is not None:
            self.app.stop()
        super().server_close()  # the listening socket
        self._shutdown_connections(socket.SHUT_RD)  # a thread waiting for a request reads its end now
        if not self._join(STOP_GRACE_S):
            self._shutdown_connections(socket.SHUT_RDWR)  # a thread writing to a client that does not read
            while not self._join(60.0):
                logger.warning("still waiting for %d request(s) to end", self.open_connections)

    def _shutdown_connections(self, how: int) -> None:
        with self._connections_lock:
            sockets = list(self._connections)
        for sock in sockets:
            with contextlib.suppress(OSError):  # closed meanwhile by its own thread
                sock.shutdown(how)

    def _join(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every connection's thread; whether all have ended."""
        deadline = time.monotonic() + seconds
        with self._connections_lock:
            threads = list(self._connections.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)


def make_server(app: DemoApp | None, host: str = "127.0.0.1", port: int = 7860) -> DemoServer:
    """Bind an HTTP server for ``app`` (port 0: any free port); call ``serve_forever()`` to serve.

    ``app`` may be None and set later (``server.app = ...``): ``bksdm serve`` binds first, so that a busy port
    fails before the models load.

    Raises:
        OSError: the address cannot be bound (port in use, unknown host).
    """
    return DemoServer((host, port), app)


class _RequestTimeout(Exception):
    """The client did not send its request within :data:`REQUEST_TIMEOUT_S`.

    Not a TimeoutError on purpose: http.server swallows those silently, and this one is answered with 408.
    """


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side with one deadline for everything read, however the bytes trickle in."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self.received = 0
        """Bytes received so far."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _RequestTimeout
        self._sock.settimeout(left)
        try:
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            raise _RequestTimeout from None
        self.received += count
        return count


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "bksdm-serve"
    default_request_version = "HTTP/1.0"  # so that the answer to a malformed request line has a status line

    def setup(self) -> None:
        super().setup()
        # One deadline for the whole request instead of a blocking file: see REQUEST_TIMEOUT_S.
        self.rfile.close()  # the plain socket file made above (closing it leaves the socket open)
        self._reader = _DeadlineReader(self.connection, time.monotonic() + REQUEST_TIMEOUT_S)
        self.rfile = io.BufferedReader(self._reader)
        self._body_read = False
        # What an answer needs if the request line never arrives whole (parse_request sets the real ones).
        self.request_version, self.requestline, self.command = "HTTP/1.0", "", None

    def handle(self) -> None:
        try:
            super().handle()
        except _RequestTimeout:  # in the request line or the headers (the body's is answered by do_POST)
            if self._reader.received:  # an idle connection that never began a request is just closed
                message = f"the request did not arrive whole within {REQUEST_TIMEOUT_S:g} s: send it at once"
                with contextlib.suppress(OSError):  # the client may be gone
                    self._refuse(RequestError(message, HTTPStatus.REQUEST_TIMEOUT))
        except OSError as err:  # the client went away or stopped reading (or the server is stopping)
            logger.info("connection from %s ended: %s", self.address_string(), err)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._ready():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/api/models":
            self._send_json(HTTPStatus.OK, self.server.app.info())
        elif path == "/api/generate":
            self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST with a JSON body for /api/generate")
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no such page: {path}; the page is / and the API /api/generate")

    def do_POST(self) -> None:  # noqa: N802
        if not self._ready():
            return
        path = self.path.split("?", 1)[0]
        if path != "/api/generate":
            self._refuse(RequestError(f"no such endpoint: POST {path}; use POST /api/generate", HTTPStatus.NOT_FOUND))
            return
        try:
            payload = self._read_json()
            result = self.server.app.handle_generate(payload)
        except RequestError as err:
            self._refuse(err)
            return
        except Exception as err:  # a failure inside a pipeline: answer, log, keep serving
            logger.exception("generation failed")
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {type(err).__name__}: {err}")
            return
        self._send_json(HTTPStatus.OK, result)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, an unknown method), in JSON like ours."""
        self.close_connection = True
        if self.server.stopping.is_set():  # a request cut short by server_close, not by the client
            self._refuse(_stopping_error())
        elif code == HTTPStatus.NOT_IMPLEMENTED:  # a method without a do_ method
            self._refuse(
                RequestError(
                    f"method {self.command} is not supported: use GET for the page and POST for /api/generate",
                    HTTPStatus.METHOD_NOT_ALLOWED,
                ),
                {"Allow": "GET, POST"},
            )
        else:
            try:
                status = HTTPStatus(code)
            except ValueError:
                status = HTTPStatus.BAD_REQUEST
            text = f"{message or status.phrase}{': ' + explain if explain else ''}"
            hint = "send an HTTP/1.x request: GET /, GET /api/models or POST /api/generate"
            self._refuse(RequestError(f"{text}; {hint}", status))

    def _read_json(self) -> Any:
        media_type, _, parameters = self.headers.get("Content-Type", "").partition(";")
        media_type = media_type.strip().lower()
        if media_type != "application/json":
            raise RequestError(
                f"send the body as JSON with Content-Type: application/json (got '{media_type or 'none'}')",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        charset = re.search(r"charset\s*=\s*\"?([^\";\s]*)", parameters, re.IGNORECASE)
        if charset and charset.group(1).lower() not in ("utf-8", "utf8"):
            raise RequestError(
                f"send the JSON in UTF-8 (got charset={charset.group(1)[:40]})", HTTPStatus.UNSUPPORTED_MEDIA_TYPE
            )
        return decode_json_body(self._read_body())

    def _read_body(self) -> bytes:
        """The body, exactly Content-Length bytes of it, or a RequestError saying what is wrong with the framing."""
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            raise RequestError(
                f"Transfer-Encoding '{encoding[:40]}' is not supported: send the body whole, with a Content-Length"
            )
        values = [value.strip() for value in self.headers.get_all("Content-Length") or []]
        if not values:
            raise RequestError("Content-Length is missing: send the body's length in bytes")
        if len(set(values)) > 1:
            raise RequestError(f"Content-Length is given {len(values)} times with different values: give it once")
        text = values[0]
        if not re.fullmatch(r"[0-9]+", text):  # int() would also take '+5', ' 5', '1_0' or Arabic-Indic digits
            what = "negative" if re.fullmatch(r"-[0-9]+", text) else "not a number of bytes"
            raise RequestError(f"Content-Length '{text[:40]}' is {what}: send the body's length in bytes")
        if len(text.lstrip("0")) > len(str(MAX_BODY_BYTES)) or int(text) > MAX_BODY_BYTES:
            shown = text if len(text) <= 20 else f"a {len(text)}-digit number of"
            raise RequestError(
                f"request body is {shown} bytes; at most {MAX_BODY_BYTES}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        length = int(text)
        try:
            body = self.rfile.read(length)
        except _RequestTimeout:
            raise RequestError(
                f"the request body did not arrive whole within {REQUEST_TIMEOUT_S:g} s (Content-Length: {length}): "
                "send it at once",
                HTTPStatus.REQUEST_TIMEOUT,
            ) from None
        if len(body) < length:
            if self.server.stopping.is_set():  # the reading side was shut by server_close, not by the client
                raise _stopping_error()
            raise RequestError(
                f"request body ended after {len(body)} of its {length} bytes (Content-Length): send the whole body"
            )
        self._body_read = True
        return body

    def _ready(self) -> bool:
        """Refuse (and answer) a request with a foreign Host header, before the models are loaded or at stop."""
        if self.server.check_host:
            host = self.headers.get("Host", "")
            name = host if host.endswith("]") else host.rsplit(":", 1)[0]
            if not is_loopback(name):
                self._refuse(
                    RequestError(f"Host '{host}' refused: open the page at {self.server.url}", HTTPStatus.FORBIDDEN)
                )
                return False
        if self.server.stopping.is_set():
            self._refuse(_stopping_error())
            return False
        if self.server.app is None:
            self._refuse(
                RequestError("the models are still loading; try again shortly", HTTPStatus.SERVICE_UNAVAILABLE)
            )
            return False
        return True

    def _refuse(self, error: RequestError, headers: dict[str, str] | None = None) -> None:
        """Answer ``error``; then, if the request may not have been read to its end, linger before closing."""
        self.close_connection = True
        self._send_error(error.status, str(error), headers)
        if not self._body_read:
            self._linger()

    def _linger(self) -> None:
        """After an answer, read and drop what the client still sends, until it closes or for up to 1 s.

        Closing a socket with unread data resets the connection, and the client may then lose the answer it has
        not read yet (a 413, say) and see only "connection reset".
        """
        deadline = time.monotonic() + 1.0
        with contextlib.suppress(OSError):  # the client reset the connection, or 1 s has passed
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees its end
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(65536):
                    return

    def _send_json(self, status: HTTPStatus, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _send_error(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message, "status": int(status)}).encode("utf-8")
        self._send(status, body, "application/json", headers)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.connection.settimeout(REQUEST_TIMEOUT_S)  # a client that does not read its answer is cut off too
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's signature)
        logger.info("%s %s", self.address_string(), format % args)
