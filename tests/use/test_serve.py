"""``bksdm serve``: the JSON API over real HTTP, the CLI, and the page in a real headless Chromium.

Every test serves a tiny SD-v1 teacher and its bk-tiny student (pruned in the test) with 2 denoising steps.
The browser test drives Debian's Chromium (/usr/bin/chromium) through Playwright; it is never skipped: on a
machine without Chromium it fails and says how to install it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bksdm.loading
from bksdm.cli import main
from bksdm.eval.generate import generate_images
from bksdm.loading import teacher_or_default
from bksdm.plan.prune import prune
from bksdm.use.serve.api import MAX_PROMPT_CHARS, MAX_SEED
from bksdm.use.serve.app import DemoApp, SamplingSettings, default_sampling, load_models
from bksdm.use.serve.server import binding_warning, is_loopback, make_server
from bksdm.world.teacher import SETTINGS_FILE, TEACHER_DIR, recommended_settings
from bksdm.world.tiny import save_tiny_pipeline

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 2
GUIDANCE = 7.5


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved tiny teacher and its bk-tiny student (a complete pipeline folder from ``prune``)."""
    root = tmp_path_factory.mktemp("serve")
    teacher = save_tiny_pipeline(root / "teacher", "sd-v1", seed=0)
    student = root / "student"
    prune(str(teacher), "bk-tiny", student)
    return teacher, student


@pytest.fixture(scope="module")
def app(models_dir: tuple[Path, Path]) -> DemoApp:
    teacher, student = models_dir
    return DemoApp(load_models(str(teacher), [str(student)]), SamplingSettings(steps=STEPS, guidance_scale=GUIDANCE))


@contextlib.contextmanager
def serving(app: DemoApp | None):
    """The app (None: models still loading) served on a free loopback port from a background thread; stopped and
    closed on exit."""
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(app: DemoApp):
    with serving(app) as httpd:
        yield httpd


def request(
    url: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    """One HTTP request; returns (status, decoded JSON body) for success and error answers alike."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def decode(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))).convert("RGB"))


# --- the JSON API, over real HTTP ---------------------------------------------------------------------------


def test_models_endpoint_lists_teacher_then_student(server, app, models_dir) -> None:
    status, info = request(server.url + "api/models")
    assert status == 200
    assert [m["name"] for m in info["models"]] == ["teacher", "student"]
    assert [m["source"] for m in info["models"]] == [str(p) for p in models_dir]
    params = [sum(p.numel() for p in m.pipe.unet.parameters()) for m in app.models]
    assert [m["unet_params"] for m in info["models"]] == params
    assert params[1] < params[0]  # bk-tiny removed blocks
    assert (info["steps"], info["guidance_scale"]) == (STEPS, GUIDANCE)
    assert (info["max_prompt_chars"], info["max_seed"]) == (MAX_PROMPT_CHARS, MAX_SEED)


def test_generate_is_deterministic_and_equals_the_pipeline_output(server, app) -> None:
    body = {"prompt": "  a red circle on the left ", "seed": 1234}
    status, first = request(server.url + "api/generate", body)
    assert status == 200
    _, second = request(server.url + "api/generate", body)
    assert first["prompt"] == "a red circle on the left" and first["seed"] == 1234 and first["steps"] == STEPS
    assert [m["name"] for m in first["models"]] == ["teacher", "student"]
    for a, b, model in zip(first["models"], second["models"], app.models, strict=True):
        assert a["image"] == b["image"]  # same prompt + seed -> byte-identical PNG
        assert a["seconds"] > 0 and (a["width"], a["height"]) == (128, 128)
        (expected,) = generate_images(model.pipe, ["a red circle on the left"], [1234], steps=STEPS, guidance_scale=7.5)
        np.testing.assert_array_equal(decode(a["image"]), np.asarray(expected))
    teacher_img, student_img = (decode(m["image"]) for m in first["models"])
    assert not np.array_equal(teacher_img, student_img)
    _, other_seed = request(server.url + "api/generate", {"prompt": "a red circle on the left", "seed": 1235})
    assert not np.array_equal(decode(other_seed["models"][0]["image"]), teacher_img)


def test_seed_defaults_to_zero(server) -> None:
    _, implicit = request(server.url + "api/generate", {"prompt": "a blue square"})
    _, explicit = request(server.url + "api/generate", {"prompt": "a blue square", "seed": 0})
    assert implicit["seed"] == 0
    assert [m["image"] for m in implicit["models"]] == [m["image"] for m in explicit["models"]]


def test_concurrent_requests_are_serialised_and_stay_deterministic(server) -> None:
    """Pipelines keep state (the scheduler's timesteps): the lock keeps parallel requests from mixing."""
    seeds = [11, 12, 13]
    sequential = {s: request(server.url + "api/generate", {"prompt": "a circle", "seed": s})[1] for s in seeds}
    parallel: dict[int, dict] = {}

    def post(seed: int) -> None:
        parallel[seed] = request(server.url + "api/generate", {"prompt": "a circle", "seed": seed})[1]

    threads = [threading.Thread(target=post, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for s in seeds:
        assert [m["image"] for m in parallel[s]["models"]] == [m["image"] for m in sequential[s]["models"]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "   ", "seed": 1}, "'prompt' is empty"),
        ({"seed": 1}, "'prompt' must be a string (got null)"),
        ({"prompt": 5}, "'prompt' must be a string (got int)"),
        (
            {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
            f"has {MAX_PROMPT_CHARS + 1} characters; at most {MAX_PROMPT_CHARS}",
        ),
        ({"prompt": "a circle", "seed": -1}, "'seed' must be an integer from 0 to 4294967295 (got -1)"),
        ({"prompt": "a circle", "seed": 2**32}, "(got 4294967296)"),
        ({"prompt": "a circle", "seed": "3"}, '(got "3")'),
        ({"prompt": "a circle", "seed": 1.5}, "(got 1.5)"),
        ({"prompt": "a circle", "seed": True}, "(got true)"),
        ({"prompt": "a circle", "seed": None}, "(got null)"),
        ({"prompt": "a circle", "steps": 50}, "unknown field(s) 'steps'"),
        (["a circle"], "expected a JSON object"),
    ],
)
def test_bad_requests_get_400_with_a_clear_message(server, body, message) -> None:
    status, answer = request(server.url + "api/generate", body)
    assert status == 400
    assert answer["status"] == 400
    assert message in answer["error"]


def test_malformed_http_requests(server) -> None:
    url = server.url + "api/generate"
    status, answer = request(url, raw=b"{prompt: nope")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = request(url, raw=b"prompt=a+circle", content_type="application/x-www-form-urlencoded")
    assert status == 415 and "Content-Type: application/json" in answer["error"]
    status, answer = request(url, raw=b"x" * (16 * 1024 + 1))
    assert status == 413 and "at most 16384" in answer["error"]
    status, answer = request(url)  # GET
    assert status == 405 and "use POST" in answer["error"]
    status, answer = request(server.url + "nothing-here")
    assert status == 404 and "/api/generate" in answer["error"]
    # A page on another site that rebinds its own name to 127.0.0.1 cannot use the demo.
    status, answer = request(server.url + "api/models", headers={"Host": f"evil.example:{server.server_port}"})
    assert status == 403 and "evil.example" in answer["error"]
    status, _ = request(server.url + "api/models", headers={"Host": f"localhost:{server.server_port}"})
    assert status == 200


def test_server_answers_503_until_the_models_are_attached() -> None:
    with serving(None) as httpd:
        status, answer = request(httpd.url)
    assert status == 503 and "still loading" in answer["error"]


def test_app_rejects_no_models_and_duplicate_names(app) -> None:
    with pytest.raises(ValueError, match="at least one model"):
        DemoApp([])
    with pytest.raises(ValueError, match="unique"):
        DemoApp([app.models[0], app.models[0]])
    with pytest.raises(ValueError, match="steps 0: needs at least 1 denoising step"):
        SamplingSettings(steps=0)


def test_loopback_detection_and_binding_warning() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
        assert binding_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com", ""):
        assert not is_loopback(host), host
    warning = binding_warning("0.0.0.0")
    assert warning is not None and "anyone who can reach this machine" in warning and "127.0.0.1" in warning


def test_default_sampling(models_dir, tmp_path) -> None:
    teacher, _ = models_dir
    assert default_sampling(str(teacher)) == SamplingSettings(steps=25, guidance_scale=7.5)
    assert default_sampling(str(teacher), 4, 2.0) == SamplingSettings(steps=4, guidance_scale=2.0)
    shapes_teacher = tmp_path / "shapes-teacher"
    shapes_teacher.mkdir()
    sampling = {"sampling": {"num_inference_steps": 12, "guidance_scale": 3.0}}
    (shapes_teacher / SETTINGS_FILE).write_text(json.dumps(sampling))
    assert default_sampling(str(shapes_teacher)) == SamplingSettings(12, 3.0, 64, 64)
    assert default_sampling(str(shapes_teacher), steps=5) == SamplingSettings(5, 3.0, 64, 64)


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_user_errors_exit_2(models_dir, tmp_path, capsys) -> None:
    teacher, student = models_dir
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    assert main(["serve", "--teacher", str(teacher), "--student", str(not_a_pipeline), "--port", "0"]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
    assert main(["serve", "--teacher", str(teacher), "--steps", "0", "--port", "0"]) == 2
    assert "steps 0: needs at least 1 denoising step" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--teacher", str(teacher), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err
    # 192.0.2.1 (TEST-NET-1) is never this machine's: the warning is printed, then binding fails.
    assert main(["serve", "--teacher", str(teacher), "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "warning: binding to 192.0.2.1: anyone who can reach this machine" in err
    assert "cannot listen on 192.0.2.1:0" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "70000"])
    assert exit_info.value.code == 2
    assert "70000 is not a port number" in capsys.readouterr().err


def test_cli_without_teacher_and_without_bundled_teacher_exits_2(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tmp_path / "missing")  # no teacher given, none bundled
    assert main(["serve", "--port", "0"]) == 2
    assert "bundled shapes teacher is missing" in capsys.readouterr().err


def test_bundled_teacher_is_the_default_with_its_own_sampling_settings() -> None:
    teacher = teacher_or_default(None)
    shipped = recommended_settings()
    assert Path(teacher) == TEACHER_DIR
    assert default_sampling(teacher) == SamplingSettings(
        shipped["num_inference_steps"], shipped["guidance_scale"], 64, 64
    )
    app = DemoApp(load_models(teacher, []), default_sampling(teacher))
    first, second = (app.handle_generate({"prompt": "a small red circle at the top left", "seed": 5}) for _ in "ab")
    assert first["models"][0]["image"] == second["models"][0]["image"]
    assert (first["models"][0]["width"], first["models"][0]["height"]) == (64, 64)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ServeProcess:
    """``bksdm serve ARGS`` in a child process, its output read all the time (a full pipe never blocks it).

    The child starts with SIGINT ignored on purpose, as if started with ``bksdm serve ... &`` from a script: such
    a process inherits SIGINT as ignored (a non-interactive shell's ``cmd &``; so do CI runners), and the server
    used to keep serving through Ctrl-C.
    """

    def __init__(self, args: list[str]) -> None:
        # PYTHONFAULTHANDLER: if the server ever hangs, SIGABRT makes it print every thread's stack (see stop).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bksdm.cli", "serve", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_ignore_sigint,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")))
        self.reader.daemon = True
        self.reader.start()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, seconds: float) -> str | None:
        """The first output line holding ``text``, waiting up to ``seconds`` (None if it never came)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = next((line for line in list(self.lines) if text in line), None)
            if found:
                return found
            time.sleep(0.05)
        return next((line for line in list(self.lines) if text in line), None)

    def url(self, names: str = "teacher, student", steps: int = 2) -> str:
        """Wait for the server to start serving; its URL."""
        line = self.wait_for("serving ", 120)
        assert line, f"bksdm serve did not start: {self.output()}"
        pattern = rf"serving {names} at (http://127\.0\.0\.1:\d+/) \({steps} steps, guidance 7\.5\)"
        match = re.search(pattern, line)
        assert match, self.output()
        return match.group(1)

    def stop(self, stop: str, timeout: float = 120) -> tuple[int, float]:
        """Send signal ``stop``; (exit status, seconds from the signal to the exit). Fails if it does not exit
        within ``timeout`` s, with every thread's stack in the message."""
        started = time.monotonic()
        self.proc.send_signal(getattr(signal, stop))
        try:
            returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is stuck
            self.proc.wait(timeout=30)
            self.reader.join(timeout=10)
            stacks = self.output()
            pytest.fail(f"bksdm serve did not exit within {timeout} s of {stop}; its output and stacks:\n{stacks}")
        seconds = time.monotonic() - started
        self.reader.join(timeout=10)
        return returncode, seconds


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_cli_serves_until_interrupted(models_dir, stop: str) -> None:
    """Ctrl-C (or SIGTERM) stops the server cleanly, also when it was started in the background by a script."""
    teacher, student = models_dir
    args = ["--teacher", str(teacher), "--student", str(student), "--port", "0", "--steps", "2"]
    with ServeProcess(args) as server:
        url = server.url()
        status, answer = request(url + "api/generate", {"prompt": "a green triangle", "seed": 3})
        assert status == 200 and [m["name"] for m in answer["models"]] == ["teacher", "student"]
        # a loaded 2-core CI machine can take a while to wind down
        returncode, _ = server.stop(stop, timeout=120)
        assert returncode == 0 and "stopped" in server.output(), f"exit status {returncode}: {server.output()}"


# --- the page, in a real headless Chromium ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(
            f"the browser test needs Chromium at {CHROMIUM}: install it with "
            "`apt-get install -y --no-install-recommends chromium` (Debian/Ubuntu), then rerun"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright for Python: pip install -e '.[dev]' (or pip install playwright)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """The demo page at ``url`` once its model list has loaded, and the list its page and console errors go to."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("#generate:enabled", timeout=30_000)  # enabled once the model list has loaded
    return page, problems


def generate_on_page(page, prompt: str, seed: int, timeout_ms: int = 60_000) -> list[dict]:
    """Types ``prompt`` and ``seed``, clicks Generate and returns each panel's model, image size, source and time."""
    page.fill("#prompt", prompt)
    page.fill("#seed", str(seed))
    page.click("#generate")
    page.wait_for_function(
        "() => [...document.querySelectorAll('figure.model img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=timeout_ms,
    )
    return page.locator("figure.model").evaluate_all(
        """els => els.map(e => ({
            name: e.dataset.model,
            width: e.querySelector('img').naturalWidth,
            height: e.querySelector('img').naturalHeight,
            src: e.querySelector('img').src,
            time: e.querySelector('.time').textContent,
        }))"""
    )


@pytest.mark.slow
def test_page_generates_and_shows_both_images(server, app, browser) -> None:
    page, problems = open_page(browser, server.url)
    assert page.locator("figure.model").evaluate_all("els => els.map(e => e.dataset.model)") == ["teacher", "student"]

    shown = generate_on_page(page, "a small red circle at the top left", 7)
    expected = app.generate("a small red circle at the top left", 7)["models"]
    assert [s["name"] for s in shown] == ["teacher", "student"]
    for panel, result in zip(shown, expected, strict=True):
        assert (panel["width"], panel["height"]) == (128, 128)
        assert panel["src"] == result["image"]  # the page shows exactly what the API gives for this prompt+seed
        assert re.fullmatch(r"\d+\.\d\d s", panel["time"].split(" (")[0]), panel["time"]
    assert re.fullmatch(r"\d+\.\d\d s \(\d+\.\d\dx the teacher's speed\)", shown[1]["time"]), shown[1]["time"]
    assert "seed 7" in page.text_content("#status")
    assert problems == [], problems

    # A bad request shows the server's message on the page (Chromium logs the 400 answer, nothing else).
    page.fill("#prompt", "   ")
    page.click("#generate")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "'prompt' is empty" in page.text_content("#status")
    assert problems == [
        "console error: Failed to load resource: the server responded with a status of 400 (Bad Request)"
    ]
    page.close()
