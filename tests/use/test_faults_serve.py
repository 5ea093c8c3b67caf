"""``bksdm serve`` against hostile and broken clients: malformed requests, half-sent requests, lost clients, and
Ctrl-C while clients hold connections open.

Every malformed request is answered with a 4xx status and a JSON ``{"error": ...}`` naming what is wrong (never a
500 and never an HTML page); a client that sends half a request and waits loses its connection after
``REQUEST_TIMEOUT_S``; Ctrl-C and SIGTERM end the server within seconds whatever the clients are doing. The
requests are written byte by byte on raw sockets, since urllib cannot send most of them.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from test_serve import ServeProcess, request

import bksdm.use.serve.server
from bksdm.use.serve.api import MAX_BODY_BYTES
from bksdm.use.serve.app import DemoApp, SamplingSettings, load_models
from bksdm.use.serve.server import make_server

STOP_LIMIT_S = 10.0
"""How long Ctrl-C may take to end the server, whatever the clients do (it took 47 s, or forever, before)."""
STOPPING = "the server is stopping: the request was not answered"


@pytest.fixture(scope="module")
def app(tiny_sd_dir: Path) -> DemoApp:
    """The tiny SD-v1 teacher alone, one step at 64x64: these tests are about the server, not the images."""
    return DemoApp(load_models(str(tiny_sd_dir), []), SamplingSettings(steps=1, height=64, width=64))


def _serve(app: DemoApp | None):
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture(scope="module")
def server(app: DemoApp):
    httpd, thread = _serve(app)
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def connect(server, timeout: float = 30) -> socket.socket:
    sock = socket.create_connection(server.server_address[:2], timeout=timeout)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (raises TimeoutError if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of one HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.0", raw[:200]
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert headers["Content-Type"] == "application/json", raw[:300]
    assert int(headers["Content-Length"]) == len(body)
    return int(status), headers, json.loads(body)


def exchange(server, data: bytes, *, end: bool = True) -> tuple[int, dict[str, str], dict]:
    """Send ``data`` (then end the sending side if ``end``), read the answer until the server closes."""
    with connect(server) as sock:
        sock.sendall(data)
        if end:
            sock.shutdown(socket.SHUT_WR)
        return parse(read_all(sock))


def post(body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of ``POST /api/generate`` with ``body``: JSON content type and its true length unless overridden."""
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body))}
    fields.update(headers or {})
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items() if value is not None)
    return f"POST /api/generate HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- malformed bodies: 400 with what is wrong, never 500 ------------------------------------------------------

OBJECT_HINT = 'expected a JSON object like {"prompt": "a red circle", "seed": 0}'
SEED_RANGE = "'seed' must be an integer from 0 to 4294967295"
NOT_JSON = "request body is not valid JSON"
NESTED = 'request body is nested too deeply to parse: send a flat JSON object like {"prompt": "a red circle"}'


@pytest.mark.parametrize(
    ("body", "error"),
    [
        # Python refuses to convert more than 4300 digits (ValueError, was a 500).
        (b'{"prompt": "a circle", "seed": ' + b"9" * 5000 + b"}", f"{SEED_RANGE} (got a 5000-digit integer)"),
        (b'{"prompt": "a circle", "seed": -' + b"9" * 5000 + b"}", f"{SEED_RANGE} (got a -5000-digit integer)"),
        (b'{"prompt": "a circle", "seed": ' + b"1" * 25 + b"}", f"{SEED_RANGE} (got a 25-digit integer)"),
        (b'{"prompt": "a circle", "seed": 18446744073709551616}', f"{SEED_RANGE} (got 18446744073709551616)"),
        (b'{"prompt": "a circle", "seed": 1e400}', f"{SEED_RANGE} (got 1e400, too large for a number)"),
        (b'{"prompt": "a circle", "seed": 4294967296.0}', f"{SEED_RANGE} (got 4294967296.0)"),
        (b'{"prompt": ' + b"7" * 5000 + b"}", "'prompt' must be a string (got int): type what to draw"),
        # Python's json raises RecursionError (was a 500).
        (b"[" * 5000 + b"]" * 5000, NESTED),
        (b'{"prompt": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}", NESTED),  # 12 KB
        # A lone UTF-16 surrogate is not text: the tokenizer raised TypeError (was a 500).
        (
            b'{"prompt": "a \\ud800 circle"}',
            "'prompt' holds an unpaired UTF-16 surrogate (\\ud800 at character 3), which is not text: "
            "send the prompt as valid Unicode",
        ),
        (
            b'{"prompt": "\\udfff"}',
            "'prompt' holds an unpaired UTF-16 surrogate (\\udfff at character 1), which is not text: "
            "send the prompt as valid Unicode",
        ),
        (b'{"prompt": "a \xff circle"}', "request body is not UTF-8 (byte 0xff at offset 14): send JSON in UTF-8"),
        (b'{"prompt": "caf\xc3"}', "request body is not UTF-8 (byte 0xc3 at offset 15): send JSON in UTF-8"),
        ('{"prompt": "a"}'.encode("utf-16"), "request body is not UTF-8 (byte 0xff at offset 0): send JSON in UTF-8"),
        (
            b'\xef\xbb\xbf{"prompt": "a"}',
            f"{NOT_JSON} (Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0))",
        ),
        (b'{"prompt": "a"} x', f"{NOT_JSON} (Extra data: line 1 column 17 (char 16))"),
        (b"[]", OBJECT_HINT),
        (b'"a circle"', OBJECT_HINT),
        (b"42", OBJECT_HINT),
        (b"null", OBJECT_HINT),
        (b"true", OBJECT_HINT),
        # NaN and Infinity are not JSON; Python's json takes them by default.
        (b'{"prompt": "a circle", "seed": NaN}', f"{NOT_JSON} (NaN is not a JSON value)"),
        (b'{"prompt": "a circle", "seed": -Infinity}', f"{NOT_JSON} (-Infinity is not a JSON value)"),
        # json.loads keeps the last of two equal keys silently.
        (b'{"prompt": "a circle", "prompt": "a square"}', 'field "prompt" is given twice: give each field once'),
        (b'{"\\ud800": 1}', "unknown field(s) '\\ud800'; the fields are 'prompt' and 'seed'"),
    ],
    ids=lambda value: value[:24].decode("latin-1") if isinstance(value, bytes) else None,
)
def test_malformed_body_gets_400_saying_what_is_wrong(server, body: bytes, error: str) -> None:
    status, headers, answer = exchange(server, post(body))
    assert (status, answer) == (400, {"error": error, "status": 400})
    assert headers["Connection"] == "close"


# --- the framing of the body: Content-Length, Transfer-Encoding, Content-Type ----------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "status", "error"),
    [
        ({"Content-Length": None}, b'{"prompt": "a"}', 400, "Content-Length is missing: send the body's length"),
        (
            {"Content-Length": "-15"},
            b'{"prompt": "a"}',
            400,
            "Content-Length '-15' is negative: send the body's length in bytes",
        ),
        (
            {"Content-Length": "fifteen"},
            b'{"prompt": "a"}',
            400,
            "Content-Length 'fifteen' is not a number of bytes: send the body's length in bytes",
        ),
        # int() takes these; HTTP does not.
        ({"Content-Length": "+15"}, b'{"prompt": "a"}', 400, "Content-Length '+15' is not a number of bytes"),
        ({"Content-Length": "1_5"}, b'{"prompt": "a"}', 400, "Content-Length '1_5' is not a number of bytes"),
        ({"Content-Length": "0"}, b"", 400, 'request body is empty: send a JSON object like {"prompt": "a red'),
        (
            {"Content-Length": str(MAX_BODY_BYTES + 1)},
            b"x" * (MAX_BODY_BYTES + 1),
            413,
            f"request body is {MAX_BODY_BYTES + 1} bytes; at most {MAX_BODY_BYTES}",
        ),
        (
            {"Content-Length": "9" * 5000},
            b'{"prompt": "a"}',
            413,
            f"request body is a 5000-digit number of bytes; at most {MAX_BODY_BYTES}",
        ),
        (
            {"Transfer-Encoding": "chunked", "Content-Length": None},
            b'f\r\n{"prompt": "a"}\r\n0\r\n\r\n',
            400,
            "Transfer-Encoding 'chunked' is not supported: send the body whole, with a Content-Length",
        ),
        (
            {"Content-Type": "application/json; charset=utf-16"},
            '{"prompt": "a"}'.encode("utf-16"),
            415,
            "send the JSON in UTF-8 (got charset=utf-16)",
        ),
        (
            {"Content-Type": "text/plain"},
            b'{"prompt": "a"}',
            415,
            "send the body as JSON with Content-Type: application/json (got 'text/plain')",
        ),
    ],
)
def test_bad_framing_gets_4xx_saying_what_is_wrong(server, headers, body, status, error) -> None:
    answer_status, _, answer = exchange(server, post(body, headers))
    assert answer_status == status and answer["status"] == status
    assert answer["error"].startswith(error), answer["error"]


def test_two_different_content_lengths_are_refused(server) -> None:
    """A request smuggling classic: the server must not pick one of them."""
    body = b'{"prompt": "a"}'
    data = post(body).replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n", 1)
    status, _, answer = exchange(server, data)
    assert (status, answer["error"]) == (400, "Content-Length is given 2 times with different values: give it once")


def test_body_shorter_than_its_content_length_is_refused(server) -> None:
    """The client ends its side after part of the body: a complete-looking prefix must not be generated from."""
    body = b'{"prompt": "a circle"}'  # valid JSON on its own: the old server answered 200
    data = post(body, {"Content-Length": str(len(body) + 40)})
    status, _, answer = exchange(server, data, end=True)
    assert (status, answer["error"]) == (
        400,
        f"request body ended after {len(body)} of its {len(body) + 40} bytes (Content-Length): send the whole body",
    )


def test_refused_oversized_body_still_reaches_the_client_whole(server) -> None:
    """The server refuses before reading the body, then drains it: closing with unread data would reset the
    connection, and the client could lose the 413 it has not read yet."""
    body = b"x" * (4 * MAX_BODY_BYTES)
    for _ in range(3):
        with connect(server) as sock:
            sock.sendall(post(body))  # not ended: a client that waits for the answer with its side open
            status, _, answer = parse(read_all(sock))
        assert (status, answer["error"]) == (413, f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES}")


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (
            b"GARBAGE\r\n\r\n",
            400,
            "Bad request syntax ('GARBAGE'); send an HTTP/1.x request: GET /, GET /api/models or POST /api/generate",
        ),
        (b"GET / HTTP/9.9\r\n\r\n", 505, "Invalid HTTP version (9.9)"),
        (b"GET / FTP/1.0\r\n\r\n", 400, "Bad request version ('FTP/1.0')"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
            431,
            "Too many headers: got more than 100 headers",
        ),
        (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431, "Line too long"),
    ],
    ids=["garbage", "version", "not-http", "long-uri", "many-headers", "long-header"],
)
def test_malformed_http_gets_json_not_html(server, data: bytes, status: int, error: str) -> None:
    """http.server's own refusals answered an HTML page; the API answers JSON like every other error."""
    answer_status, _, answer = exchange(server, data)
    assert answer_status == status and answer["status"] == status
    assert answer["error"].startswith(error), answer["error"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"])
def test_other_methods_get_405_in_json(server, method: str) -> None:
    status, headers, answer = exchange(server, f"{method} /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert (status, headers["Allow"]) == (405, "GET, POST")
    assert answer["error"] == f"method {method} is not supported: use GET for the page and POST for /api/generate"


# --- half-sent requests: a deadline for the whole request ------------------------------------------------------


@pytest.fixture
def short_timeout(monkeypatch) -> float:
    monkeypatch.setattr(bksdm.use.serve.server, "REQUEST_TIMEOUT_S", 1.0)
    return 1.0


def _answer_time(server, data: bytes) -> tuple[float, bytes]:
    """Send ``data`` and wait, side open; (seconds until the server closed the connection, what it sent)."""
    with connect(server, timeout=20) as sock:
        started = time.monotonic()
        sock.sendall(data)
        raw = read_all(sock)  # TimeoutError after 20 s if the server holds the connection
        return time.monotonic() - started, raw


def test_headers_without_the_body_get_408_after_the_timeout(server, short_timeout: float) -> None:
    seconds, raw = _answer_time(server, post(b"", {"Content-Length": "30"}) + b'{"prompt":')
    status, _, answer = parse(raw)
    assert (status, answer["error"]) == (
        408,
        "the request body did not arrive whole within 1 s (Content-Length: 30): send it at once",
    )
    assert short_timeout - 0.1 <= seconds < short_timeout + 3
    assert wait_until(lambda: server.open_connections == 0, 5)  # no handler thread left behind


def test_half_the_headers_get_408_after_the_timeout(server, short_timeout: float) -> None:
    seconds, raw = _answer_time(server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
    status, _, answer = parse(raw)
    assert (status, answer["error"]) == (408, "the request did not arrive whole within 1 s: send it at once")
    assert short_timeout - 0.1 <= seconds < short_timeout + 3
    assert wait_until(lambda: server.open_connections == 0, 5)


def test_an_idle_connection_is_closed_after_the_timeout(server, short_timeout: float) -> None:
    seconds, raw = _answer_time(server, b"")
    assert raw == b""  # it never began a request: closed without an answer
    assert short_timeout - 0.1 <= seconds < short_timeout + 3
    assert wait_until(lambda: server.open_connections == 0, 5)


def test_a_request_trickling_in_is_cut_at_the_deadline(server, short_timeout: float) -> None:
    """One byte every 0.1 s never trips a per-read timeout; the deadline covers the whole request."""
    data = post(b'{"prompt": "a circle"}')  # about 130 bytes: 13 s at this pace
    with connect(server, timeout=20) as sock:
        started = time.monotonic()
        try:
            for byte in data:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:  # the server closed: the next send is refused
            pass
        raw = read_all(sock)
        seconds = time.monotonic() - started
    status, _, answer = parse(raw)
    assert (status, answer["error"]) == (408, "the request did not arrive whole within 1 s: send it at once")
    assert seconds < short_timeout + 3


def test_a_lost_client_is_no_traceback(server, capfd) -> None:
    """A client that closes before its answer: the server logs it and goes on (it printed a BrokenPipeError
    traceback)."""
    for _ in range(3):
        with connect(server) as sock:
            sock.sendall(post(b'{"prompt": "a circle", "seed": 1}'))
            # Reset rather than close: the server's first write of the answer fails at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert wait_until(lambda: server.open_connections == 0, 60)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "ConnectionResetError" not in err, err
    status, _ = request(server.url + "api/models")
    assert status == 200


# --- what held must keep holding ---------------------------------------------------------------------------------


def test_twenty_concurrent_requests_all_answer_and_stay_deterministic(server) -> None:
    """20 requests at once (10 seeds, each twice, one prompt with an emoji: a valid surrogate pair in JSON)."""
    bodies = [{"prompt": "a red circle \ud83d\ude00" if s % 2 else "a blue square", "seed": s} for s in range(10)] * 2
    answers: list[tuple[int, dict] | None] = [None] * len(bodies)

    def post_one(i: int) -> None:
        data = json.dumps(bodies[i]).encode()
        req = urllib.request.Request(server.url + "api/generate", data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as answer:  # the last one waits for 19 others
            answers[i] = answer.status, json.loads(answer.read())

    threads = [threading.Thread(target=post_one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert all(a is not None and a[0] == 200 for a in answers), [a and a[0] for a in answers]
    images = [a[1]["models"][0]["image"] for a in answers]
    assert images[:10] == images[10:]  # the same prompt and seed: the same image, whatever ran alongside
    assert len(set(images[:10])) == 10
    assert answers[1][1]["prompt"] == "a red circle \U0001f600"
    assert wait_until(lambda: server.open_connections == 0, 10)


# --- stopping within seconds whatever the clients do -------------------------------------------------------------


def _stop_in_thread(httpd) -> tuple[threading.Thread, list[float]]:
    took: list[float] = []

    def stop() -> None:
        started = time.monotonic()
        httpd.shutdown()
        httpd.server_close()
        took.append(time.monotonic() - started)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread, took


def test_server_close_ends_idle_and_half_sent_connections_at_once(app) -> None:
    """With the default 15 s deadline: the stop does not wait for it (server_close joined every handler thread,
    each blocked reading forever)."""
    httpd, serving = _serve(app)
    idle = [connect(httpd) for _ in range(5)]
    half_headers = connect(httpd)
    half_headers.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    no_body = connect(httpd)
    no_body.sendall(post(b"", {"Content-Length": "30"}))
    assert wait_until(lambda: httpd.open_connections == 7, 10)
    stopper, took = _stop_in_thread(httpd)
    stopper.join(STOP_LIMIT_S)
    try:
        assert not stopper.is_alive(), f"server_close still running after {STOP_LIMIT_S} s"
        assert took[0] < 2.0, took
        assert httpd.open_connections == 0
        for sock in idle:
            assert read_all(sock) == b""
        for sock in (half_headers, no_body):
            status, _, answer = parse(read_all(sock))
            assert (status, answer["error"]) == (503, STOPPING)
    finally:
        for sock in [*idle, half_headers, no_body]:
            sock.close()
        serving.join(timeout=10)


def test_server_close_stops_a_generation_between_steps(tiny_sd_dir: Path) -> None:
    """A long generation in progress ends after its current step, and a queued request does not start."""
    app = DemoApp(load_models(str(tiny_sd_dir), []), SamplingSettings(steps=500, height=64, width=64))
    httpd, serving = _serve(app)
    answers: list[tuple[int, dict]] = []

    def post_one(seed: int) -> None:
        answers.append(request(httpd.url + "api/generate", {"prompt": "a circle", "seed": seed}))

    clients = [threading.Thread(target=post_one, args=(seed,)) for seed in (1, 2)]
    for client in clients:
        client.start()
    assert wait_until(lambda: app.busy and httpd.open_connections == 2, 60)
    time.sleep(0.5)  # a few steps in
    stopper, took = _stop_in_thread(httpd)
    stopper.join(STOP_LIMIT_S)
    assert not stopper.is_alive(), f"server_close still running after {STOP_LIMIT_S} s"
    for client in clients:
        client.join(timeout=10)
    serving.join(timeout=10)
    assert took[0] < 5.0, took  # 500 steps take minutes here
    stopped = {"error": STOPPING, "status": 503}
    assert answers == [(503, stopped), (503, stopped)]
    assert not app.busy


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_cli_stops_within_seconds_with_clients_holding_connections(tiny_sd_dir: Path, stop: str) -> None:
    """``bksdm serve`` with idle connections and a half-sent request open (the default 15 s deadline): Ctrl-C
    ends it within seconds (it waited 47 s, and forever in principle, for the half-sent request)."""
    args = ["--teacher", str(tiny_sd_dir), "--port", "0", "--steps", "1", "--no-warmup"]
    with ServeProcess(args) as served:
        url = served.url("teacher", steps=1)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
        try:
            sockets[0].sendall(post(b"", {"Content-Length": "30"}))  # headers, no body
            sockets[1].sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half the headers
            time.sleep(0.5)  # the server has accepted them and is waiting for the rest
            returncode, seconds = served.stop(stop, timeout=120)
            print(f"bksdm serve exited {seconds:.2f} s after {stop}")
            assert (returncode, served.output().splitlines()[-1]) == (0, "stopped"), served.output()
            assert seconds < STOP_LIMIT_S, f"{stop} took {seconds:.1f} s to stop the server"
            assert "Traceback" not in served.output(), served.output()
            status, _, answer = parse(read_all(sockets[0]))
            assert (status, answer["error"]) == (503, STOPPING)
            assert read_all(sockets[2]) == b""  # idle: closed
        finally:
            for sock in sockets:
                sock.close()
