"""A local demo page: type a prompt, see the teacher's and the students' images side by side with their times.

Built on the standard library's :class:`http.server.ThreadingHTTPServer`: one HTML page and a small JSON API,
no web framework to install. The pieces are separate so that each can be tested on its own:

- :class:`DemoApp` holds the loaded pipelines and answers requests as plain Python (validate, generate,
  encode); it knows nothing about HTTP.
- :func:`make_server` wraps an app in an HTTP server (``GET /``, ``GET /api/models``, ``POST /api/generate``).
- ``bksdm serve`` (:mod:`bksdm.serve_cmd`) loads the models once, builds both and serves until Ctrl-C.

Every model draws from the same seed for a request, so the images differ only by the model (the same
initial latent), and the same prompt and seed always give the same image. Generation is serialised with a
lock: one request at a time uses the models, others wait.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from bksdm.generate import generate_images
from bksdm.serve_page import PAGE

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "DemoApp",
    "DemoServer",
    "RequestError",
    "SamplingSettings",
    "ServedModel",
    "binding_warning",
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

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance scale must be 0 or more (got {self.guidance_scale})")


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
    prompt = prompt.strip()
    if not prompt:
        raise RequestError("'prompt' is empty: type what to draw")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    seed = payload.get("seed", 0)
    # bool is an int subclass in Python; a JSON true is not a seed.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestError(f"'seed' must be an integer from 0 to {MAX_SEED} (got {json.dumps(seed)})")
    return prompt, seed


def _json_type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


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
        self._lock = threading.Lock()

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
                started = time.perf_counter()
                (image,) = generate_images(
                    model.pipe,
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
    """An HTTP server that serves one :class:`DemoApp`; each request runs in its own thread.

    ``server_close()`` waits for the requests in flight. With daemon threads, a Ctrl-C right after a request
    let the process exit while the request's thread was still finishing, and PyTorch aborted at exit
    ("terminate called without an active exception", exit status -6, in about 1 run in 3).
    """

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], app: DemoApp | None) -> None:
        self.app = app  # None until the models are loaded: requests are then answered with 503
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


def make_server(app: DemoApp | None, host: str = "127.0.0.1", port: int = 7860) -> DemoServer:
    """Bind an HTTP server for ``app`` (port 0: any free port); call ``serve_forever()`` to serve.

    ``app`` may be None and set later (``server.app = ...``): ``bksdm serve`` binds first, so that a busy port
    fails before the models load.

    Raises:
        OSError: the address cannot be bound (port in use, unknown host).
    """
    return DemoServer((host, port), app)


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "bksdm-serve"

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
            self._send_error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}; use POST /api/generate")
            return
        try:
            payload = self._read_json()
            result = self.server.app.handle_generate(payload)
        except RequestError as err:
            self._send_error(err.status, str(err))
            return
        except Exception as err:  # a failure inside a pipeline: answer, log, keep serving
            logger.exception("generation failed")
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {type(err).__name__}: {err}")
            return
        self._send_json(HTTPStatus.OK, result)

    def _read_json(self) -> Any:
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(
                f"send the body as JSON with Content-Type: application/json (got '{content_type or 'none'}')",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError("Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(
                f"request body is {length} bytes; at most {MAX_BODY_BYTES}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        body = self.rfile.read(length) if length > 0 else b""
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(f"request body is not valid JSON ({err})") from None

    def _ready(self) -> bool:
        """Refuse (and answer) a request with a foreign Host header or before the models are loaded."""
        if self.server.check_host:
            host = self.headers.get("Host", "")
            name = host if host.endswith("]") else host.rsplit(":", 1)[0]
            if not is_loopback(name):
                self._send_error(HTTPStatus.FORBIDDEN, f"Host '{host}' refused: open the page at {self.server.url}")
                return False
        if self.server.app is None:
            self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, "the models are still loading; try again shortly")
            return False
        return True

    def _send_json(self, status: HTTPStatus, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": message, "status": int(status)})

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's signature)
        logger.info("%s %s", self.address_string(), format % args)
