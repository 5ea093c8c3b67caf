"""The HTTP layer of ``bksdm serve``: a threading HTTP server around a :class:`~bksdm.use.serve.app.DemoApp`.

Built on the standard library's :class:`http.server.ThreadingHTTPServer`: one HTML page and a small JSON API
(``GET /``, ``GET /api/models``, ``POST /api/generate``), no web framework to install.

What a client sends cannot take the server down or hold it: every malformed request is answered with a 4xx
status and a JSON ``{"error": ...}`` saying what was wrong (never a 500), a client has
:data:`REQUEST_TIMEOUT_S` to send its whole request, and :meth:`DemoServer.server_close` ends within seconds
whatever the clients are doing (a generation in progress stops after its current denoising step).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bksdm.use.serve.api import MAX_BODY_BYTES, RequestError, decode_json_body, stopping_error
from bksdm.use.serve.app import DemoApp
from bksdm.use.serve.page import PAGE

__all__ = [
    "REQUEST_TIMEOUT_S",
    "STOP_GRACE_S",
    "DemoServer",
    "binding_warning",
    "is_loopback",
    "make_server",
]

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 15.0
"""Time a client has to send its whole request (request line, headers and body), and to take each answer.

A deadline for the whole request, not per read: a client that sends half a request and waits, or one byte every
few seconds, has its connection closed (with a 408 answer if it had started a request) instead of holding a
handler thread. Read when each connection opens, so tests can lower it."""

STOP_GRACE_S = 2.0
"""At stop, how long connections get to end on their own after their reading side is shut, before they are cut."""

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


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
    # socketserver's default listen backlog is 5: 20 clients connecting at once while the machine was busy had
    # connections reset before the accept loop reached them (seen in the 20-request test under load).
    request_queue_size = 128

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
            self._refuse(stopping_error())
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
                raise stopping_error()
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
            self._refuse(stopping_error())
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
