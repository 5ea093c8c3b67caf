"""Test data that tests of several stages build, and benchmarks/fault_sweep.py too (importable from every folder
under tests/: pytest puts this folder on sys.path for its conftest.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def shapes_folder(folder: Path, count: int, seed: int = 3, listed: int | None = None) -> list[str]:
    """``count`` shapes-world images with a manifest listing the first ``listed`` of them (all by default)."""
    from bksdm.world.shapes import pairs

    folder.mkdir(parents=True, exist_ok=True)
    lines, prompts = [], []
    for i, (image, scene) in enumerate(pairs(seed, count)):
        image.save(folder / f"{i:06d}.png")
        prompts.append(scene.caption)
        lines.append(json.dumps({"index": i, "prompt": scene.caption, "seed": i, "file": f"{i:06d}.png"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines[:listed]) + "\n")
    return prompts


COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def make_shapes(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """A folder of coloured circles and squares with captions and a metadata.csv, as LAION subsets ship."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, shape = list(COLORS)[rng.integers(4)], ["circle", "square"][rng.integers(2)]
        image = Image.new("RGB", (150, 130), "white")
        x, y = int(rng.integers(5, 80)), int(rng.integers(5, 60))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)([x, y, x + 60, y + 60], fill=COLORS[color])
        image.save(folder / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", f"a {color} {shape}"))
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    return folder


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    """``python -m bksdm.cli ARGS`` in its own process (one OpenMP thread, output unbuffered and merged)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "bksdm.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def run_two_processes(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``bksdm ARGS`` as two CPU processes under ``accelerate launch`` (one OpenMP thread each), run to the end."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bksdm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=timeout)


def kill_at_checkpoint(args: list[str], out: Path, step: int = 4) -> None:
    """Runs a training command and SIGKILLs it as soon as its checkpoint of ``step`` is complete (a crash)."""
    victim = run_cli(args)
    marker = out / "checkpoints" / f"checkpoint-{step:07d}" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"


def sigterm_after_first_log(args: list[str], out: Path, stop_timeout: float = 120) -> tuple[int, str]:
    """Runs a training command, sends SIGTERM once its first metrics line is written; returns (exit status, output)."""
    victim = run_cli(args)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGTERM)
    log = victim.communicate(timeout=stop_timeout)[0]
    return victim.returncode, log
