"""The fault sweep of issue 11: bad inputs and injected faults against every bksdm command, each outcome classified.

Each case runs one ``bksdm`` command line (as ``python -m bksdm.cli ...`` would) on tiny, offline fixtures and says
what it expects: a clear error (exit 2 for a user's mistake, 1 for a fault of the environment, one line
``bksdm CMD: error: ...`` holding the case's key words, no traceback) or the documented behaviour (exit 0 and a
check of the result: a corrupt image skipped *and counted*, a resumed run bit-identical to an uninterrupted one).
Data-safety cases hash the files that must survive before and after; crafted-pickle cases check that the pickle's
command (``touch MARKER``) never ran. Every outcome lands in one class:

    clear error, documented behaviour                     (pass)
    traceback, killed, hang, unclear error, silent wrong result, data loss, code ran,
    refused (an error where success is documented)        (fail)

Usage (from the repository root, the virtual environment active)::

    python benchmarks/fault_sweep.py                 # every case; table + benchmarks/results/fault_sweep.json
    python benchmarks/fault_sweep.py --list          # the cases, one a line
    python benchmarks/fault_sweep.py --only serve    # cases whose name or command matches a regex
    python benchmarks/fault_sweep.py --spawn         # a fresh `python -m bksdm.cli` per case (slower)

By default the sweep imports bksdm once and forks one child per case (the child runs ``bksdm.cli.main`` exactly as
``python -m bksdm.cli`` does: an uncaught exception prints its traceback and exits 1, SystemExit gives its
status), which saves the 5-25 s of imports per case on a loaded 2-core machine; ``--spawn`` runs real
``python -m bksdm.cli`` subprocesses instead. Cases whose environment must differ from import time (HF_HUB_OFFLINE)
always spawn. Full-disk and read-only cases mount small tmpfs folders (root only; skipped otherwise).
Every child runs with OMP_NUM_THREADS=1 and an address-space limit (--mem-limit-gb, default 10) so that a missing
size guard fails the case instead of taking the shared machine's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the data builders the tests use
from builders import COLORS, make_shapes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fault_sweep.json"

PASS = ("clear error", "documented behaviour")
CLASSES = (
    "clear error",
    "documented behaviour",
    "traceback",
    "killed",
    "hang",
    "unclear error",
    "silent wrong result",
    "data loss",
    "code ran",
    "refused",
    "skipped",
)

# --------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Outcome:
    status: int | None  # None: timed out (killed by the sweep)
    output: str
    seconds: float
    timed_out: bool = False
    problem: str | None = None  # what a driver or a check found wrong
    problem_class: str | None = None  # the class of that problem (default: silent wrong result)


@dataclasses.dataclass
class Case:
    """One bad input or fault.

    ``argv`` items may hold ``{fx}`` (the fixtures folder) and ``{case}`` (this case's own empty folder).
    ``expect``: "error" (exit in ``statuses`` with a line starting ``prefix`` that holds every one of ``words``,
    case-insensitive) or "ok" (exit 0, then ``check``). ``guard``: paths whose files must be unchanged after.
    ``marker``: the case plants a crafted pickle; ``{case}/PWNED`` must not exist after. ``driver`` replaces the
    plain run (signals, HTTP) and returns the Outcome itself.
    """

    name: str
    command: str
    category: str
    argv: list[str] = dataclasses.field(default_factory=list)
    expect: str = "error"
    words: tuple[str, ...] = ()
    statuses: tuple[int, ...] = (1, 2)
    prefix: str | None = None  # default: "bksdm COMMAND: error:"
    setup: Callable[[Ctx], None] | None = None
    check: Callable[[Ctx, Outcome], str | None] | None = None
    guard: Callable[[Ctx], list[Path]] | None = None
    marker: bool = False
    driver: Callable[[Ctx, Case], Outcome] | None = None
    env: dict[str, str] | None = None
    timeout: float = 300.0
    serial: bool = False  # run alone (signals, timing, the shared server)
    spawn: bool = False  # always a fresh `python -m bksdm.cli` (the case depends on import-time state)
    needs_mount: bool = False
    note: str = ""

    def line_prefix(self) -> str:
        return self.prefix or f"bksdm {self.command}: error:"


@dataclasses.dataclass
class Ctx:
    fx: Path
    case: Path
    runner: Runner
    mounts: list[Path] = dataclasses.field(default_factory=list)

    @property
    def marker(self) -> Path:
        return self.case / "PWNED"

    def fmt(self, items: list[str]) -> list[str]:
        return [str(a).replace("{fx}", str(self.fx)).replace("{case}", str(self.case)) for a in items]

    def mount(self, where: Path, size: str, populate: Callable[[Path], None] | None = None, ro: bool = False):
        """A tmpfs of ``size`` at ``where`` (populated, then remounted read-only when ``ro``)."""
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
        self.mounts.append(where)
        if populate:
            populate(where)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return where

    def unmount_all(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(where)], check=False)
        self.mounts.clear()


# --------------------------------------------------------------------------------------------- runner


class Proc:
    """A running ``bksdm`` command (a forked child or a spawned ``python -m bksdm.cli``), output to a log file."""

    def __init__(self, pid: int, log: Path, popen: subprocess.Popen | None = None) -> None:
        self.pid, self.log, self.popen = pid, log, popen
        self.status: int | None = None
        self.started = time.monotonic()

    def poll(self) -> int | None:
        if self.status is not None:
            return self.status
        if self.popen is not None:
            self.status = self.popen.poll()
            return self.status
        pid, raw = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.status = os.waitstatus_to_exitcode(raw)
        return self.status

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.status

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.wait(30)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def finish(self, timeout: float) -> Outcome:
        """Wait up to ``timeout`` s; a command still running then is a hang (its process group is killed)."""
        remaining = max(0.0, timeout - (time.monotonic() - self.started))
        status = self.wait(remaining)
        seconds = time.monotonic() - self.started
        if status is None:
            self.kill_group()
            return Outcome(None, self.output(), seconds, timed_out=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers (data loader workers)
            os.killpg(self.pid, signal.SIGKILL)
        return Outcome(status, self.output(), seconds)


def _child_limits(mem_gb: float) -> None:
    if mem_gb > 0:
        limit = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _cli_in_child(argv: list[str]) -> int:
    """What ``python -m bksdm.cli ARGV`` does at the top level: main's status, SystemExit's status, or a
    traceback and status 1 for an uncaught exception; then non-daemon threads are joined and atexit runs."""
    sys.argv = ["bksdm", *argv]
    try:
        from bksdm.cli import main

        code = main(argv)
        status = int(code or 0)
    except SystemExit as exit_:
        code = exit_.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code
        else:
            print(code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 (the interpreter's own top level)
        traceback.print_exc()
        status = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # the interpreter joins non-daemon threads at exit
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    return status


class Runner:
    def __init__(self, spawn: bool, mem_gb: float) -> None:
        self.spawn, self.mem_gb = spawn, mem_gb
        if not spawn:
            _preload()

    def start(self, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None,
              ignore_sigint: bool = False) -> Proc:  # fmt: skip
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")  # emptied here, before the child starts: never read a stale log of an earlier run
        if self.spawn or env:
            full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}

            def pre() -> None:
                _child_limits(self.mem_gb)
                if ignore_sigint:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)

            with log.open("wb") as out:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "bksdm.cli", *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=full_env,
                    start_new_session=True,
                    preexec_fn=pre,
                )
            return Proc(popen.pid, log, popen)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 1
            try:
                os.setsid()
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.chdir(cwd)
                sys.stdout.reconfigure(line_buffering=True)
                sys.stderr.reconfigure(line_buffering=True)
                signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _child_limits(self.mem_gb)
                status = _cli_in_child(argv)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status & 0xFF if status >= 0 else 1)
        return Proc(pid, log, None)

    def run(self, argv: list[str], log: Path, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> Outcome:
        return self.start(argv, log, cwd, env).finish(timeout)


def _preload() -> None:
    """Import what the commands import lazily, once, before forking (the children then start in milliseconds)."""
    import importlib

    for name in (
        "bksdm.cli",
        "bksdm.train.distill",
        "bksdm.train.cache",
        "bksdm.eval.generate",
        "bksdm.cli.generate",
        "bksdm.use.img2img",
        "bksdm.cli.img2img",
        "bksdm.eval.evaluate",
        "bksdm.cli.evaluate",
        "bksdm.eval.report",
        "bksdm.use.serve.app",
        "bksdm.cli.serve",
        "bksdm.use.dreambooth.recipe",
        "bksdm.cli.dreambooth",
        "bksdm.plan.prune",
        "bksdm.cli.profile",
        "bksdm.cli.export",
        "bksdm.world.demo",
        "bksdm.eval.inception",
        "accelerate",
        "diffusers",
        "transformers",
    ):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    assert threading.active_count() == 1, "a preloaded module started a thread: forking would be unsafe"


# --------------------------------------------------------------------------------------------- helpers


def hash_tree(paths: list[Path]) -> dict[str, str]:
    found = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            found[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Exploit:
    """Unpickling this runs ``touch MARKER``: what a crafted checkpoint or weight file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def exploit(marker: Path, protocol: int = 4) -> bytes:
    return pickle.dumps(_Exploit(marker), protocol=protocol)


def copy_fixture(ctx: Ctx, name: str, to: str | None = None) -> Path:
    target = ctx.case / (to or name)
    shutil.copytree(ctx.fx / name, target, symlinks=True)
    return target


def write_metadata(folder: Path, rows: list[tuple[str, str]]) -> None:
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)


def png_bytes(size=(64, 64), mode="RGB", color=(200, 40, 40)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(path: Path) -> None:
    """A PNG that declares 14000 x 14000 pixels (196 M, over twice PIL's bomb limit) in a few kilobytes."""
    from PIL import Image

    Image.new("1", (14000, 14000), 0).save(path, optimize=True)


BAD_IMAGES = {
    # kind -> writer(path, good_bytes)
    "corrupt": lambda p, good: p.write_bytes(b"this is not an image at all" * 10),
    "truncated": lambda p, good: p.write_bytes(good[: len(good) // 3]),
    "zero-byte": lambda p, good: p.write_bytes(b""),
    "symlink-loop": lambda p, good: (p.unlink(missing_ok=True), os.symlink(p.name, p)),
    "bomb": lambda p, good: bomb_png(p),
    "directory": lambda p, good: (p.unlink(missing_ok=True), p.mkdir()),
    "missing": lambda p, good: p.unlink(missing_ok=True),
    "html": lambda p, good: p.write_bytes(b"<html><body>404 Not Found</body></html>"),
}

ODD_IMAGES = {
    # kind -> (mode, size): images that are odd but valid; documented as converted
    "grayscale": ("L", (120, 90)),
    "rgba": ("RGBA", (100, 100)),
    "palette": ("P", (80, 96)),
    "16-bit": ("I;16", (64, 64)),
    "1x1": ("RGB", (1, 1)),
    "1x3000": ("RGB", (1, 3000)),
    "cmyk-jpeg": ("CMYK", (90, 70)),
}


def save_odd(path: Path, mode: str, size: tuple[int, int]) -> Path:
    from PIL import Image

    color = {"L": 128, "P": 3, "I;16": 40000, "RGBA": (10, 200, 30, 128), "CMYK": (0, 100, 200, 0)}.get(
        mode, (9, 9, 200)
    )
    image = Image.new(mode, size, color)
    if mode == "CMYK":
        path = path.with_suffix(".jpg")
        image.save(path, format="JPEG")
    else:
        image.save(path)
    return path


# --------------------------------------------------------------------------------------------- fixtures

FX_DISTILL = {
    "model.plan": "bk-tiny",
    "data.resolution": 64,
    "data.num_workers": 0,
    "train.max_steps": 4,
    "train.batch_size": 2,
    "train.gradient_accumulation_steps": 1,
    "train.mixed_precision": "no",
    "train.gradient_checkpointing": "false",
    "train.validate_every": 0,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.use_ema": "true",
}


def distill_argv(out: str, teacher: str = "{fx}/teacher", data: str | None = "{fx}/data", **extra) -> list[str]:
    settings = {"model.teacher": teacher, **({"data.train": data} if data else {}), **FX_DISTILL,
                "train.output_dir": out}  # fmt: skip
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["distill", *(f"{k}={v}" for k, v in settings.items() if v is not None)]


def cache_argv(out: str, data: str = "{fx}/data", *extra: str) -> list[str]:
    """``extra``: options (--x) after the defaults, overrides (key=value) with the others (argparse takes the
    positional overrides in one run only)."""
    options = {"--batch-size": "4", "--shard-size": "4"}
    overrides = {"model.teacher": "{fx}/teacher", "data.train": data, "data.resolution": "64", "data.num_workers": "0"}
    flags: list[str] = []
    items = list(extra)
    while items:
        item = items.pop(0)
        if item.startswith("--"):
            value = items.pop(0)
            options.pop(item, None)
            flags += [item, value]
        else:
            key, _, value = item.partition("=")
            overrides[key] = value
    return ["cache", "--out", out, *(f"{k}={v}" for k, v in overrides.items()),
            *(x for kv in options.items() for x in kv), *flags]  # fmt: skip


GEN = ["--model", "{fx}/teacher", "--steps", "1", "--height", "64", "--width", "64", "--batch-size", "1",
       "--device", "cpu"]  # fmt: skip
I2I = ["--model", "{fx}/teacher", "--steps", "2", "--prompt", "a red circle", "--device", "cpu"]
EVAL = ["--metrics", "is", "--is-splits", "2", "--inception-weights", "{fx}/inception.pth", "--device", "cpu"]
DB = ["--model", "{fx}/teacher", "--instance-prompt", "a sks circle", "--steps", "2", "--resolution", "64",
      "--lora", "--checkpoint-every", "1", "--validation-every", "0", "--sample-steps", "1"]  # fmt: skip
PROMPTS8 = [f"a {c} {s}" for c in COLORS for s in ("circle", "square")]


def build_fixtures(fx: Path) -> None:
    """Everything the cases read (never modify): teachers, data, a finished run, generated images, weights."""
    import numpy as np
    import torch

    from bksdm.cli import main
    from bksdm.eval.inception import InceptionV3
    from bksdm.world.tiny import save_tiny_pipeline

    fx.mkdir(parents=True, exist_ok=True)
    save_tiny_pipeline(fx / "teacher", "sd-v1", seed=0)
    save_tiny_pipeline(fx / "teacher-v2", "sd-v2", seed=0)
    make_shapes(fx / "data", n=8)
    (fx / "prompts.txt").write_text("\n".join(PROMPTS8) + "\n")
    torch.manual_seed(0)
    net = InceptionV3(width=1 / 8)
    with torch.no_grad():
        net.fc.weight.mul_(300)
    torch.save(net.state_dict(), fx / "inception.pth")
    subject = fx / "subject"
    subject.mkdir()
    for i in range(4):
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (80, 80), "white")
        ImageDraw.Draw(image).ellipse([10 + i, 10, 60 + i, 60], outline=(220, 30, 30), width=6)
        image.save(subject / f"{i}.png")
    inputs = fx / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(inputs / f"in{i}.png")

    def cli(*argv: str) -> None:
        argv = [a.replace("{fx}", str(fx)).replace("{case}", str(fx)) for a in argv]
        assert main(argv) == 0, argv

    cli(*distill_argv(str(fx / "run")))
    cli("generate", *GEN, "--prompts", str(fx / "prompts.txt"), "--out", str(fx / "gen"))
    cli(*cache_argv(str(fx / "cache")))
    cli("prune", "--teacher", str(fx / "teacher"), "--plan", "bk-tiny", "--out", str(fx / "student"))
    (fx / "COMPLETE").write_text("ok\n")


# --------------------------------------------------------------------------------------------- checks


def _read_json(path: Path):
    return json.loads(path.read_text())


def check_student_written(out: str = "run") -> Callable[[Ctx, Outcome], str | None]:
    def check(ctx: Ctx, o: Outcome) -> str | None:
        if not (ctx.case / out / "student" / "model_index.json").is_file():
            return f"exit 0 but no {out}/student/model_index.json"
        return None

    return check


def check_distill_skipped(expected: int) -> Callable[[Ctx, Outcome], str | None]:
    def check(ctx: Ctx, o: Outcome) -> str | None:
        problem = check_student_written()(ctx, o)
        if problem:
            return problem
        records = [json.loads(x) for x in (ctx.case / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
        total = sum(int(r.get("skipped_samples", 0)) for r in records)
        if total < expected:
            return f"{expected} unusable record(s) in the data, but the metrics count {total} skipped"
        return None

    return check


def check_cache_counts(samples: int, skipped: int) -> Callable[[Ctx, Outcome], str | None]:
    def check(ctx: Ctx, o: Outcome) -> str | None:
        meta_file = ctx.case / "cache" / "cache.json"
        if not meta_file.is_file():
            return "exit 0 but no cache.json"
        meta = _read_json(meta_file)
        got = (meta.get("num_samples"), meta.get("num_skipped"), meta.get("complete"))
        if got != (samples, skipped, True):
            return f"cache.json (num_samples, num_skipped, complete) = {got}, expected ({samples}, {skipped}, True)"
        return None

    return check


def check_same_student(ctx: Ctx, o: Outcome, out: str = "run") -> str | None:
    """The student's weights equal those of the uninterrupted fixture run (bit for bit)."""
    mine = ctx.case / out / "student" / "unet" / "diffusion_pytorch_model.safetensors"
    ref = ctx.fx / "run" / "student" / "unet" / "diffusion_pytorch_model.safetensors"
    if not mine.is_file():
        return f"no {mine.relative_to(ctx.case)}"
    if sha(mine) != sha(ref):
        return "the resumed run's student differs from the uninterrupted run's"
    return None


def check_checkpoints_complete(ctx: Ctx, out: Path) -> str | None:
    """Nothing under checkpoints/ looks complete without being complete."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return None
    for sub in folder.iterdir():
        if sub.name.startswith("."):
            continue  # a hidden partial is not taken for a checkpoint
        if not (sub / "trainer_state.json").is_file():
            return f"{sub.name} looks like a checkpoint but has no trainer_state.json"
        for f in sub.rglob("*.safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as g:
                    list(g.keys())
            except Exception as err:  # noqa: BLE001
                return f"{f.relative_to(out)} is unreadable in a checkpoint that looks complete: {err}"
    return None


def check_images_whole(folder: Path) -> str | None:
    from PIL import Image

    for f in sorted(folder.glob("*.png")):
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as err:  # noqa: BLE001
            return f"{f.name} looks complete but is unreadable: {err}"
    return None


def check_gen_equals_fixture(ctx: Ctx, o: Outcome, out: str = "gen") -> str | None:
    mine, ref = ctx.case / out, ctx.fx / "gen"
    names = sorted(p.name for p in ref.glob("*.png"))
    got = sorted(p.name for p in mine.glob("*.png"))
    if got != names:
        return f"images {got} != expected {names}"
    diff = [n for n in names if sha(mine / n) != sha(ref / n)]
    return f"images differ from an uninterrupted run: {diff}" if diff else None


def check_images(folder: str, count: int, size: tuple[int, int] | None = None):
    def check(ctx: Ctx, o: Outcome) -> str | None:
        from PIL import Image

        found = sorted((ctx.case / folder).glob("*.png"))
        if len(found) != count:
            return f"{len(found)} image(s) in {folder}, expected {count}"
        if size:
            for f in found:
                with Image.open(f) as im:
                    if im.size != size:
                        return f"{f.name} is {im.size}, expected {size}"
        return None

    return check


def check_eval_skipped(count: int, skipped: int, where: str = "gen"):
    def check(ctx: Ctx, o: Outcome) -> str | None:
        result = _read_json(ctx.case / where / "evaluation.json")
        got = (result.get("count"), len(result.get("skipped", [])))
        return (
            None
            if got == (count, skipped)
            else f"evaluation.json (count, skipped) = {got}, expected {(count, skipped)}"
        )

    return check


def _either(a, b):
    def check(ctx: Ctx, o: Outcome) -> str | None:
        first = a(ctx, o)
        return None if first is None or b(ctx, o) is None else first

    return check


def check_i2i_skipped(outputs: int, skipped: int):
    def check(ctx: Ctx, o: Outcome) -> str | None:
        out = ctx.case / "out"
        pngs = [p for p in out.glob("*.png")]
        meta = _read_json(out / "img2img.json") if (out / "img2img.json").is_file() else {}
        listed = meta.get("skipped", None)
        if len(pngs) != outputs:
            return f"{len(pngs)} output image(s), expected {outputs}"
        if listed is None or len(listed) != skipped:
            return f"img2img.json skipped = {listed!r}, expected {skipped} file(s)"
        return None

    return check


# --------------------------------------------------------------------------------------------- case lists


def distill_cases() -> list[Case]:
    cases: list[Case] = []
    run = "{case}/run"

    def add(name, category, argv=None, **kw):
        cases.append(Case(name=f"distill/{name}", command="distill", category=category,
                          argv=argv if argv is not None else distill_argv(run), **kw))  # fmt: skip

    # 31+ bad config keys, types and values: refused before any work, naming the key
    bad = [
        ("unknown-section", "foo.bar=1", "foo"),
        ("unknown-key", "train.max_stepz=3", "max_stepz"),
        ("misspelt-key", "train.max_step=3", "max_step"),
        ("steps-not-int", "train.max_steps=abc", "max_steps"),
        ("steps-negative", "train.max_steps=-1", "max_steps"),
        ("steps-zero", "train.max_steps=0", "max_steps"),
        ("steps-float", "train.max_steps=2.5", "max_steps"),
        ("batch-zero", "train.batch_size=0", "batch_size"),
        ("batch-negative", "train.batch_size=-2", "batch_size"),
        ("accumulation-zero", "train.gradient_accumulation_steps=0", "gradient_accumulation_steps"),
        ("lr-negative", "optim.lr=-1", "lr"),
        ("lr-nan", "optim.lr=nan", "lr"),
        ("lr-inf", "optim.lr=inf", "lr"),
        ("lr-text", "optim.lr=fast", "lr"),
        ("beta1-above-1", "optim.adam_beta1=2", "adam_beta1"),
        ("epsilon-negative", "optim.adam_epsilon=-1e-8", "adam_epsilon"),
        ("grad-norm-negative", "optim.max_grad_norm=-1", "max_grad_norm"),
        ("scheduler-unknown", "optim.lr_scheduler=bogus", "lr_scheduler"),
        ("warmup-negative", "optim.lr_warmup_steps=-10", "lr_warmup_steps"),
        ("mixed-precision-fp8", "train.mixed_precision=fp8", "mixed_precision"),
        ("teacher-dtype-fp64", "train.teacher_dtype=fp64", "teacher_dtype"),
        ("attention-unknown", "train.attention=flash9", "attention"),
        ("resolution-not-multiple-of-8", "data.resolution=100", "resolution"),
        ("resolution-zero", "data.resolution=0", "resolution"),
        ("resolution-negative", "data.resolution=-64", "resolution"),
        ("workers-negative", "data.num_workers=-1", "num_workers"),
        ("max-samples-zero", "data.max_samples=0", "max_samples"),
        ("ema-decay-above-1", "train.ema_decay=1.5", "ema_decay"),
        ("ema-decay-negative", "train.ema_decay=-0.1", "ema_decay"),
        ("bool-not-bool", "train.use_ema=maybe", "use_ema"),
        ("checkpoint-every-negative", "train.checkpoint_every=-5", "checkpoint_every"),
        ("keep-checkpoints-negative", "train.keep_checkpoints=-1", "keep_checkpoints"),
        ("log-every-negative", "train.log_every=-1", "log_every"),
        ("lambda-negative", "loss.lambda_task=-1", "lambda_task"),
        ("lambda-nan", "loss.lambda_feat=nan", "lambda_feat"),
        ("init-unknown", "model.init=zeros", "init"),
        ("plan-unknown", "model.plan=bk-nonexistent", "bk-nonexistent"),
        ("override-without-equals", "train.max_steps", "train.max_steps"),
        ("validation-steps-zero", "train.validation_steps=0", "validation_steps"),
        ("validation-guidance-nan", "train.validation_guidance=nan", "validation_guidance"),
        ("section-as-value", "train=5", "train"),
    ]
    for name, override, word in bad:
        add(f"config-{name}", "bad config value", [*distill_argv(run), override], words=(word,))

    def yaml_setup(text: str):
        def setup(ctx: Ctx) -> None:
            (ctx.case / "recipe.yaml").write_text(text)

        return setup

    add("config-file-missing", "bad path", [*distill_argv(run), "--config", "{case}/nope.yaml"], words=("nope.yaml",))
    add("config-yaml-syntax", "bad config value", ["distill", "--config", "{case}/recipe.yaml", *distill_argv(run)[1:]],
        setup=yaml_setup("train:\n  max_steps: [1, 2\n"), words=("recipe.yaml",))  # fmt: skip
    add("config-yaml-list", "bad config value", ["distill", "--config", "{case}/recipe.yaml", *distill_argv(run)[1:]],
        setup=yaml_setup("- 1\n- 2\n"), words=("recipe.yaml",))  # fmt: skip
    add("config-yaml-unknown-key", "bad config value",
        ["distill", "--config", "{case}/recipe.yaml", *distill_argv(run)[1:]],
        setup=yaml_setup("train:\n  max_stepz: 3\n"), words=("max_stepz",))  # fmt: skip
    add("config-no-data", "bad config value", distill_argv(run, data=None), words=("data.train",))
    add("mixed-precision-fp16-on-cpu", "environment", distill_argv(run, train__mixed_precision="fp16"),
        expect="ok", check=check_student_written(),
        note="documented: fp16 falls back to fp32 without CUDA")  # fmt: skip

    # paths
    add("teacher-missing", "bad path", distill_argv(run, teacher="/nonexistent/teacher"), words=("/nonexistent",))
    add("teacher-is-a-file", "bad path", distill_argv(run, teacher="{fx}/prompts.txt"), words=("prompts.txt",))
    add("teacher-not-a-pipeline", "bad path", distill_argv(run, teacher="{fx}/data"), words=("data",))
    add("teacher-hub-id-offline", "environment", distill_argv(run, teacher="nobody-here/no-such-model"),
        words=("no-such-model",), env={"HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    add("student-missing", "bad path", [*distill_argv(run), "model.student=/nonexistent"], words=("/nonexistent",))
    add("data-missing", "bad path", distill_argv(run, data="/nonexistent/data"), words=("/nonexistent",))
    add("data-is-a-file", "bad path", distill_argv(run, data="{fx}/prompts.txt"), words=("prompts.txt",))
    add("data-hf-offline", "environment", distill_argv(run, data="hf:nobody-here/no-such-dataset"),
        words=("no-such-dataset",), timeout=120)  # fmt: skip
    add("data-hf-offline-env", "environment", distill_argv(run, data="hf:nobody-here/no-such-dataset"),
        words=("no-such-dataset",), env={"HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    add("data-hf-saved-folder-missing", "bad path", distill_argv(run, data="hf:/nonexistent/saved"),
        words=("/nonexistent",))  # fmt: skip
    add("cache-missing", "bad path", [*distill_argv(run, data=None), "data.cache=/nonexistent/cache"],
        words=("/nonexistent",))  # fmt: skip

    def incomplete_cache(ctx: Ctx) -> None:
        c = copy_fixture(ctx, "cache")
        meta = _read_json(c / "cache.json")
        meta["complete"] = False
        (c / "cache.json").write_text(json.dumps(meta))

    add("cache-incomplete", "corrupt data", [*distill_argv(run, data=None), "data.cache={case}/cache"],
        setup=incomplete_cache, words=("cache",))  # fmt: skip
    add("cache-from-data-folder", "bad path", [*distill_argv(run, data=None), "data.cache={fx}/data"],
        words=("cache",))  # fmt: skip
    add("cached-run", "documented", [*distill_argv(run, data=None), "data.cache={fx}/cache"], expect="ok",
        check=check_student_written())  # fmt: skip

    # data files
    data_cases = data_variants()
    for name, (setup, expect, words, extra) in data_cases.items():
        kw = {"words": words} if expect == "error" else {"check": extra}
        add(f"data-{name}", "corrupt/odd data", distill_argv(run, data="{case}/data"), setup=setup, expect=expect,
            **kw)  # fmt: skip

    # output folders
    def out_is_file(ctx: Ctx) -> None:
        (ctx.case / "run").write_text("precious\n")

    add("output-is-a-file", "bad path", setup=out_is_file, words=("is a file",), guard=lambda c: [c.case / "run"])
    add("output-under-a-file", "bad path", distill_argv("{fx}/prompts.txt/run"), words=("prompts.txt",),
        guard=lambda c: [c.fx / "prompts.txt"])  # fmt: skip
    add("output-in-proc", "environment", distill_argv("/proc/bksdm-sweep-run"), words=("/proc/bksdm-sweep-run",))
    add("output-read-only", "environment", distill_argv("{case}/ro/run"), needs_mount=True, words=("read-only",),
        setup=lambda c: c.mount(c.case / "ro", "1m", ro=True))  # fmt: skip

    def full_disk(ctx: Ctx) -> None:
        ckpt = ctx.fx / "run" / "checkpoints" / "checkpoint-0000004"
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        ctx.mount(ctx.case / "disk", f"{int(size * 1.5 + 64 * 1024) // 4096 * 4096}")

    def full_disk_check(ctx: Ctx, o: Outcome) -> str | None:
        out = ctx.case / "disk" / "run"
        problem = check_checkpoints_complete(ctx, out)
        if problem:
            return problem
        if (out / "student").exists():
            return "a student folder exists after a failed run"
        from bksdm.train.checkpoints import complete_checkpoints

        names = [p.name for p in complete_checkpoints(out)]
        return None if names == ["checkpoint-0000002"] else f"complete checkpoints {names}, expected the first one"

    add("output-full-disk", "environment", distill_argv("{case}/disk/run"), needs_mount=True, setup=full_disk,
        words=("space",), statuses=(1,), check=full_disk_check)  # fmt: skip

    def another_run(ctx: Ctx) -> None:
        copy_fixture(ctx, "run")

    add("output-of-another-run", "data safety", distill_argv(run, train__checkpoint_every=1, train__max_steps=2),
        setup=another_run, words=("another run", "--resume", "--overwrite"),
        guard=lambda c: [c.case / "run"])  # fmt: skip
    add("output-of-another-run-with-other-plan", "data safety", distill_argv(run, model__plan="bk-small"),
        setup=another_run, words=("another run",), guard=lambda c: [c.case / "run"])  # fmt: skip

    def overwrite_check(ctx: Ctx, o: Outcome) -> str | None:
        from bksdm.train.checkpoints import complete_checkpoints

        names = [p.name for p in complete_checkpoints(ctx.case / "run")]
        steps = [json.loads(x)["step"] for x in (ctx.case / "run/logs/metrics.jsonl").read_text().splitlines()]
        if names != ["checkpoint-0000001", "checkpoint-0000002"] or steps != [1, 2]:
            return f"after --overwrite: checkpoints {names}, logged steps {steps}"
        return None

    add("output-of-another-run-overwrite", "documented", [*distill_argv(run, train__checkpoint_every=1,
        train__max_steps=2), "--overwrite"], setup=another_run, expect="ok", check=overwrite_check)  # fmt: skip

    # resume
    resume = [*distill_argv(run), "--resume", "latest"]
    add("resume-latest-nothing-there", "documented", resume, expect="ok", check=check_student_written(),
        note="documented in checkpoints.find_checkpoint: 'latest' with no checkpoint starts afresh (a launcher "
        "can always pass --resume latest)")  # fmt: skip
    add("resume-missing-path", "bad path", [*distill_argv(run), "--resume", "/nonexistent/checkpoint-0000002"],
        words=("/nonexistent",))  # fmt: skip
    add("resume-latest-other-plan", "data safety", [*distill_argv(run, model__plan="bk-small"), "--resume", "latest"],
        setup=another_run, words=("plan",), guard=lambda c: [c.case / "run" / "checkpoints"])  # fmt: skip
    add("resume-latest-ema-off", "data safety", [*distill_argv(run, train__use_ema="false"), "--resume", "latest"],
        setup=another_run, words=("EMA",), guard=lambda c: [c.case / "run" / "checkpoints"])  # fmt: skip
    add("resume-other-teacher-width", "data safety",
        [*distill_argv(run, teacher="{fx}/teacher-v2"), "--resume", "latest"], setup=another_run,
        words=("checkpoint",), guard=lambda c: [c.case / "run" / "checkpoints"])  # fmt: skip

    def finished_resume_check(ctx: Ctx, o: Outcome) -> str | None:
        return check_same_student(ctx, o)

    def drop_student_and_last(ctx: Ctx) -> None:
        r = copy_fixture(ctx, "run")
        shutil.rmtree(r / "student")
        shutil.rmtree(r / "checkpoints" / "checkpoint-0000004")

    add("resume-latest-continues-exactly", "documented", resume, setup=drop_student_and_last, expect="ok",
        check=finished_resume_check)  # fmt: skip

    def old_format(ctx: Ctx) -> None:
        folder = ctx.case / "run" / "checkpoints" / "checkpoint-0000002"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "time": 0}))
        (folder / "custom_checkpoint_0.pkl").write_bytes(exploit(ctx.marker))

    add("resume-old-accelerate-format", "crafted pickle", resume, setup=old_format, words=("older",), marker=True)

    def truncate(name: str):
        def setup(ctx: Ctx) -> None:
            drop_student_and_last(ctx)
            f = ctx.case / "run" / "checkpoints" / "checkpoint-0000002" / name
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])

        return setup

    for name in ("training_state.safetensors", "unet/diffusion_pytorch_model.safetensors", "trainer_state.json"):
        add(f"resume-truncated-{name.replace('/', '-')}", "corrupt data", resume, setup=truncate(name),
            words=("checkpoint-0000002",))  # fmt: skip

    def trainer_state_garbage(ctx: Ctx) -> None:
        drop_student_and_last(ctx)
        (ctx.case / "run/checkpoints/checkpoint-0000002/trainer_state.json").write_text('{"format": 2, "step": "x"}')

    add("resume-trainer-state-wrong-types", "corrupt data", resume, setup=trainer_state_garbage,
        words=("checkpoint-0000002",))  # fmt: skip

    # a crafted pickle in place of each checkpoint file: runs nothing; state files refused, configs not needed
    documented = {
        "config.yaml": "ok",
        "trainer_state.json": "error",
        "training_state.safetensors": "error",
        "unet/config.json": "ok",
        "unet/diffusion_pytorch_model.safetensors": "error",
        "unet_ema/config.json": "ok",
        "unet_ema/diffusion_pytorch_model.safetensors": "error",
        "custom_checkpoint_0.pkl": "ok",  # accelerate's EMA pickle: added, never read
        "random_states_0.pkl": "ok",
        "optimizer.bin": "ok",
    }
    for file, expect in documented.items():

        def plant(ctx: Ctx, file=file) -> None:
            drop_student_and_last(ctx)
            (ctx.case / "run" / "checkpoints" / "checkpoint-0000002" / file).write_bytes(exploit(ctx.marker))

        kw = {"words": ("checkpoint-0000002",)} if expect == "error" else {"check": check_student_written()}
        add(f"resume-crafted-pickle-{file.replace('/', '-')}", "crafted pickle",
            [*distill_argv(run), "--resume", "{case}/run/checkpoints/checkpoint-0000002"], setup=plant,
            expect=expect, marker=True, **kw)  # fmt: skip

    # signals and kills
    for point in ("first-checkpoint", "second-checkpoint", "final-student", "mid-step"):
        add(f"sigkill-during-{point}-then-resume", "signal/kill", driver=sigkill_distill(point), expect="ok",
            serial=True, timeout=600)  # fmt: skip
    add("sigterm-then-resume", "signal/kill", driver=sigterm_distill(signal.SIGTERM), statuses=(143,),
        prefix="bksdm distill:", words=("SIGTERM", "--resume latest"), serial=True, timeout=600)  # fmt: skip
    add("sigint-then-resume", "signal/kill", driver=sigterm_distill(signal.SIGINT), statuses=(130, 143),
        prefix="bksdm distill:", words=(), serial=True, timeout=600,
        note="SIGINT (Ctrl-C): any clear stop; the resumed run must end as an uninterrupted one")  # fmt: skip
    cases.append(Case(name="demo/sigterm", command="demo", category="signal/kill", driver=sigterm_demo,
                      statuses=(143,), prefix="bksdm demo:", words=("SIGTERM", "--resume latest"), serial=True,
                      timeout=600))  # fmt: skip
    return cases


def data_variants() -> dict[str, tuple]:
    """Variants of the 8-image data folder: name -> (setup, expect, words, check)."""
    out: dict[str, tuple] = {}

    def base(ctx: Ctx) -> Path:
        return copy_fixture(ctx, "data")

    def rows_of(folder: Path) -> list[list[str]]:
        with (folder / "metadata.csv").open(newline="") as f:
            return list(csv.reader(f))

    def meta_text(text: str | bytes, name: str = "metadata.csv", remove_csv: bool = True):
        def setup(ctx: Ctx) -> None:
            d = base(ctx)
            if remove_csv:
                (d / "metadata.csv").unlink()
            (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())

        return setup

    def good_csv(encoding: str, bom: bool = False):
        def setup(ctx: Ctx) -> None:
            d = base(ctx)
            text = (d / "metadata.csv").read_text()
            (d / "metadata.csv").write_bytes((("\ufeff" if bom else "") + text).encode(encoding))

        return setup

    def stray_quote(ctx: Ctx) -> None:
        d = base(ctx)
        lines = (d / "metadata.csv").read_text().splitlines()
        lines[4] = lines[4].replace(",", ',"', 1)
        (d / "metadata.csv").write_text("\n".join(lines) + "\n")

    def extra_field(ctx: Ctx) -> None:
        d = base(ctx)
        lines = (d / "metadata.csv").read_text().splitlines()
        lines[3] += ",surplus"
        (d / "metadata.csv").write_text("\n".join(lines) + "\n")

    def latin1(ctx: Ctx) -> None:
        d = base(ctx)
        lines = (d / "metadata.csv").read_text().splitlines()
        lines[2] = lines[2] + " caf\xe9"
        (d / "metadata.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))

    out["stray-quote"] = (stray_quote, "error", ("line",), None)
    out["field-too-many"] = (extra_field, "error", ("line",), None)
    out["utf16-metadata"] = (good_csv("utf-16"), "error", ("UTF-16",), None)
    out["utf32-metadata"] = (good_csv("utf-32"), "error", ("UTF-32",), None)
    out["latin1-metadata"] = (latin1, "error", ("byte",), None)
    out["utf8-bom-metadata"] = (good_csv("utf-8", bom=True), "ok", (), check_distill_skipped(0))
    out["no-metadata"] = (meta_text(b"", name="notes.txt"), "error", ("metadata",), None)
    out["empty-metadata"] = (meta_text(b""), "error", ("metadata",), None)
    out["header-only-metadata"] = (meta_text("file_name,text\n"), "error", ("metadata",), None)
    out["missing-caption-column"] = (meta_text("file_name,caption\n000.png,a red circle\n"), "error", ("text",), None)
    out["jsonl-bad-line"] = (meta_text('{"file_name": "000.png", "text": "a"}\n{"file_name": \n',
                                       name="metadata.jsonl"), "error", ("line",), None)  # fmt: skip
    out["jsonl-not-objects"] = (meta_text("[1, 2]\n", name="metadata.jsonl"), "error", ("metadata.jsonl",), None)
    out["binary-metadata"] = (meta_text(png_bytes()), "error", ("metadata.csv",), None)

    def every_unusable(ctx: Ctx) -> None:
        d = base(ctx)
        for f in d.glob("*.png"):
            f.write_bytes(b"not an image")

    out["every-record-unusable"] = (every_unusable, "error", ("usable",), None)

    def all_missing(ctx: Ctx) -> None:
        d = base(ctx)
        for f in d.glob("*.png"):
            f.unlink()

    out["every-image-missing"] = (all_missing, "error", ("usable",), None)

    def empty_captions(ctx: Ctx) -> None:
        d = base(ctx)
        rows = rows_of(d)
        write_metadata(d, [(r[0], "") for r in rows[1:]])

    out["every-caption-empty"] = (empty_captions, "error", ("usable",), None)

    for kind in BAD_IMAGES:

        def one_bad(ctx: Ctx, kind=kind) -> None:
            d = base(ctx)
            target = d / "003.png"
            BAD_IMAGES[kind](target, target.read_bytes())

        out[f"one-image-{kind}"] = (one_bad, "ok", (), check_distill_skipped(1))

    for kind, (mode, size) in ODD_IMAGES.items():

        def one_odd(ctx: Ctx, mode=mode, size=size) -> None:
            d = base(ctx)
            (d / "003.png").unlink()
            path = save_odd(d / "003.png", mode, size)
            rows = rows_of(d)
            write_metadata(d, [(path.name if r[0] == "003.png" else r[0], r[1]) for r in rows[1:]])

        out[f"odd-image-{kind}"] = (one_odd, "ok", (), check_distill_skipped(0))

    def one_empty_caption(ctx: Ctx) -> None:
        d = base(ctx)
        rows = rows_of(d)[1:]
        rows[2] = [rows[2][0], ""]
        write_metadata(d, [tuple(r) for r in rows])

    out["one-empty-caption"] = (one_empty_caption, "ok", (), check_distill_skipped(1))

    def path_escape(ctx: Ctx) -> None:
        d = base(ctx)
        rows = rows_of(d)[1:]
        rows[1] = ["../../../../etc/passwd", rows[1][1]]
        write_metadata(d, [tuple(r) for r in rows])

    out["file-name-escapes-folder"] = (path_escape, "ok", (), check_distill_skipped(1))
    return out


# --- signal drivers


def _wait_for(condition: Callable[[], bool], proc: Proc, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def _hidden(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.startswith(".") and p.name.endswith(".partial") for p in folder.iterdir())


def sigkill_distill(point: str):
    def driver(ctx: Ctx, case: Case) -> Outcome:
        out = ctx.case / "run"
        ckpts = out / "checkpoints"
        proc = ctx.runner.start(ctx.fmt(distill_argv("{case}/run")), ctx.case / "first.log", ctx.case)
        condition = {
            "first-checkpoint": lambda: _hidden(ckpts),
            "second-checkpoint": lambda: (ckpts / "checkpoint-0000002").is_dir() and _hidden(ckpts),
            "final-student": lambda: _hidden(out),
            "mid-step": lambda: (
                (out / "logs" / "metrics.jsonl").is_file() and (out / "logs" / "metrics.jsonl").stat().st_size > 0
            ),
        }[point]
        hit = _wait_for(condition, proc, 300)
        proc.signal(signal.SIGKILL)
        first = proc.finish(60)
        if not hit:
            return Outcome(first.status, first.output, first.seconds, problem=f"the kill point ({point}) never came",
                           problem_class="skipped")  # fmt: skip
        problem = check_checkpoints_complete(ctx, out)
        if problem:
            return Outcome(first.status, first.output, first.seconds, problem=problem, problem_class="data loss")
        argv = [*distill_argv("{case}/run"), "--resume", "latest"]
        second = ctx.runner.run(ctx.fmt(argv), ctx.case / "resume.log", ctx.case, case.timeout)
        second.output = f"[killed at {point}: status {first.status}]\n{first.output[-2000:]}\n[resume]\n{second.output}"
        if second.status == 0:
            second.problem = check_same_student(ctx, second)
        return second

    return driver


def sigterm_distill(sig: int):
    def driver(ctx: Ctx, case: Case) -> Outcome:
        out = ctx.case / "run"
        metrics = out / "logs" / "metrics.jsonl"
        argv = distill_argv("{case}/run", train__max_steps=6)
        proc = ctx.runner.start(ctx.fmt(argv), ctx.case / "first.log", ctx.case)
        hit = _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, proc, 300)
        proc.signal(sig)
        first = proc.finish(120)
        if not hit:
            first.problem, first.problem_class = "the run ended before the signal", "skipped"
            return first
        if first.status not in case.statuses or "Traceback" in first.output:
            return first  # classified on its own output
        argv = [*distill_argv("{case}/run", train__max_steps=6), "--resume", "latest"]
        second = ctx.runner.run(ctx.fmt(argv), ctx.case / "resume.log", ctx.case, case.timeout)
        if second.status != 0:
            first.problem = f"--resume latest after the signal failed (status {second.status}): {second.output[-800:]}"
        else:
            ref = ctx.case / "ref"
            third = ctx.runner.run(ctx.fmt(distill_argv("{case}/ref", train__max_steps=6)), ctx.case / "ref.log",
                                   ctx.case, case.timeout)  # fmt: skip
            a = out / "student" / "unet" / "diffusion_pytorch_model.safetensors"
            b = ref / "student" / "unet" / "diffusion_pytorch_model.safetensors"
            if third.status != 0 or not b.is_file():
                first.problem, first.problem_class = f"the reference run failed: {third.output[-500:]}", "skipped"
            elif not a.is_file() or sha(a) != sha(b):
                first.problem = "the resumed run's student differs from an uninterrupted run's"
        return first

    return driver


def sigterm_demo(ctx: Ctx, case: Case) -> Outcome:
    out = ctx.case / "demo"
    proc = ctx.runner.start(["demo", "--out", str(out), "--steps", "400"], ctx.case / "demo.log", ctx.case)
    hit = _wait_for(lambda: any(f.stat().st_size for f in out.glob("runs/*/logs/metrics.jsonl")), proc, 400)
    proc.signal(signal.SIGTERM)
    outcome = proc.finish(case.timeout)
    if not hit:
        outcome.problem, outcome.problem_class = "training never started before the timeout", "skipped"
    return outcome


# --------------------------------------------------------------------------------------------- cache


def cache_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, argv=(), **kw):
        cases.append(Case(name=f"cache/{name}", command="cache", category=category, argv=list(argv), **kw))

    c = "{case}/cache"
    add("batch-size-zero", "bad size/number", cache_argv(c, "{fx}/data", "--batch-size", "0"), words=("batch",))
    add("batch-size-negative", "bad size/number", cache_argv(c, "{fx}/data", "--batch-size", "-3"), words=("batch",))
    add("shard-size-zero", "bad size/number", cache_argv(c, "{fx}/data", "--shard-size", "0"), words=("shard",))
    add("dtype-unknown", "bad config value", cache_argv(c, "{fx}/data", "--dtype", "fp8"), words=("dtype",))
    add("resolution-zero", "bad config value", cache_argv(c, "{fx}/data", "data.resolution=0"), words=("resolution",))
    add(
        "teacher-missing",
        "bad path",
        cache_argv(c, "{fx}/data", "model.teacher=/nonexistent/t"),
        words=("/nonexistent",),
    )
    add("data-missing", "bad path", cache_argv(c, "/nonexistent/data"), words=("/nonexistent",))
    add("data-hf-offline", "environment", cache_argv(c, "hf:nobody-here/no-such-dataset"),
        words=("no-such-dataset",), timeout=120)  # fmt: skip
    add("unknown-key", "bad config value", cache_argv(c, "{fx}/data", "data.resolutoin=64"), words=("resolutoin",))
    add("out-is-a-file", "bad path", cache_argv("{fx}/prompts.txt"), words=("prompts.txt",),
        guard=lambda x: [x.fx / "prompts.txt"])  # fmt: skip
    add("out-under-a-file", "bad path", cache_argv("{fx}/prompts.txt/cache"), words=("prompts.txt",))
    add("out-in-proc", "environment", cache_argv("/proc/bksdm-sweep-cache"), words=("/proc/bksdm-sweep-cache",))
    add("out-read-only", "environment", cache_argv("{case}/ro/cache"), needs_mount=True, words=("read-only",),
        setup=lambda x: x.mount(x.case / "ro", "1m", ro=True))  # fmt: skip

    def full(ctx: Ctx) -> None:
        shard = max((ctx.fx / "cache").glob("*.safetensors"), key=lambda p: p.stat().st_size)
        ctx.mount(ctx.case / "disk", f"{(shard.stat().st_size + 8192) // 4096 * 4096 + 4096}")

    def full_check(ctx: Ctx, o: Outcome) -> str | None:
        meta = ctx.case / "disk" / "cache" / "cache.json"
        if meta.is_file() and _read_json(meta).get("complete"):
            return "cache.json says complete after a failed write"
        for f in (ctx.case / "disk" / "cache").glob("*.safetensors") if (ctx.case / "disk/cache").is_dir() else []:
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as g:
                    list(g.keys())
            except Exception as err:  # noqa: BLE001
                return f"{f.name} looks complete but is unreadable: {err}"
        return None

    add("out-full-disk", "environment", cache_argv("{case}/disk/cache"), needs_mount=True, setup=full,
        words=("space",), statuses=(1,), check=full_check)  # fmt: skip

    for name, (setup, expect, words, _check) in data_variants().items():
        if expect == "error":
            add(f"data-{name}", "corrupt/odd data", cache_argv(c, "{case}/data"), setup=setup, words=words)
    for kind in BAD_IMAGES:

        def one_bad(ctx: Ctx, kind=kind) -> None:
            d = copy_fixture(ctx, "data")
            target = d / "005.png"
            BAD_IMAGES[kind](target, target.read_bytes())

        add(f"one-image-{kind}", "corrupt/odd data", cache_argv(c, "{case}/data"), setup=one_bad, expect="ok",
            check=check_cache_counts(7, 1))  # fmt: skip

    def three_bad(ctx: Ctx) -> None:
        d = copy_fixture(ctx, "data")
        for name, kind in (("001.png", "corrupt"), ("004.png", "truncated"), ("006.png", "zero-byte")):
            BAD_IMAGES[kind](d / name, (d / name).read_bytes())

    add("three-images-bad", "corrupt/odd data", cache_argv(c, "{case}/data"), setup=three_bad, expect="ok",
        check=check_cache_counts(5, 3))  # fmt: skip

    def other_data(ctx: Ctx) -> None:
        copy_fixture(ctx, "cache")
        make_shapes(ctx.case / "data2", n=8, seed=5)

    add("out-holds-a-cache-of-other-data", "data safety", cache_argv(c, "{case}/data2"), setup=other_data,
        words=("cache",), guard=lambda x: [x.case / "cache"])  # fmt: skip

    def same_again_check(ctx: Ctx, o: Outcome) -> str | None:
        return check_cache_counts(8, 0)(ctx, o)

    add("rerun-complete-cache", "documented", cache_argv(c), setup=lambda x: copy_fixture(x, "cache"), expect="ok",
        check=same_again_check, guard=lambda x: [x.case / "cache"])  # fmt: skip
    add("sigkill-then-resume", "signal/kill", driver=sigkill_cache, expect="ok", serial=True)
    return cases


def sigkill_cache(ctx: Ctx, case: Case) -> Outcome:
    out = ctx.case / "cache"
    argv = ctx.fmt(cache_argv("{case}/cache", "{fx}/data", "--shard-size", "4", "--batch-size", "1"))
    proc = ctx.runner.start(argv, ctx.case / "first.log", ctx.case)
    hit = _wait_for(lambda: out.is_dir() and any(out.glob("*.safetensors")), proc, 300)
    proc.signal(signal.SIGKILL)
    first = proc.finish(60)
    second = ctx.runner.run(argv, ctx.case / "second.log", ctx.case, case.timeout)
    second.output = f"[killed: {first.status}; first shard seen: {hit}]\n{second.output}"
    if second.status == 0:
        second.problem = check_cache_counts(8, 0)(ctx, second)
        if not second.problem:
            ref = {p.name: sha(p) for p in (ctx.fx / "cache").glob("*.safetensors")}
            mine = {p.name: sha(p) for p in out.glob("*.safetensors")}
            if ref != mine:
                second.problem = f"resumed shards differ from an uninterrupted cache: {sorted(mine)} vs {sorted(ref)}"
    return second


# --------------------------------------------------------------------------------------------- generate


def generate_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, extra, prompts="{fx}/prompts.txt", out="{case}/gen", **kw):
        argv = ["generate", *GEN, "--prompts", prompts, "--out", out, *extra]
        cases.append(Case(name=f"generate/{name}", command="generate", category=category, argv=argv, **kw))

    for name, flags, word in [
        ("height-100000", ["--height", "100000", "--width", "100000"], "memory"),
        ("height-0", ["--height", "0"], "height"),
        ("height-negative", ["--height", "-64"], "height"),
        ("height-not-multiple-of-8", ["--height", "100"], "height"),
        ("width-7", ["--width", "7"], "width"),
        ("height-text", ["--height", "tall"], "height"),
        ("height-huge-int", ["--height", "9" * 40], "height"),
        ("guidance-nan", ["--guidance", "nan"], "guidance"),
        ("guidance-negative", ["--guidance", "-5"], "guidance"),
        ("guidance-inf", ["--guidance", "inf"], "guidance"),
        ("guidance-half", ["--guidance", "0.5"], "guidance"),
        ("steps-zero", ["--steps", "0"], "steps"),
        ("steps-negative", ["--steps", "-3"], "steps"),
        ("batch-size-zero", ["--batch-size", "0"], "batch"),
        ("seed-5000-digits", ["--seed", "9" * 5000], "seed"),
        ("resize-zero", ["--resize", "0"], "resize"),
        ("resize-negative", ["--resize", "-8"], "resize"),
        ("dtype-unknown", ["--dtype", "fp8"], "fp8"),
        ("device-tpu", ["--device", "tpu"], "tpu"),
        ("device-cuda-absent", ["--device", "cuda"], "cuda"),
        ("device-cuda-99", ["--device", "cuda:99"], "cuda"),
        ("scheduler-unknown", ["--scheduler", "BogusScheduler"], "BogusScheduler"),
        ("scheduler-not-a-scheduler", ["--scheduler", "UNet2DConditionModel"], "UNet2DConditionModel"),
        ("model-missing", ["--model", "/nonexistent/model"], "/nonexistent"),
        ("model-not-a-pipeline", ["--model", "{fx}/data"], "data"),
        ("unet-missing", ["--unet", "/nonexistent/unet"], "/nonexistent"),
        ("unet-not-a-unet", ["--unet", "{fx}/data"], "data"),
        ("unet-other-text-width", ["--unet", "{fx}/teacher-v2"], "teacher-v2"),
    ]:
        add(name, "bad size/number" if word in ("height", "width", "memory", "steps") else "bad config value",
            flags, words=(word,))  # fmt: skip
    add(
        "seed-negative",
        "bad size/number",
        ["--seed", "-1"],
        expect="ok",
        check=check_images("gen", 8),
        note="documented: the base seed is hashed with the prompt index (prompt_seed), any integer works",
    )
    add("model-hub-offline", "environment", ["--model", "nobody-here/no-such-model"], words=("no-such-model",),
        env={"HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip

    def prompt_file(name: str, content: bytes):
        def setup(ctx: Ctx) -> None:
            (ctx.case / name).write_bytes(content)

        return setup

    for name, fname, content, word in [
        ("prompts-missing", None, None, "nope.txt"),
        ("prompts-empty", "p.txt", b"", "p.txt"),
        ("prompts-blank-lines", "p.txt", b"\n\n  \n", "p.txt"),
        ("prompts-csv-stray-quote", "p.csv", b'prompt\na red circle\n"a blue square\na green circle\n', "line"),
        ("prompts-csv-no-prompt-column", "p.csv", b"image_id,foo\n1,a\n", "p.csv"),
        ("prompts-utf16", "p.txt", "a red circle\na blue square\n".encode("utf-16"), "UTF-16"),
        ("prompts-latin1", "p.txt", "a red caf\xe9\n".encode("latin-1"), "byte"),
        ("prompts-json-broken", "p.json", b'["a red circle", ', "p.json"),
        ("prompts-json-numbers", "p.json", b"[1, 2, 3]", "p.json"),
        ("prompts-json-object", "p.json", b'{"prompt": "a"}', "p.json"),
        ("prompts-jsonl-no-prompt", "p.jsonl", b'{"text2": "a"}\n', "p.jsonl"),
        ("prompts-binary", "p.txt", png_bytes(), "p.txt"),
        ("prompts-is-a-folder", None, None, "data"),
    ]:
        if fname is None:
            target = "{case}/nope.txt" if name == "prompts-missing" else "{fx}/data"
            add(name, "bad path", [], prompts=target, words=(word,))
        else:
            add(name, "corrupt/odd data", [], prompts="{case}/" + fname, setup=prompt_file(fname, content),
                words=(word,))  # fmt: skip

    def bom_check(ctx: Ctx, o: Outcome) -> str | None:
        rows = [json.loads(x) for x in (ctx.case / "gen" / "manifest.jsonl").read_text().splitlines()]
        prompts = [r["prompt"] for r in rows]
        return None if prompts == ["a red circle", "a blue square"] else f"manifest prompts {prompts!r}"

    add("prompts-utf8-bom", "corrupt/odd data", [], prompts="{case}/p.txt",
        setup=prompt_file("p.txt", "\ufeffa red circle\na blue square\n".encode()), expect="ok",
        check=bom_check)  # fmt: skip
    add("prompts-10000-words", "corrupt/odd data", [], prompts="{case}/p.txt",
        setup=prompt_file("p.txt", (" ".join(["red"] * 10000) + "\n").encode()), expect="ok",
        check=check_images("gen", 1))  # fmt: skip

    # output folders and faults
    add("out-is-a-file", "bad path", [], out="{fx}/prompts.txt", words=("prompts.txt",),
        guard=lambda c: [c.fx / "prompts.txt"])  # fmt: skip
    add("out-under-a-file", "bad path", [], out="{fx}/prompts.txt/gen", words=("prompts.txt",))
    add("out-in-proc", "environment", [], out="/proc/bksdm-sweep-gen", words=("/proc/bksdm-sweep-gen",))
    add("out-read-only", "environment", [], out="{case}/ro/gen", needs_mount=True, words=("read-only",),
        setup=lambda c: c.mount(c.case / "ro", "1m", ro=True))  # fmt: skip

    def full(ctx: Ctx) -> None:
        one = (ctx.fx / "gen" / "000000.png").stat().st_size
        ctx.mount(ctx.case / "disk", f"{(3 * one + 12288) // 4096 * 4096}")

    def full_check(ctx: Ctx, o: Outcome) -> str | None:
        folder = ctx.case / "disk" / "gen"
        if not folder.is_dir():
            return None
        problem = check_images_whole(folder)
        if problem:
            return problem
        ref = {p.name: sha(p) for p in (ctx.fx / "gen").glob("*.png")}
        wrong = [p.name for p in folder.glob("*.png") if ref.get(p.name) != sha(p)]
        return f"images differ from the uninterrupted run: {wrong}" if wrong else None

    add("out-full-disk", "environment", [], out="{case}/disk/gen", needs_mount=True, setup=full, words=("space",),
        statuses=(1,), check=full_check)  # fmt: skip

    def prior(ctx: Ctx) -> None:
        copy_fixture(ctx, "gen")

    add("out-of-other-settings", "data safety", ["--seed", "7"], setup=prior, words=("settings",),
        guard=lambda c: [c.case / "gen"])  # fmt: skip
    add("out-of-other-prompts", "data safety", [], prompts="{case}/p.txt",
        setup=lambda c: (prior(c), (c.case / "p.txt").write_text("a yellow star\n" * 8)),
        words=("prompt",), guard=lambda c: [c.case / "gen"])  # fmt: skip
    add("rerun-same-settings", "documented", [], setup=prior, expect="ok",
        check=lambda c, o: check_gen_equals_fixture(c, o),
        guard=lambda c: sorted((c.case / "gen").glob("*.png")),
        note="settings.json gains one entry per run (documented); the images must not change")  # fmt: skip

    def truncated_image(ctx: Ctx) -> None:
        g = copy_fixture(ctx, "gen")
        f = g / "000002.png"
        f.write_bytes(f.read_bytes()[:50])

    add("rerun-after-a-truncated-image", "corrupt/odd data", [], setup=truncated_image, expect="ok",
        check=lambda c, o: check_gen_equals_fixture(c, o),
        note="an image that does not decode must be drawn again, not kept")  # fmt: skip

    def missing_image(ctx: Ctx) -> None:
        g = copy_fixture(ctx, "gen")
        (g / "000005.png").unlink()

    add("rerun-after-a-deleted-image", "documented", [], setup=missing_image, expect="ok",
        check=lambda c, o: check_gen_equals_fixture(c, o))  # fmt: skip

    def broken_manifest(ctx: Ctx) -> None:
        g = copy_fixture(ctx, "gen")
        (g / "settings.json").write_text('{"steps": NaN')

    add("rerun-with-broken-settings-json", "corrupt/odd data", [], setup=broken_manifest,
        words=("settings.json",), guard=lambda c: [p for p in (c.case / "gen").glob("*.png")])  # fmt: skip

    def settings_valid(ctx: Ctx, o: Outcome) -> str | None:
        text = (ctx.case / "gen" / "settings.json").read_text()
        try:
            json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as err:
            return f"settings.json is not valid JSON: {err}"
        return check_images("gen", 8, (64, 64))(ctx, o)

    add("settings-json-is-valid", "documented", ["--guidance", "1"], expect="ok", check=settings_valid)
    cases.append(Case(name="generate/sigkill-then-resume", command="generate", category="signal/kill",
                      driver=sigkill_generate, expect="ok", serial=True))  # fmt: skip
    cases.append(Case(name="generate/sigterm", command="generate", category="signal/kill", driver=sigterm_generate,
                      statuses=(1, 2, 130, 143), prefix="bksdm generate:", serial=True,
                      note="any clear stop; images written before it stay whole and right"))  # fmt: skip
    return cases


def _gen_argv(out: str) -> list[str]:
    return ["generate", *GEN, "--prompts", "{fx}/prompts.txt", "--out", out]


def sigkill_generate(ctx: Ctx, case: Case) -> Outcome:
    out = ctx.case / "gen"
    proc = ctx.runner.start(ctx.fmt(_gen_argv("{case}/gen")), ctx.case / "first.log", ctx.case)
    hit = _wait_for(lambda: out.is_dir() and any(out.glob("0*.png")), proc, 300)
    proc.signal(signal.SIGKILL)
    first = proc.finish(60)
    problem = check_images_whole(out) if out.is_dir() else None
    if problem:
        return Outcome(first.status, first.output, first.seconds, problem=problem, problem_class="data loss")
    second = ctx.runner.run(ctx.fmt(_gen_argv("{case}/gen")), ctx.case / "second.log", ctx.case, case.timeout)
    second.output = f"[killed: {first.status}, an image seen first: {hit}]\n{second.output}"
    if second.status == 0:
        second.problem = check_gen_equals_fixture(ctx, second)
    return second


def sigterm_generate(ctx: Ctx, case: Case) -> Outcome:
    out = ctx.case / "gen"
    proc = ctx.runner.start(ctx.fmt(_gen_argv("{case}/gen")), ctx.case / "first.log", ctx.case)
    hit = _wait_for(lambda: out.is_dir() and any(out.glob("0*.png")), proc, 300)
    proc.signal(signal.SIGTERM)
    first = proc.finish(120)
    if not hit:
        first.problem, first.problem_class = "the run ended before the signal", "skipped"
    elif out.is_dir():
        ref = {p.name: sha(p) for p in (ctx.fx / "gen").glob("*.png")}
        wrong = [p.name for p in out.glob("*.png") if ref.get(p.name) != sha(p)]
        if wrong:
            first.problem, first.problem_class = f"images differ from an uninterrupted run: {wrong}", "data loss"
    if first.status == -signal.SIGTERM and "Traceback" not in first.output and not first.problem:
        # documented for generate: a killed run leaves only whole images and the same command resumes
        first.problem, first.problem_class = "killed by SIGTERM's default action; images whole", "documented behaviour"
    return first


# --------------------------------------------------------------------------------------------- img2img


def img2img_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, extra, image="{fx}/inputs", out="{case}/out", **kw):
        argv = ["img2img", *I2I, "--image", image, "--out", out, *extra]
        cases.append(Case(name=f"img2img/{name}", command="img2img", category=category, argv=argv, **kw))

    def single(name: str, writer: Callable[[Path], None]):
        def setup(ctx: Ctx) -> None:
            writer(ctx.case / name)

        return setup

    add("image-8000x8000", "bad size/number", [], image="{case}/big.png",
        setup=single("big.png", lambda p: __import__("PIL.Image").Image.new("RGB", (8000, 8000), (9, 90, 200))
                     .save(p)), words=("8000",), timeout=400)  # fmt: skip
    add("image-1x1", "bad size/number", [], image="{case}/dot.png",
        setup=single("dot.png", lambda p: p.write_bytes(png_bytes((1, 1)))), words=("dot.png",))  # fmt: skip

    def folder_with_dot(ctx: Ctx) -> None:
        d = copy_fixture(ctx, "inputs")
        (d / "dot.png").write_bytes(png_bytes((1, 1)))

    add("folder-with-a-1x1-image", "bad size/number", [], image="{case}/inputs", setup=folder_with_dot,
        expect="ok", check=check_i2i_skipped(3, 1),
        note="documented: an image of a folder that cannot be used is skipped, named and counted")  # fmt: skip
    add("image-missing", "bad path", [], image="{case}/nope.png", words=("nope.png",))
    add("image-empty-folder", "bad path", [], image="{case}/empty",
        setup=lambda c: (c.case / "empty").mkdir(), words=("empty",))  # fmt: skip
    add("image-folder-without-images", "bad path", [], image="{fx}/run/logs", words=("logs",))
    for kind in ("corrupt", "truncated", "zero-byte", "symlink-loop", "bomb", "html"):

        def bad_single(ctx: Ctx, kind=kind) -> None:
            target = ctx.case / "in.png"
            target.write_bytes(png_bytes())
            BAD_IMAGES[kind](target, target.read_bytes())

        add(f"single-image-{kind}", "corrupt/odd data", [], image="{case}/in.png", setup=bad_single,
            words=("in.png",))  # fmt: skip

        def bad_in_folder(ctx: Ctx, kind=kind) -> None:
            d = copy_fixture(ctx, "inputs")
            target = d / "in1.png"
            BAD_IMAGES[kind](target, target.read_bytes())

        add(f"folder-one-image-{kind}", "corrupt/odd data", [], image="{case}/inputs", setup=bad_in_folder,
            expect="ok", check=check_i2i_skipped(2, 1))  # fmt: skip
    for kind, (mode, size) in ODD_IMAGES.items():
        if kind in ("1x1", "1x3000"):
            continue

        def odd(ctx: Ctx, mode=mode, size=size) -> None:
            d = ctx.case / "inputs"
            d.mkdir()
            save_odd(d / "odd.png", mode, size)

        w, h = size
        add(f"odd-image-{kind}", "corrupt/odd data", [], image="{case}/inputs", setup=odd, expect="ok",
            check=check_images("out", 1, (w // 8 * 8, h // 8 * 8)))  # fmt: skip
    for name, flags, word in [
        ("strength-zero", ["--strength", "0"], "strength"),
        ("strength-negative", ["--strength", "-0.5"], "strength"),
        ("strength-above-1", ["--strength", "1.5"], "strength"),
        ("strength-nan", ["--strength", "nan"], "strength"),
        ("steps-zero", ["--steps", "0"], "steps"),
        ("steps-negative", ["--steps", "-4"], "steps"),
        ("guidance-nan", ["--guidance", "nan"], "guidance"),
        ("guidance-negative", ["--guidance", "-5"], "guidance"),
        ("guidance-inf", ["--guidance", "inf"], "guidance"),
        ("size-zero", ["--size", "0"], "size"),
        ("size-negative", ["--size", "-64"], "size"),
        ("size-100000", ["--size", "100000"], "memory"),
        ("size-garbage", ["--size", "64xabc"], "size"),
        ("size-not-multiple-of-8", ["--size", "7"], "size"),
        ("batch-size-zero", ["--batch-size", "0"], "batch"),
        ("device-tpu", ["--device", "tpu"], "tpu"),
        ("dtype-unknown", ["--dtype", "fp8"], "fp8"),
        ("scheduler-unknown", ["--scheduler", "BogusScheduler"], "BogusScheduler"),
        ("model-missing", ["--model", "/nonexistent/model"], "/nonexistent"),
        ("unet-other-text-width", ["--unet", "{fx}/teacher-v2"], "--unet"),
    ]:
        add(name, "bad size/number" if word in ("size", "memory", "steps", "strength") else "bad config value",
            flags, words=(word,))  # fmt: skip
    add("out-is-a-file-for-a-folder", "bad path", [], out="{fx}/prompts.txt", words=("prompts.txt",),
        guard=lambda c: [c.fx / "prompts.txt"])  # fmt: skip
    add("out-under-a-file", "bad path", [], out="{fx}/prompts.txt/out", words=("prompts.txt",))
    add("out-in-proc", "environment", [], out="/proc/bksdm-sweep-i2i", words=("/proc/bksdm-sweep-i2i",))
    add("out-read-only", "environment", [], out="{case}/ro/out", needs_mount=True, words=("read-only",),
        setup=lambda c: c.mount(c.case / "ro", "1m", ro=True))  # fmt: skip
    add("out-full-disk", "environment", [], out="{case}/disk/out", needs_mount=True, words=("space",), statuses=(1,),
        setup=lambda c: c.mount(c.case / "disk", "12k"),
        check=lambda c, o: check_images_whole(c.case / "disk" / "out")
        if (c.case / "disk/out").is_dir() else None)  # fmt: skip

    def existing(ctx: Ctx) -> None:
        out = ctx.case / "out"
        out.mkdir()
        (out / "in0.png").write_bytes(png_bytes((64, 64), color=(1, 2, 3)))

    add("existing-output-kept", "data safety", [], setup=existing, words=("--overwrite",),
        guard=lambda c: [c.case / "out" / "in0.png"],
        note="documented: existing outputs are kept unless --overwrite (the run is refused, naming them)")  # fmt: skip
    add(
        "seed-negative",
        "bad size/number",
        ["--seed", "-1"],
        expect="ok",
        check=check_images("out", 3),
        note="documented: the base seed is hashed with the image index (image_seed), any integer works",
    )
    add("single-to-png-file", "documented", [], image="{fx}/inputs/in0.png", out="{case}/result.png", expect="ok",
        check=lambda c, o: None if (c.case / "result.png").is_file() else "no result.png")  # fmt: skip
    add("single-to-unknown-extension", "documented", [], image="{fx}/inputs/in0.png", out="{case}/result.xyz",
        expect="ok", check=check_images("result.xyz", 1),
        note="documented: --out is a folder unless it ends in .png/.jpg")  # fmt: skip
    return cases


# --------------------------------------------------------------------------------------------- evaluate, report


def evaluate_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, extra, images="{case}/gen", base=EVAL, **kw):
        argv = ["evaluate", "--images", images, *base, *extra]
        cases.append(Case(name=f"evaluate/{name}", command="evaluate", category=category, argv=argv, **kw))

    def gen(ctx: Ctx) -> Path:
        return copy_fixture(ctx, "gen")

    def fewer(ctx: Ctx) -> None:
        g = gen(ctx)
        lines = (g / "manifest.jsonl").read_text().splitlines()
        (g / "manifest.jsonl").write_text(lines[0] + "\n")

    add("manifest-lists-fewer-images", "corrupt/odd data", [], setup=fewer, words=("manifest",))

    def missing(ctx: Ctx) -> None:
        (gen(ctx) / "000003.png").unlink()

    add("manifest-lists-missing-images", "corrupt/odd data", [], setup=missing, words=("missing",))

    def manifest_text(content: bytes):
        def setup(ctx: Ctx) -> None:
            (gen(ctx) / "manifest.jsonl").write_bytes(content)

        return setup

    add("manifest-utf16", "corrupt/odd data", [],
        setup=manifest_text(json.dumps({"file": "000000.png", "prompt": "a"}).encode("utf-16")),
        words=("UTF-16",))  # fmt: skip
    add("manifest-bad-json-line", "corrupt/odd data", [], setup=manifest_text(b'{"file": "000000.png", \n'),
        words=("manifest.jsonl",))  # fmt: skip
    add("manifest-file-not-a-string", "corrupt/odd data", [],
        setup=manifest_text(b'{"file": 5, "prompt": "a"}\n'), words=("file",))  # fmt: skip
    add("manifest-path-escape", "corrupt/odd data", [],
        setup=manifest_text(b'{"file": "../../../../etc/passwd", "prompt": "a"}\n'), words=("passwd",))  # fmt: skip
    add("images-missing", "bad path", [], images="{case}/nope", words=("nope",))
    add("images-empty-folder", "bad path", [], images="{case}/empty", setup=lambda c: (c.case / "empty").mkdir(),
        words=("empty",))  # fmt: skip
    add("images-is-a-file", "bad path", [], images="{fx}/prompts.txt", words=("prompts.txt",))

    def pickle_weights(kind: str):
        def setup(ctx: Ctx) -> None:
            gen(ctx)
            target = ctx.case / "inception.pth"
            if kind == "torch.save":
                import torch

                torch.save({"Conv2d_1a_3x3.conv.weight": _Exploit(ctx.marker)}, target)
            else:
                target.write_bytes(exploit(ctx.marker, protocol=int(kind[-1])))

        return setup

    noweights = ["--metrics", "is", "--is-splits", "2", "--device", "cpu"]
    for kind in ("pickle-2", "pickle-4", "torch.save"):
        add(f"inception-weights-crafted-{kind}", "crafted pickle",
            ["--inception-weights", "{case}/inception.pth"], base=noweights, setup=pickle_weights(kind),
            words=("pickle",), marker=True)  # fmt: skip
    add("inception-weights-corrupt", "corrupt/odd data", ["--inception-weights", "{case}/w.pth"], base=noweights,
        setup=lambda c: (gen(c), (c.case / "w.pth").write_bytes(b"junk" * 100)), words=("w.pth",))  # fmt: skip
    add("inception-weights-missing", "bad path", ["--inception-weights", "{case}/none.pth"], base=noweights,
        setup=gen, words=("none.pth",))  # fmt: skip
    add("inception-weights-folder", "bad path", ["--inception-weights", "{fx}/data"], base=noweights, setup=gen,
        words=("data",))  # fmt: skip
    add("inception-weights-wrong-tensors", "corrupt/odd data", ["--inception-weights", "{fx}/teacher/unet/"
        "diffusion_pytorch_model.safetensors"], base=noweights, setup=gen, words=("safetensors",))  # fmt: skip

    def crafted_ref(ctx: Ctx) -> None:
        import numpy as np

        gen(ctx)
        np.savez(ctx.case / "ref.npz", mu=np.array([_Exploit(ctx.marker)], dtype=object), sigma=np.eye(2))

    add("ref-npz-crafted-pickle", "crafted pickle", ["--metrics", "fid", "--ref", "{case}/ref.npz"],
        base=EVAL[4:], setup=crafted_ref, words=("ref.npz",), marker=True)  # fmt: skip

    def wrong_ref(ctx: Ctx) -> None:
        import numpy as np

        gen(ctx)
        np.savez(ctx.case / "ref.npz", mean=np.zeros(3))

    add("ref-npz-wrong-keys", "corrupt/odd data", ["--metrics", "fid", "--ref", "{case}/ref.npz"], base=EVAL[4:],
        setup=wrong_ref, words=("ref.npz",))  # fmt: skip

    def nan_ref(ctx: Ctx) -> None:
        import numpy as np

        gen(ctx)
        np.savez(ctx.case / "ref.npz", mu=np.full(2048 // 8, np.nan), sigma=np.eye(2048 // 8))

    add("ref-npz-nan", "corrupt/odd data", ["--metrics", "fid", "--ref", "{case}/ref.npz"], base=EVAL[4:],
        setup=nan_ref, words=("ref.npz",))  # fmt: skip
    add("ref-missing", "bad path", ["--metrics", "fid", "--ref", "{case}/none.npz"], base=EVAL[4:], setup=gen,
        words=("none.npz",))  # fmt: skip
    add("ref-images-missing", "bad path", ["--metrics", "fid", "--ref-images", "{case}/none"], base=EVAL[4:],
        setup=gen, words=("none",))  # fmt: skip
    add("fid-without-reference", "bad config value", ["--metrics", "fid"], base=EVAL[4:], setup=gen, words=("ref",))
    add("metrics-unknown", "bad config value", ["--metrics", "bogus"], base=EVAL[4:], setup=gen, words=("bogus",))
    for name, flags, word in [
        ("is-splits-zero", ["--is-splits", "0"], "splits"),
        ("is-splits-more-than-images", ["--is-splits", "1000"], "splits"),
        ("kid-subset-size-zero", ["--metrics", "kid", "--ref-images", "{fx}/gen", "--kid-subset-size", "0"], "subset"),
        ("batch-size-zero", ["--batch-size", "0"], "batch"),
        ("resize-zero", ["--resize", "0"], "resize"),
        ("resize-negative", ["--resize", "-256"], "resize"),
        ("device-tpu", ["--device", "tpu"], "tpu"),
        (
            "clip-model-offline",
            ["--metrics", "clip", "--clip-model", "hf:nobody-here/no-such-clip", "--offline"],
            "no-such-clip",
        ),
        ("save-ref-in-proc", ["--metrics", "fid", "--ref-images", "{fx}/gen", "--save-ref", "/proc/x.npz"], "x.npz"),
        ("out-under-a-file", ["--out", "{fx}/prompts.txt/e.json"], "prompts.txt"),
    ]:
        add(name, "bad size/number" if "size" in name or "splits" in name else "bad config value", flags,
            setup=gen, words=(word,), spawn="offline" in name)  # fmt: skip

    for kind in ("corrupt", "truncated", "zero-byte", "symlink-loop", "bomb", "directory", "html"):

        def bad_one(ctx: Ctx, kind=kind) -> None:
            g = gen(ctx)
            (g / "manifest.jsonl").unlink()  # a plain folder: every image counts
            target = g / "000100.png"
            target.write_bytes(png_bytes())
            BAD_IMAGES[kind](target, target.read_bytes())

        # a folder named like an image is not an image file: leaving it out uncounted is fine too
        check = check_eval_skipped(8, 1) if kind != "directory" else _either(check_eval_skipped(8, 1),
                                                                               check_eval_skipped(8, 0))  # fmt: skip
        add(f"one-image-{kind}", "corrupt/odd data", [], setup=bad_one, expect="ok", check=check)

    def all_bad(ctx: Ctx) -> None:
        g = gen(ctx)
        (g / "manifest.jsonl").unlink()
        for f in g.glob("*.png"):
            f.write_bytes(b"not an image")

    add("every-image-unreadable", "corrupt/odd data", [], setup=all_bad, words=("unreadable",))

    def ro_images(ctx: Ctx) -> None:
        def populate(where: Path) -> None:
            for f in (ctx.fx / "gen").iterdir():
                shutil.copy2(f, where / f.name)

        ctx.mount(ctx.case / "gen", "2m", populate=populate, ro=True)

    add("images-folder-read-only", "environment", [], setup=ro_images, needs_mount=True, words=("read-only",))
    add("out-full-disk", "environment", ["--out", "{case}/disk/e.json"], needs_mount=True, statuses=(1,),
        setup=lambda c: (gen(c), c.mount(c.case / "disk", "64k")), words=("space",),
        note="a 64 KiB tmpfs filled up by a file first")  # fmt: skip
    cases[-1].setup = _fill_disk_setup(cases[-1].setup)
    return cases + report_cases()


def _fill_disk_setup(inner):
    def setup(ctx: Ctx) -> None:
        inner(ctx)
        with contextlib.suppress(OSError):
            (ctx.case / "disk" / "filler").write_bytes(b"x" * 1024 * 1024)

    return setup


def report_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, extra, **kw):
        argv = ["report", "--no-profile", "--out", kw.pop("out", "{case}/report"), *extra]
        cases.append(Case(name=f"report/{name}", command="report", category=category, argv=argv, **kw))

    def two(ctx: Ctx) -> None:
        copy_fixture(ctx, "gen", "a")
        copy_fixture(ctx, "gen", "b")

    models = ["--model", "a={case}/a", "--model", "b={case}/b"]
    add("model-missing", "bad path", ["--model", "a=/nonexistent/gen"], words=("/nonexistent",))
    add("model-without-name", "bad config value", ["--model", "{fx}/gen"], words=("NAME=",))
    add("model-name-twice", "bad config value", ["--model", "a={fx}/gen", "--model", "a={fx}/gen"], words=("a",))
    add("columns-zero", "bad size/number", [*models, "--columns", "0"], setup=two, words=("columns",))
    add("columns-negative", "bad size/number", [*models, "--columns", "-3"], setup=two, words=("columns",))
    add("steps-zero-latency", "bad size/number", [*models, "--latency", "--steps", "0"], setup=two, words=("steps",))

    def eval_json(text: str):
        def setup(ctx: Ctx) -> None:
            two(ctx)
            (ctx.case / "a" / "evaluation.json").write_text(text)

        return setup

    add("evaluation-not-an-object", "corrupt/odd data", models, setup=eval_json("5"), words=("evaluation",))
    add("evaluation-invalid-json", "corrupt/odd data", models, setup=eval_json("{"), words=("evaluation",))
    add("evaluation-nan", "corrupt/odd data", models, setup=eval_json('{"metrics": {"fid": NaN}}'),
        words=("evaluation",))  # fmt: skip

    def unreadable(ctx: Ctx) -> None:
        two(ctx)
        (ctx.case / "b" / "000002.png").write_text("not an image")

    def grid_check(ctx: Ctx, o: Outcome) -> str | None:
        grid = _read_json(ctx.case / "report" / "report.json").get("grid", [])
        return None if len(grid) == 7 else f"grid holds {len(grid)} prompt(s), expected 7 (one left out)"

    add("unreadable-image-left-out", "corrupt/odd data", [*models, "--columns", "8"], setup=unreadable, expect="ok",
        check=grid_check)  # fmt: skip
    add("manifest-missing", "corrupt/odd data", models,
        setup=lambda c: (two(c), (c.case / "a" / "manifest.jsonl").unlink()), words=("manifest",))  # fmt: skip
    add("out-is-a-file", "bad path", ["--model", "a={fx}/gen"], out="{fx}/prompts.txt", words=("prompts.txt",),
        guard=lambda c: [c.fx / "prompts.txt"])  # fmt: skip
    add("out-in-proc", "environment", ["--model", "a={fx}/gen"], out="/proc/bksdm-report", words=("bksdm-report",))
    add("out-read-only", "environment", ["--model", "a={fx}/gen"], out="{case}/ro/r", needs_mount=True,
        setup=lambda c: c.mount(c.case / "ro", "1m", ro=True), words=("read-only",))  # fmt: skip
    return cases


# --------------------------------------------------------------------------------------------- serve


class Server:
    """One ``bksdm serve`` on the tiny teacher, shared by the HTTP cases."""

    def __init__(self, ctx: Ctx, ignore_sigint: bool = False) -> None:
        argv = ["serve", "--teacher", str(ctx.fx / "teacher"), "--port", "0", "--steps", "1", "--no-warmup",
                "--device", "cpu"]  # fmt: skip
        self.proc = ctx.runner.start(argv, ctx.case / "serve.log", ctx.case, ignore_sigint=ignore_sigint)
        deadline = time.monotonic() + 240
        self.port = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/", self.proc.output())
            if m:
                self.port = int(m.group(1))
                break
            time.sleep(0.1)
        if self.port is None:
            raise RuntimeError(f"bksdm serve did not start: {self.proc.output()[-2000:]}")

    def exchange(self, data: bytes, end: bool = True, timeout: float = 60) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            if end:
                sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)


_SERVER: dict[str, Server] = {}


def shared_server(ctx: Ctx) -> Server:
    server = _SERVER.get("s")
    if server is None or server.proc.poll() is not None:
        home = ctx.case.parent / "_server"
        home.mkdir(parents=True, exist_ok=True)
        server = _SERVER["s"] = Server(Ctx(ctx.fx, home, ctx.runner))
    return server


def post(body: bytes, headers: dict[str, str | None] | None = None, path: str = "/api/generate") -> bytes:
    fields: dict[str, str | None] = {"Host": "127.0.0.1", "Content-Type": "application/json",
                                     "Content-Length": str(len(body))}  # fmt: skip
    fields.update(headers or {})
    lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


def http_case(data: bytes | Callable[[], bytes], statuses: tuple[int, ...], words: tuple[str, ...] = (),
              end: bool = True, forbid: bytes | None = None, timeout: float = 60):  # fmt: skip
    """A driver: send ``data`` to the shared server; the answer's status must be in ``statuses``, its JSON
    ``error`` must hold ``words``; the server must still be running afterwards."""

    def driver(ctx: Ctx, case: Case) -> Outcome:
        server = shared_server(ctx)
        started = time.monotonic()
        payload = data() if callable(data) else data
        try:
            raw = server.exchange(payload, end=end, timeout=timeout)
        except TimeoutError:
            return Outcome(None, server.proc.output()[-3000:], time.monotonic() - started, timed_out=True)
        except OSError as err:
            raw = f"<connection error: {err}>".encode()
        seconds = time.monotonic() - started
        head, _, body = raw.partition(b"\r\n\r\n")
        shown = raw[:600].decode("latin-1")
        server_log = server.proc.output()
        if server.proc.poll() is not None:
            return Outcome(server.proc.status, f"{shown}\n[server died]\n{server_log[-3000:]}", seconds)
        traceback_seen = "Traceback" in server_log[case_log_offsets.get("s", 0) :]
        case_log_offsets["s"] = len(server_log)
        m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        status = int(m.group(1)) if m else -1
        outcome = Outcome(0, shown + ("\n[server log]\n" + server_log[-3000:] if traceback_seen else ""), seconds)
        if traceback_seen:
            outcome.problem, outcome.problem_class = "the server logged a traceback", "traceback"
            return outcome
        if status not in statuses:
            outcome.problem = f"HTTP status {status}, expected {statuses}"
            outcome.problem_class = "unclear error" if 400 <= status < 500 else "silent wrong result"
            if status >= 500:
                outcome.problem_class = "traceback"  # a 500 is the server's traceback, answered
            return outcome
        if forbid and forbid in raw:
            outcome.problem = f"the answer holds {forbid!r}"
            return outcome
        if status >= 400:
            try:
                error = json.loads(body).get("error", "")
            except (ValueError, AttributeError):
                outcome.problem, outcome.problem_class = "the error answer is not a JSON object", "unclear error"
                return outcome
            missing = [w for w in words if w.lower() not in str(error).lower()]
            if missing:
                outcome.problem = f"the error {error!r} lacks {missing}"
                outcome.problem_class = "unclear error"
        else:
            try:
                answer = json.loads(body)
                if not answer["models"][0]["image"].startswith("data:image/png;base64,"):
                    outcome.problem = "200 without an image"
            except (ValueError, KeyError, IndexError, TypeError) as err:
                outcome.problem = f"200 with an unexpected body: {err}"
        return outcome

    return driver


case_log_offsets: dict[str, int] = {}


def serve_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, data, statuses=(400,), words=(), **kw):
        end = kw.pop("end", True)
        forbid = kw.pop("forbid", None)
        timeout = kw.pop("http_timeout", 60)
        cases.append(Case(name=f"serve/{name}", command="serve", category=category,
                          driver=http_case(data, statuses, words, end=end, forbid=forbid, timeout=timeout),
                          expect="http", serial=True, **kw))  # fmt: skip

    J = lambda s: post(s if isinstance(s, bytes) else s.encode())  # noqa: E731
    ok = (200,)
    add("valid-request", "documented", J('{"prompt": "a red circle", "seed": 3}'), statuses=ok)
    add("seed-5000-digits", "malformed HTTP request", J(b'{"prompt": "a circle", "seed": ' + b"9" * 5000 + b"}"),
        words=("seed",))  # fmt: skip
    add("seed-negative-5000-digits", "malformed HTTP request",
        J(b'{"prompt": "a circle", "seed": -' + b"9" * 5000 + b"}"), words=("seed",))  # fmt: skip
    for name, body, word in [
        ("seed-negative", '{"prompt": "a", "seed": -1}', "seed"),
        ("seed-2-to-the-32", '{"prompt": "a", "seed": 4294967296}', "seed"),
        ("seed-1e400", '{"prompt": "a", "seed": 1e400}', "seed"),
        ("seed-float", '{"prompt": "a", "seed": 1.5}', "seed"),
        ("seed-string", '{"prompt": "a", "seed": "seven"}', "seed"),
        ("seed-bool", '{"prompt": "a", "seed": true}', "seed"),
        ("seed-nan", '{"prompt": "a", "seed": NaN}', "NaN"),
        ("seed-infinity", '{"prompt": "a", "seed": -Infinity}', "Infinity"),
        ("prompt-int", '{"prompt": 7}', "prompt"),
        ("prompt-list", '{"prompt": ["a"]}', "prompt"),
        ("prompt-null", '{"prompt": null}', "prompt"),
        ("prompt-empty", '{"prompt": ""}', "prompt"),
        ("prompt-whitespace", '{"prompt": "   "}', "prompt"),
        ("prompt-over-500-characters", json.dumps({"prompt": "a" * 501}), "500"),
        ("prompt-missing", '{"seed": 1}', "prompt"),
        ("lone-surrogate", '{"prompt": "a \\ud800 circle"}', "surrogate"),
        ("lone-low-surrogate", '{"prompt": "\\udfff"}', "surrogate"),
        ("surrogate-key", '{"\\ud800": 1}', "unknown"),
        ("duplicate-key", '{"prompt": "a", "prompt": "b"}', "twice"),
        ("unknown-field", '{"prompt": "a", "steps": 1000000}', "steps"),
        ("not-json", "prompt=a red circle", "JSON"),
        ("trailing-data", '{"prompt": "a"} x', "JSON"),
        ("array", "[]", "object"),
        ("string", '"a circle"', "object"),
        ("number", "42", "object"),
        ("null", "null", "object"),
        ("empty-body", "", "JSON"),
    ]:
        add(name, "malformed HTTP request", J(body), words=(word,))
    add(
        "nul-in-prompt",
        "malformed HTTP request",
        J('{"prompt": "a\\u0000b"}'),
        statuses=(200, 400),
        note="a NUL is a character: drawn or refused, never a 500",
    )
    add("nested-5000-deep-list", "malformed HTTP request", J(b"[" * 5000 + b"]" * 5000), words=("nested",))
    add("nested-2000-deep-object", "malformed HTTP request",
        J(b'{"prompt": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}"), words=("nested",))  # fmt: skip
    add("invalid-utf8", "malformed HTTP request", J(b'{"prompt": "a \xff circle"}'), words=("UTF-8",))
    add("utf16-body", "malformed HTTP request", J('{"prompt": "a"}'.encode("utf-16")), words=("UTF-8",))
    add("bom-body", "malformed HTTP request", J(b'\xef\xbb\xbf{"prompt": "a"}'), words=("JSON",))
    big = b'{"prompt": "' + b"a" * (64 * 1024) + b'"}'
    add("body-64-KiB", "malformed HTTP request", J(big), statuses=(413,), words=("at most",))
    add("content-length-missing", "malformed HTTP request", post(b'{"prompt": "a"}', {"Content-Length": None}),
        statuses=(400, 411), words=("Content-Length",))  # fmt: skip
    add("content-length-negative", "malformed HTTP request", post(b'{"prompt": "a"}', {"Content-Length": "-5"}),
        words=("Content-Length",))  # fmt: skip
    add("content-length-text", "malformed HTTP request", post(b'{"prompt": "a"}', {"Content-Length": "ten"}),
        words=("Content-Length",))  # fmt: skip
    add("content-length-1e12", "malformed HTTP request", post(b'{"prompt": "a"}', {"Content-Length": "10" * 6}),
        statuses=(413,), words=("at most",))  # fmt: skip
    add("content-length-twice", "malformed HTTP request",
        post(b'{"prompt": "a"}').replace(b"Content-Length: 15\r\n", b"Content-Length: 15\r\nContent-Length: 16\r\n"),
        words=("Content-Length",))  # fmt: skip
    add("body-shorter-than-length", "malformed HTTP request", post(b'{"prompt": "a"}', {"Content-Length": "40"}),
        statuses=(400, 408), words=())  # fmt: skip
    add("chunked", "malformed HTTP request",
        post(b'f\r\n{"prompt": "a"}\r\n0\r\n\r\n', {"Content-Length": None, "Transfer-Encoding": "chunked"}),
        statuses=(400, 411, 501), words=())  # fmt: skip
    add("content-type-text", "malformed HTTP request", post(b'{"prompt": "a"}', {"Content-Type": "text/plain"}),
        statuses=(400, 415), words=("Content-Type",))  # fmt: skip
    add("garbage-request-line", "malformed HTTP request", b"HELLO THERE\r\n\r\n", statuses=(400,), words=())
    add("http-2-preface", "malformed HTTP request", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", statuses=(400, 405, 505))
    add("header-70000-bytes", "malformed HTTP request",
        b"GET /api/models HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", statuses=(400, 431))  # fmt: skip
    add("200-headers", "malformed HTTP request",
        b"GET /api/models HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
        statuses=(400, 431))  # fmt: skip
    add("unknown-path", "malformed HTTP request", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", statuses=(403, 404))
    add("path-traversal", "malformed HTTP request", b"GET /../../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        statuses=(400, 403, 404), forbid=b"root:")  # fmt: skip
    add("non-ascii-path", "malformed HTTP request", "GET /\u00e9t\u00e9 HTTP/1.1\r\n\r\n".encode(),
        statuses=(400, 403, 404))  # fmt: skip
    add("put", "malformed HTTP request", b"PUT /api/generate HTTP/1.1\r\nContent-Length: 0\r\n\r\n", statuses=(405,))
    add("delete", "malformed HTTP request", b"DELETE / HTTP/1.1\r\n\r\n", statuses=(405,))
    add("half-sent-headers-wait", "malformed HTTP request", b"POST /api/generate HTTP/1.1\r\nHost: x\r\n",
        statuses=(408,), end=False, http_timeout=60, note="answered 408 within the 15 s request timeout")  # fmt: skip
    add("headers-without-body-wait", "malformed HTTP request", post(b"", {"Content-Length": "30"}), statuses=(408,),
        end=False, http_timeout=60)  # fmt: skip
    add("valid-after-all-that", "documented", J('{"prompt": "a blue square", "seed": 0}'), statuses=ok)

    for name, flags, word in [
        ("port-negative", ["--port", "-1"], "port"),
        ("port-70000", ["--port", "70000"], "port"),
        ("host-unresolvable", ["--host", "no-such-host.invalid"], "no-such-host.invalid"),
        ("steps-zero", ["--steps", "0"], "steps"),
        ("guidance-nan", ["--guidance", "nan"], "guidance"),
        ("device-tpu", ["--device", "tpu"], "tpu"),
        ("dtype-unknown", ["--dtype", "fp8"], "fp8"),
        ("teacher-missing", ["--teacher", "/nonexistent/t"], "/nonexistent"),
        ("student-missing", ["--student", "/nonexistent/s"], "/nonexistent"),
        ("student-not-a-pipeline", ["--student", "{fx}/data"], "data"),
    ]:
        argv = ["serve", "--teacher", "{fx}/teacher", "--port", "0", "--steps", "1", "--no-warmup", *flags]
        cases.append(Case(name=f"serve/{name}", command="serve", category="bad config value", argv=argv,
                          words=(word,), timeout=120))  # fmt: skip
    cases.append(Case(name="serve/port-in-use", command="serve", category="environment", driver=serve_port_in_use,
                      words=("port",), timeout=120, serial=True))  # fmt: skip
    for sig in ("SIGINT", "SIGTERM"):
        cases.append(Case(name=f"serve/half-sent-request-then-{sig}", command="serve", category="signal/kill",
                          driver=serve_stop(sig), expect="ok", serial=True, timeout=300,
                          note="stops within 10 s with exit 0 ('stopped') while clients hold connections"))  # fmt: skip
    cases.append(Case(name="serve/twenty-concurrent-requests", command="serve", category="documented",
                      driver=serve_concurrent, expect="http", serial=True, timeout=600))  # fmt: skip
    return cases


def serve_port_in_use(ctx: Ctx, case: Case) -> Outcome:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        argv = ["serve", "--teacher", str(ctx.fx / "teacher"), "--port", str(port), "--steps", "1", "--no-warmup"]
        return ctx.runner.run(argv, ctx.case / "log", ctx.case, case.timeout)
    finally:
        holder.close()


def serve_stop(sig: str):
    def driver(ctx: Ctx, case: Case) -> Outcome:
        server = Server(ctx, ignore_sigint=True)
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(3)]
        try:
            socks[0].sendall(post(b"", {"Content-Length": "30"}))
            socks[1].sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            time.sleep(0.5)
            started = time.monotonic()
            server.proc.signal(getattr(signal, sig))
            status = server.proc.wait(60)
            seconds = time.monotonic() - started
        finally:
            for s in socks:
                s.close()
        outcome = server.proc.finish(1) if status is not None else server.proc.finish(0)
        outcome.seconds = seconds
        if status is not None and seconds > 10:
            outcome.problem, outcome.problem_class = f"took {seconds:.1f} s to stop after {sig}", "hang"
        elif status == 0 and "stopped" not in outcome.output:
            outcome.problem = "exit 0 without 'stopped'"
        outcome.output += f"\n[stopped {seconds:.2f} s after {sig}]"
        return outcome

    return driver


def serve_concurrent(ctx: Ctx, case: Case) -> Outcome:
    server = shared_server(ctx)
    started = time.monotonic()
    answers: list[bytes] = [b""] * 20

    def one(i: int) -> None:
        body = json.dumps({"prompt": "a red circle", "seed": i % 2}).encode()
        try:
            answers[i] = server.exchange(post(body), end=False, timeout=500)  # a browser does not half-close
        except OSError as err:
            answers[i] = f"error {err}".encode()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    images: dict[int, set[str]] = {0: set(), 1: set()}
    problems = []
    for i, raw in enumerate(answers):
        head, _, body = raw.partition(b"\r\n\r\n")
        if not raw.startswith(b"HTTP/1.0 200") and not raw.startswith(b"HTTP/1.1 200"):
            problems.append(f"request {i}: {raw[:120]!r}")
            continue
        images[i % 2].add(json.loads(body)["models"][0]["image"])
    if not problems and (len(images[0]) != 1 or len(images[1]) != 1):
        problems.append("the same seed gave different images")
    outcome = Outcome(0, "\n".join(problems) or "20 answers, 2 distinct images", time.monotonic() - started)
    if problems:
        outcome.problem = problems[0]
    return outcome


# --------------------------------------------------------------------------------------------- dreambooth & co


def dreambooth_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, extra, instance="{fx}/subject", out="{case}/db", **kw):
        argv = ["dreambooth", *DB, "--instance-dir", instance, "--out", out, *extra]
        cases.append(Case(name=f"dreambooth/{name}", command="dreambooth", category=category, argv=argv, **kw))

    for name, flags, word in [
        ("steps-zero", ["--steps", "0"], "steps"),
        ("steps-negative", ["--steps", "-1"], "steps"),
        ("lr-nan", ["--lr", "nan"], "lr"),
        ("lr-negative", ["--lr", "-1"], "lr"),
        ("rank-zero", ["--rank", "0"], "rank"),
        ("batch-size-zero", ["--batch-size", "0"], "batch"),
        ("resolution-not-multiple-of-8", ["--resolution", "100"], "resolution"),
        ("resolution-zero", ["--resolution", "0"], "resolution"),
        ("resolution-100000", ["--resolution", "100000"], "resolution"),
        ("num-class-images-negative", ["--class-prompt", "a circle", "--num-class-images", "-1"], "class"),
        ("prior-loss-weight-nan", ["--class-prompt", "a circle", "--prior-loss-weight", "nan"], "prior"),
        ("accumulation-zero", ["--gradient-accumulation-steps", "0"], "accumulation"),
        ("checkpoint-every-negative", ["--checkpoint-every", "-1"], "checkpoint"),
        ("lr-scheduler-unknown", ["--lr-scheduler", "bogus"], "bogus"),
        ("guidance-nan", ["--guidance-scale", "nan"], "guidance"),
        ("mixed-precision-unknown", ["--mixed-precision", "fp8"], "mixed-precision"),
        ("instance-prompt-empty", ["--instance-prompt", ""], "prompt"),
        ("model-missing", ["--model", "/nonexistent/m"], "/nonexistent"),
        ("class-dir-is-a-file", ["--class-prompt", "a circle", "--class-dir", "{fx}/prompts.txt"], "prompts.txt"),
    ]:
        add(name, "bad size/number" if word in ("steps", "rank", "batch", "resolution") else "bad config value",
            flags, words=(word,))  # fmt: skip
    add(
        "resume-latest-nothing",
        "documented",
        ["--resume", "latest"],
        expect="ok",
        check=lambda c, o: None if (c.case / "db" / "pytorch_lora_weights.safetensors").is_file() else "no weights",
        note="as distill: 'latest' with no checkpoint starts afresh",
    )
    add("instance-dir-missing", "bad path", [], instance="{case}/none", words=("none",))
    add("instance-dir-empty", "bad path", [], instance="{case}/empty", setup=lambda c: (c.case / "empty").mkdir(),
        words=("empty",))  # fmt: skip
    for kind in ("corrupt", "truncated", "zero-byte", "symlink-loop", "bomb"):

        def one_bad(ctx: Ctx, kind=kind) -> None:
            d = copy_fixture(ctx, "subject")
            BAD_IMAGES[kind](d / "2.png", (d / "2.png").read_bytes())

        add(f"instance-image-{kind}", "corrupt/odd data", [], instance="{case}/subject", setup=one_bad,
            words=("2.png",), check=lambda c, o: "files were written" if (c.case / "db").exists() else None,
            note="documented: every image is checked before the model loads; an unreadable one is named, "
            "nothing written")  # fmt: skip
    add("out-is-a-file", "bad path", [], out="{fx}/prompts.txt", words=("prompts.txt",),
        guard=lambda c: [c.fx / "prompts.txt"])  # fmt: skip
    add("out-read-only", "environment", [], out="{case}/ro/db", needs_mount=True, words=("read-only",),
        setup=lambda c: c.mount(c.case / "ro", "1m", ro=True))  # fmt: skip
    add("out-full-disk", "environment", [], out="{case}/disk/db", needs_mount=True, words=("space",), statuses=(1,),
        setup=lambda c: c.mount(c.case / "disk", "64k"))  # fmt: skip

    def lora_ok(ctx: Ctx, o: Outcome) -> str | None:
        return None if (ctx.case / "db" / "pytorch_lora_weights.safetensors").is_file() else "no LoRA weights"

    add("lora-run", "documented", [], expect="ok", check=lora_ok, timeout=400)

    def prior_run(ctx: Ctx) -> None:
        ctx.runner.run(ctx.fmt(["dreambooth", *DB, "--instance-dir", "{fx}/subject", "--out", "{case}/db"]),
                       ctx.case / "prior.log", ctx.case, 400)  # fmt: skip

    add("out-of-another-run", "data safety", ["--steps", "3", "--rank", "8"], setup=prior_run,
        words=("--resume",), guard=lambda c: [c.case / "db" / "checkpoints"], timeout=400)  # fmt: skip

    def crafted(ctx: Ctx) -> None:
        prior_run(ctx)
        for ck in (ctx.case / "db" / "checkpoints").glob("checkpoint-*"):
            for f in [p for p in ck.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]:
                f.write_bytes(exploit(ctx.marker))
            (ck / "custom_checkpoint_0.pkl").write_bytes(exploit(ctx.marker))

    add("resume-crafted-pickles", "crafted pickle", ["--resume", "latest", "--steps", "3"], setup=crafted,
        words=("checkpoint",), marker=True, timeout=400)  # fmt: skip
    return cases


def other_cases() -> list[Case]:
    cases: list[Case] = []

    def add(command, name, category, argv, **kw):
        cases.append(Case(name=f"{command}/{name}", command=command, category=category, argv=argv, **kw))

    p = ["prune", "--teacher", "{fx}/teacher", "--plan", "bk-tiny"]
    add("prune", "plan-unknown", "bad config value", [*p[:3], "--plan", "bk-huge", "--out", "{case}/s"],
        words=("bk-huge",))  # fmt: skip
    add("prune", "plan-yaml-broken", "bad config value", [*p[:3], "--plan", "{case}/p.yaml", "--out", "{case}/s"],
        setup=lambda c: (c.case / "p.yaml").write_text("remove: [1, \n"), words=("p.yaml",))  # fmt: skip
    add("prune", "teacher-missing", "bad path", ["prune", "--teacher", "/nonexistent/t", "--out", "{case}/s"],
        words=("/nonexistent",))  # fmt: skip
    add("prune", "save-dtype-unknown", "bad config value", [*p, "--save-dtype", "fp8", "--out", "{case}/s"],
        words=("fp8",))  # fmt: skip
    add("prune", "out-not-empty", "data safety", [*p, "--out", "{case}/s"],
        setup=lambda c: copy_fixture(c, "student", "s"), words=("--overwrite",),
        guard=lambda c: [c.case / "s"])  # fmt: skip
    add("prune", "out-read-only", "environment", [*p, "--out", "{case}/ro/s"], needs_mount=True,
        setup=lambda c: c.mount(c.case / "ro", "1m", ro=True), words=("read-only",))  # fmt: skip
    add("prune", "out-full-disk", "environment", [*p, "--out", "{case}/disk/s"], needs_mount=True, statuses=(1,),
        setup=lambda c: c.mount(c.case / "disk", "256k"), words=("space",),
        check=lambda c, o: "a student folder exists" if (c.case / "disk" / "s").exists() else None)  # fmt: skip
    add("prune", "out-in-proc", "environment", [*p, "--out", "/proc/bksdm-prune"], words=("bksdm-prune",))
    pr = ["profile", "{fx}/teacher", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--steps", "1"]
    for name, flags, word in [
        ("resolution-negative", ["--resolution", "-64"], "resolution"),
        ("resolution-zero", ["--resolution", "0"], "resolution"),
        ("resolution-100000", ["--resolution", "100000"], "resolution"),
        ("steps-zero", ["--steps", "0"], "steps"),
        ("repeats-zero", ["--repeats", "0"], "repeats"),
        ("device-tpu", ["--device", "tpu"], "tpu"),
        ("plan-unknown", ["--plan", "bk-huge"], "bk-huge"),
    ]:
        add("profile", name, "bad size/number", [*pr, *flags], words=(word,))
    add("profile", "arch-unknown", "bad config value", ["profile", "--arch", "sd-v9", "--no-latency"], words=("sd-v9",))
    ex = ["export", "onnx", "--model", "{fx}/student"]
    add("export", "out-in-proc", "environment", [*ex, "--out", "/proc/bksdm-onnx"], words=("bksdm-onnx",))
    add("export", "model-missing", "bad path", ["export", "onnx", "--model", "/nonexistent/m", "--out", "{case}/o"],
        words=("/nonexistent",))  # fmt: skip
    return cases


def all_cases() -> list[Case]:
    cases = [
        *distill_cases(),
        *cache_cases(),
        *generate_cases(),
        *img2img_cases(),
        *evaluate_cases(),
        *serve_cases(),
        *dreambooth_cases(),
        *other_cases(),
    ]
    names = Counter(c.name for c in cases)
    dupes = [n for n, k in names.items() if k > 1]
    assert not dupes, dupes
    return cases


# --------------------------------------------------------------------------------------------- classify & run


def error_message(output: str, prefix: str) -> str | None:
    """The last ``bksdm CMD: error: ...`` message (after any progress bar on its line), with the indented lines
    that continue it (a config error lists its problems one per line)."""
    lines = output.replace("\r", "\n").splitlines()
    found = None
    for i, line in enumerate(lines):
        if prefix in line:
            text = [line[line.index(prefix) :]]
            text += [x for x in _continuation(lines[i + 1 :])]
            found = "\n".join(text)
    return found


def _continuation(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if not line.startswith((" ", "\t")) or not line.strip():
            break
        out.append(line)
    return out


def classify(case: Case, ctx: Ctx, o: Outcome, before: dict[str, str]) -> tuple[str, str]:
    """(class, detail) of one outcome."""
    if case.marker and ctx.marker.exists():
        return "code ran", f"{ctx.marker} was created: a crafted pickle ran"
    if before:
        after = hash_tree([Path(p) for p in before if Path(p).exists()]) if before else {}
        lost = [p for p in before if after.get(p) != before[p]]
        if lost:
            return "data loss", f"{len(lost)} file(s) changed or removed, e.g. {lost[0]}"
    if o.problem_class in ("skipped", "documented behaviour"):
        return o.problem_class, o.problem or ""
    if o.timed_out:
        return "hang", f"no exit within {case.timeout:.0f} s"
    if "Traceback" in o.output:
        return "traceback", "a Python traceback in the output"
    if o.problem_class and o.problem:
        return o.problem_class, o.problem
    if o.status is not None and o.status < 0:
        return "killed", f"killed by signal {-o.status}"
    if case.expect == "http":
        return ("silent wrong result", o.problem) if o.problem else ("documented behaviour" if case.category ==
                "documented" else "clear error", "")  # fmt: skip
    if case.expect == "ok":
        if o.status != 0:
            return "refused", f"exit {o.status} where success is documented"
        problem = o.problem or (case.check(ctx, o) if case.check else None)
        return ("silent wrong result", problem) if problem else ("documented behaviour", "")
    # expect error
    if o.status == 0:
        return "silent wrong result", "exit 0 where an error was expected"
    prefix = case.line_prefix()
    message = error_message(o.output, prefix)
    if o.status not in case.statuses:
        return "unclear error", f"exit {o.status}, expected {case.statuses}"
    if message is None:
        return "unclear error", f"no line holding {prefix!r}"
    missing = [w for w in case.words if w.lower() not in message.lower()]
    if missing:
        return "unclear error", f"the message lacks {missing}"
    if o.problem:
        return "silent wrong result", o.problem
    if case.check:
        problem = case.check(ctx, o)
        if problem:
            return "silent wrong result", problem
    return "clear error", ""


def run_case(case: Case, fx: Path, work: Path, runner: Runner, can_mount: bool) -> dict:
    ctx = Ctx(fx, work / "cases" / case.name.replace("/", "__"), runner)
    if ctx.case.exists():
        _unmount_under(ctx.case)
        shutil.rmtree(ctx.case)
    ctx.case.mkdir(parents=True)
    record = {"name": case.name, "command": case.command, "category": case.category, "expect": case.expect,
              "argv": ctx.fmt(case.argv), "note": case.note}  # fmt: skip
    if case.needs_mount and not can_mount:
        record.update(cls="skipped", detail="needs root to mount a tmpfs", status=None, seconds=0.0, tail="")
        return record
    try:
        if case.setup:
            case.setup(ctx)
        before = hash_tree(case.guard(ctx)) if case.guard else {}
        if case.driver:
            outcome = case.driver(ctx, case)
        else:
            env = case.env or ({"BKSDM_SWEEP": "spawn"} if case.spawn else None)  # an env forces a spawn
            outcome = runner.run(ctx.fmt(case.argv), ctx.case / "output.log", ctx.case, case.timeout, env)
        cls, detail = classify(case, ctx, outcome, before)
    except Exception:  # noqa: BLE001 (a bug of the sweep, not of bksdm: reported as such)
        outcome = Outcome(None, traceback.format_exc(), 0.0)
        cls, detail = "skipped", "the sweep itself failed on this case (see tail)"
    finally:
        ctx.unmount_all()
    tail = "\n".join(outcome.output.rstrip().splitlines()[-12:])
    record.update(cls=cls, detail=detail, status=outcome.status, seconds=round(outcome.seconds, 2), tail=tail)
    return record


def _unmount_under(folder: Path) -> None:
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    for p in sorted(points, key=len, reverse=True):
        if p.startswith(str(folder)):
            subprocess.run(["umount", "-l", p], check=False)


def _can_mount(work: Path) -> bool:
    probe = work / ".mount-probe"
    probe.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(probe)], check=False)
        return True
    return False


def print_table(records: list[dict]) -> None:
    commands = sorted({r["command"] for r in records})
    shown = [c for c in CLASSES if any(r["cls"] == c for r in records)]
    width = max(len(c) for c in commands + ["command"]) + 2
    head = "command".ljust(width) + "".join(f"{c[:14]:>16}" for c in shown) + f"{'total':>8}"
    print(head)
    print("-" * len(head))
    for cmd in [*commands, "all"]:
        rows = [r for r in records if cmd in ("all", r["command"])]
        counts = Counter(r["cls"] for r in rows)
        print(cmd.ljust(width) + "".join(f"{counts.get(c, 0):>16}" for c in shown) + f"{len(rows):>8}")
    failing = [r for r in records if r["cls"] not in PASS]
    if failing:
        print(f"\n{len(failing)} case(s) not passing:")
        for r in failing:
            print(f"\n[{r['cls']}] {r['name']} ({r['category']}): {r['detail']}")
            print("    " + " ".join(r["argv"])[:400])
            for line in r["tail"].splitlines()[-6:]:
                print(f"    | {line[:300]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="regex: run the cases whose name matches")
    parser.add_argument("--jobs", type=int, default=1, help="cases at a time (default 1; serial cases run alone)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--work", default="/tmp/bksdm-fault-sweep", help="work folder (fixtures and case folders)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the fixtures even if present")
    parser.add_argument("--spawn", action="store_true", help="a fresh `python -m bksdm.cli` per case")
    parser.add_argument("--mem-limit-gb", type=float, default=10.0, help="address-space limit per command (10)")
    parser.add_argument("--out", default=str(RESULTS), help=f"JSON results (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--merge", action="store_true", help="update the cases run in an existing --out JSON")
    parser.add_argument("--build-fixtures", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_fixtures:
        build_fixtures(Path(args.build_fixtures))
        return 0
    cases = all_cases()
    if args.only:
        pattern = re.compile(args.only)
        cases = [c for c in cases if pattern.search(c.name)]
    if args.list:
        for c in cases:
            print(f"{c.name:<60} {c.category:<24} expect {c.expect}")
        print(f"{len(cases)} cases")
        return 0
    work = Path(args.work)
    fx = work / "fixtures"
    if args.rebuild or not (fx / "COMPLETE").is_file():
        if fx.exists():
            shutil.rmtree(fx)
        started = time.monotonic()
        print(f"building fixtures in {fx} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--build-fixtures", str(fx)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        print(f"fixtures built in {time.monotonic() - started:.0f} s", flush=True)
    can_mount = _can_mount(work)
    runner = Runner(spawn=args.spawn, mem_gb=args.mem_limit_gb)
    records: list[dict] = []
    started = time.monotonic()
    lock = threading.Lock()

    def one(case: Case) -> None:
        record = run_case(case, fx, work, runner, can_mount)
        with lock:
            records.append(record)
            mark = "ok  " if record["cls"] in PASS else "FAIL"
            print(f"{mark} {len(records):>3}/{len(cases)} {case.name:<58} {record['cls']:<20} "
                  f"{record['seconds']:>6.1f} s {record['detail'][:90]}", flush=True)  # fmt: skip

    try:
        parallel = [c for c in cases if not c.serial]
        serial = [c for c in cases if c.serial]
        if args.jobs > 1:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one, parallel))
        else:
            for c in parallel:
                one(c)
        for c in serial:
            one(c)
    finally:
        server = _SERVER.pop("s", None)
        if server:
            server.proc.signal(signal.SIGTERM)
            server.proc.finish(60)
        _unmount_under(work)
    order = {c.name: i for i, c in enumerate(cases)}
    records.sort(key=lambda r: order[r["name"]])
    print()
    print_table(records)
    out = Path(args.out)
    previous = []
    if args.merge and out.is_file():
        previous = [r for r in json.loads(out.read_text())["cases"] if r["name"] not in order]
    merged = sorted(previous + records, key=lambda r: r["name"])
    import platform

    summary = {
        "counts": dict(Counter(r["cls"] for r in merged)),
        "per_command": {
            cmd: dict(Counter(r["cls"] for r in merged if r["command"] == cmd))
            for cmd in sorted({r["command"] for r in merged})
        },  # fmt: skip
        "cases_total": len(merged),
        "passing": sum(r["cls"] in PASS for r in merged),
        "seconds": round(time.monotonic() - started, 1),
        "mode": "spawn" if args.spawn else "fork",
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "cases": merged}, indent=1) + "\n")
    print(f"\n{summary['passing']}/{len(merged)} passing; written to {out}")
    return 0 if all(r["cls"] in PASS for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
