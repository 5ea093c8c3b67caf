"""Real-scale check: every ``bksdm`` command on an SD-v1.4-sized (or SDXL-sized) pipeline, time and memory each.

Usage (from the repository root, with bksdm installed; offline)::

    python benchmarks/real_scale.py --arch tiny                      # tiny pipelines, about 4 minutes: debug
    python benchmarks/real_scale.py --arch sd-v1.4                   # 256 px on the CPU, about an hour
    python benchmarks/real_scale.py --arch sd-v1.4 --only prune generate --workdir /tmp/rs --keep
    python benchmarks/real_scale.py --arch sdxl                      # build, profile, generate, prune
    python benchmarks/real_scale.py --arch sd-v1.4 --resolution 512  # on a GPU (benchmarks/gpu_checks.sh)

What it does:

1. builds the pipeline with random weights from the published configs (``bksdm.plan.archs``), one component at a
   time on the target device, and saves it as a stock diffusers folder in safetensors (the tokenizer is
   ``bksdm.world.tiny``'s byte-level CLIP tokenizer: real CLIP's vocabulary cannot be fetched offline; it pads
   and truncates to 77 tokens like CLIP's); also random weights of the full-width FID Inception-v3 and of a
   CLIP ViT-L/14-sized Hugging Face CLIP for ``evaluate`` (the published weights cannot be downloaded
   offline), the teacher's ControlNet (``ControlNetModel.from_unet`` of its U-Net; SD-v1 layouts only) for
   ``adapt controlnet``, a 16-image data folder (``metadata.csv``, as ``data.train`` reads it), a subject
   folder, 8 images with control images (``conditioning_image``) for the ControlNet's KD, and a prompt file;
2. runs each command as a user would: ``bksdm ...`` in its own subprocess (its own process group), at small
   counts (see ``steps()``), in groups (``--only``): build prune profile generate img2img evaluate report
   export serve cache distill resume dreambooth, ``lcm`` (bk-small as its own teacher, 2 steps: the full LCM
   pipeline and the LCM-LoRA) and ``adapt`` (a 2-step DreamBooth LoRA of the teacher carried onto bk-small by
   ``adapt lora``; the teacher's ControlNet pruned for bk-small by ``adapt controlnet``, and pruned then
   distilled for 2 steps); ``--only`` adds the command that writes a missing input (build, a prune, ...);
3. per command records exit status, wall time, the peak memory of the child's process tree (the sum of the
   proportional set sizes of every process in the tree, sampled every 0.5 s from ``/proc/PID/smaps_rollup``,
   so data-loader workers forked from the trainer do not count its pages twice), the kernel's peak RSS of
   the largest process in the tree (``os.wait4``'s ``ru_maxrss``: exact, catches a spike between samples),
   the GPU memory in use on the device (``nvidia-smi``, above the value before the command) where there is
   one, the disk size of what it wrote, and the last lines of stderr when it failed;
4. compares ``max(peak PSS of the tree, peak RSS of one process)`` with the command's ceiling, and stops the
   command (SIGKILL to its process group) the moment the sampled figure passes the ceiling, or when the
   machine's ``MemAvailable`` falls under 1 GiB, rather than letting the kernel's OOM killer pick a victim
   on a machine others share. Before each command it waits until ``MemAvailable`` is at least the ceiling
   plus 2 GiB (``--wait-limit`` seconds at most; then the command is recorded as skipped).

Prints a table and writes JSON (``--out``; default ``benchmarks/results/real_scale_<arch>_<res>px.json``)
with the host (CPU model, flags: AVX-512 BF16 / AMX or not, cores, memory), library versions, thread
settings, the git commit, and per command the load average before and after it: the CPU may be shared, so
times are indicative. ``--update`` merges the rows into an existing JSON (rows of the same name replaced), so
commands run at different times (``--only``) end in one table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from real_scale_steps import (
    Step,
    adapt_steps,
    add_prerequisites,
    lcm_steps,
    remove_unneeded,
    row_order,
    save_teacher_controlnet,
    write_control_data,
)

GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]
SAMPLE_EVERY_S = 0.5
LOW_MEMORY_KILL_GIB = 1.0  # stop a command when the machine's MemAvailable falls under this
STOP_LIMIT_S = 120.0  # serve: seconds from SIGINT to exit before it is killed
WAIT_MARGIN_GIB = 2.0  # start a command only when MemAvailable >= its ceiling + this
ARCH_NAMES = {"sd-v1.4": "sd-v1.4", "sdxl": "sdxl-base", "tiny": "tiny", "tiny-sdxl": "tiny-sdxl"}
PROMPTS = ["a photo of a red vase on a wooden table", "a watercolor painting of a harbour at dusk"]
COLORS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 210), "yellow": (230, 210, 40)}


# --------------------------------------------------------------------------------------- measurement


def _meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def mem_available_gib() -> float:
    """The kernel's estimate of memory available for new work (``MemAvailable``), in GiB."""
    return _meminfo_gib("MemAvailable")


def memory_to_wait_for(ceiling_gib: float) -> float:
    """MemAvailable to wait for before a command: its ceiling + :data:`WAIT_MARGIN_GIB`, at most the machine's memory
    less :data:`LOW_MEMORY_KILL_GIB` (SDXL's prune, ceiling 21 GiB, on a 23.5 GiB machine: the kill guard still
    stops it before the kernel's OOM killer would)."""
    return min(ceiling_gib + WAIT_MARGIN_GIB, _meminfo_gib("MemTotal") - LOW_MEMORY_KILL_GIB)


def _children_of() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name field may hold spaces and parentheses
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(root: int) -> list[int]:
    tree, pids, todo = _children_of(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    return pids


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over ``root`` and its descendants; processes gone meanwhile count 0."""
    pss = rss = 0
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return pss, rss


def gpu_memory_used() -> int | None:
    """Bytes in use on GPU 0 as nvidia-smi reports them, or None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return int(out.strip().splitlines()[0]) * 1024**2
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class Monitor(threading.Thread):
    """Samples a process tree's memory until stopped; kills the tree's process group past the ceiling."""

    def __init__(self, pid: int, ceiling: float, gpu: bool):
        super().__init__(daemon=True)
        self.pid, self.ceiling, self.gpu = pid, ceiling, gpu
        self.peak_pss = self.peak_rss = 0
        self.peak_gpu: int | None = None
        self.min_available = float("inf")
        self.killed_for: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        last_gpu = 0.0
        while not self.stop.is_set():
            pss, rss = tree_memory(self.pid)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            available = mem_available_gib()
            self.min_available = min(self.min_available, available)
            if self.gpu and time.monotonic() - last_gpu >= 1.0:
                last_gpu = time.monotonic()
                used = gpu_memory_used()
                if used is not None:
                    self.peak_gpu = max(self.peak_gpu or 0, used)
            if self.killed_for is None:
                if pss > self.ceiling * GIB:
                    self.killed_for = f"stopped: {pss / GIB:.1f} GiB passed the {self.ceiling:g} GiB ceiling"
                elif available < LOW_MEMORY_KILL_GIB:
                    self.killed_for = f"stopped: the machine's MemAvailable fell to {available:.2f} GiB"
                if self.killed_for is not None:
                    _kill_group(self.pid)
            self.stop.wait(SAMPLE_EVERY_S)


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def disk_usage(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            for root, _, files in os.walk(path):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(root, name)).st_size
    return total


# ------------------------------------------------------------------------------------------ host


def host_info() -> dict[str, Any]:
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines():
            key, _, value = line.partition(":")
            cpu[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(cpu.get("flags", "").split())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next((int(x.split()[1]) * 1024 for x in meminfo if x.startswith("MemTotal:")), 0)

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "cpu_model": cpu.get("model name", platform.processor() or platform.machine()),
        "cpu_flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        | {"torch_default": "torch.get_num_threads() in each child: the usable cores unless OMP_NUM_THREADS"},
        "memory_total_gib": round(total / GIB, 2),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "versions": {
            p: version(p) for p in ("torch", "diffusers", "transformers", "accelerate", "peft", "onnxruntime")
        },
        "bksdm_commit": git("rev-parse", "HEAD"),
        "bksdm_recent_commits": git("log", "--oneline", "-8").splitlines(),
        # The commands run the working tree's src/, which may hold uncommitted edits: name them.
        "bksdm_uncommitted": [x for x in git("status", "--short", "--", "src").splitlines() if x],
    }


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------ steps


@dataclass
class Row:
    name: str
    status: str  # ok | fail | over ceiling | stopped (machine low on memory) | skipped | timeout
    exit_status: int | None
    wall_s: float | None
    peak_tree_pss_gib: float | None
    peak_process_rss_gib: float | None
    peak_gib: float | None  # max of the two above: what the ceiling is compared with
    ceiling_gib: float
    within_ceiling: bool | None
    gpu_peak_gib: float | None
    disk_gib: float | None
    min_mem_available_gib: float | None
    disk_free_after_gib: float | None
    load_average_before: list[float]
    load_average_after: list[float]
    command: str
    note: str = ""
    stderr_tail: list[str] = field(default_factory=list)
    finished_at: str = ""


def bksdm_program() -> list[str]:
    script = Path(sys.executable).parent / "bksdm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bksdm.cli"]


def run_step(step: Step, logs: Path, wait_limit: float) -> Row:
    program = [sys.executable] if step.python else bksdm_program()
    command = [*program, *step.argv]
    shown = " ".join(["python" if step.python else "bksdm", *map(str, step.argv)])
    base = dict(
        name=step.name, ceiling_gib=step.ceiling_gib, command=shown, load_average_before=load_average(),
        exit_status=None, wall_s=None, peak_tree_pss_gib=None, peak_process_rss_gib=None, peak_gib=None,
        within_ceiling=None, gpu_peak_gib=None, disk_gib=None, min_mem_available_gib=None,
        disk_free_after_gib=None,
    )  # fmt: skip
    missing = [str(p) for p in step.needs if not p.exists()]
    if missing:
        return Row(status="skipped", note=f"needs {', '.join(missing)}", load_average_after=load_average(), **base)
    waited, needed = 0.0, memory_to_wait_for(step.ceiling_gib)
    while mem_available_gib() < needed:
        if waited >= wait_limit:
            note = f"skipped: MemAvailable {mem_available_gib():.1f} GiB < {needed:.1f} GiB for {waited:.0f} s"
            return Row(status="skipped", note=note, load_average_after=load_average(), **base)
        if waited == 0:
            print(f"  waiting for {needed:.1f} GiB of MemAvailable (now {mem_available_gib():.1f})", flush=True)
        time.sleep(10)
        waited += 10
    if not step.keep_outputs:
        for path in step.outputs:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_log, err_log = logs / f"{_slug(step.name)}.out", logs / f"{_slug(step.name)}.err"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpu_before = gpu_memory_used()
    start = time.monotonic()
    with out_log.open("w") as out, err_log.open("w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
    monitor = Monitor(proc.pid, step.ceiling_gib, gpu=gpu_before is not None)
    monitor.start()
    timer = threading.Timer(step.timeout_s, _kill_group, (proc.pid,))
    timer.start()
    note, stop_timer, stop_sent = "", None, 0.0
    if step.interact is not None:
        try:
            note = step.interact(proc, out_log)
        except Exception as err:  # a failed exchange is a finding: record it, stop the server
            note = f"interaction failed: {err}"
            _kill_group(proc.pid, signal.SIGINT)
        stop_sent = time.monotonic()
        stop_timer = threading.Timer(STOP_LIMIT_S, _kill_group, (proc.pid,))
        stop_timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    wall = time.monotonic() - start
    if stop_timer is not None:
        stop_timer.cancel()
        waited = time.monotonic() - stop_sent
        stopped = (
            f"stopped {waited:.1f} s after SIGINT"
            if waited < STOP_LIMIT_S
            else "killed: still running 120 s after SIGINT"
        )
        note = f"{note}; {stopped}"
    proc.returncode = os.waitstatus_to_exitcode(status)
    _kill_group(proc.pid)  # whatever the command left running in its group (none expected)
    monitor.stop.set()
    monitor.join()
    code = proc.returncode
    rss = usage.ru_maxrss * 1024 / GIB  # kilobytes on Linux
    pss = monitor.peak_pss / GIB
    peak = max(rss, pss)
    if monitor.killed_for:
        state = "over ceiling" if "ceiling" in monitor.killed_for else "stopped (machine low on memory)"
        note = monitor.killed_for + (f"; {note}" if note else "")
    elif wall >= step.timeout_s:
        state = "timeout"
    elif code != 0:
        state = "fail"
    else:
        state = "ok" if peak <= step.ceiling_gib else "over ceiling"
    if state == "ok" and step.check is not None:
        try:
            checked = step.check()
            note = "; ".join(x for x in (note, checked) if x)
        except Exception as err:
            state, note = "fail", f"wrong result: {err}"
    if state == "ok" and note.startswith("interaction failed"):
        state = "fail"
    lines = [line for line in err_log.read_text(errors="replace").splitlines() if line.strip()]
    tail = lines[-15:] if state != "ok" else []
    if state == "fail" and not note:
        note = _error_line(lines)
    gpu = None
    if monitor.peak_gpu is not None and gpu_before is not None:
        gpu = round((monitor.peak_gpu - gpu_before) / GIB, 2)
    return Row(
        **base
        | dict(
            exit_status=code,
            wall_s=round(wall, 1),
            peak_tree_pss_gib=round(pss, 2),
            peak_process_rss_gib=round(rss, 2),
            peak_gib=round(peak, 2),
            within_ceiling=peak <= step.ceiling_gib,
            gpu_peak_gib=gpu,
            disk_gib=round(disk_usage(step.outputs) / GIB, 2),
            min_mem_available_gib=round(monitor.min_available, 2),
            disk_free_after_gib=round(shutil.disk_usage(logs).free / GIB, 1),
        ),  # fmt: skip
        status=state,
        note=note,
        stderr_tail=tail,
        load_average_after=load_average(),
        finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _error_line(lines: list[str]) -> str:
    """The last line of stderr that names an error (an exception or `bksdm CMD: error: ...`), else the last line."""
    for line in reversed(lines):
        if re.match(r"^\s*([\w.]+(Error|Exception|Exit)\b|bksdm .*error:)", line):
            return line.strip()
    return lines[-1].strip() if lines else ""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# --------------------------------------------------------------------------------- serve exchange


def serve_one_request(proc: subprocess.Popen, out_log: Path, timeout: float = 3600.0) -> str:
    """Wait for `bksdm serve` to print its URL, POST one /api/generate, stop it with SIGINT (Ctrl-C)."""
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        match = re.search(r"serving .* at (http://\S+?)/? ", out_log.read_text(errors="replace"))
        if match:
            url = match.group(1).rstrip("/")
        elif proc.poll() is not None:
            raise RuntimeError(f"serve exited with status {proc.returncode} before serving")
        elif time.monotonic() > deadline:
            raise RuntimeError("serve printed no URL in time")
        else:
            time.sleep(1)
    body = json.dumps({"prompt": PROMPTS[0], "seed": 7}).encode()
    request = urllib.request.Request(
        url + "/api/generate", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    seconds = time.monotonic() - started
    models = answer.get("models", [])
    if not models or not all(str(m.get("image", "")).startswith("data:image/png;base64,") for m in models):
        raise RuntimeError(f"unexpected answer: {str(answer)[:200]}")
    proc.send_signal(signal.SIGINT)  # run_step reaps it (and kills it if it is still running after 120 s)
    return (
        f"1 request answered in {seconds:.1f} s ({len(models)} models, "
        f"{'x'.join(str(models[0].get(k)) for k in ('width', 'height'))} px)"
    )


# ------------------------------------------------------------------------------------ preparation


def write_data(folder: Path, count: int = 16) -> None:
    """``count`` 320x288 images of coloured shapes with captions in metadata.csv (file_name,text)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        color, shape = list(COLORS)[rng.integers(4)], ["circle", "square"][rng.integers(2)]
        noise = rng.integers(180, 256, (288, 320, 3), dtype=np.uint8)  # a textured background, not flat
        image = Image.fromarray(noise)
        x, y = int(rng.integers(10, 180)), int(rng.integers(10, 150))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)([x, y, x + 120, y + 120], fill=COLORS[color])
        name = f"{i:03d}.png"
        image.save(folder / name)
        rows.append((name, f"a photo of a {color} {shape}"))
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)


def prepare(work: Path) -> None:
    """Data folder, subject folder (4 of the data images), control-image folder, prompt file."""
    data = work / "data"
    if not (data / "metadata.csv").is_file():
        write_data(data)
    write_control_data(work / "control-data")
    subject = work / "subject"
    subject.mkdir(exist_ok=True)
    for i in range(4):
        shutil.copyfile(data / f"{i:03d}.png", subject / f"{i:03d}.png")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")


def build_main(arch: str, out: Path, weights: Path, controlnet: Path | None = None) -> None:
    """Subprocess entry (``--build``): the pipeline folder, Inception / CLIP weight files for evaluate and (SD-v1
    layouts, ``controlnet`` given) the teacher's ControlNet for ``adapt controlnet``."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.monotonic()
    if arch in ("tiny", "tiny-sdxl"):
        from bksdm.world.tiny import save_tiny_pipeline

        save_tiny_pipeline(out, "sdxl" if arch == "tiny-sdxl" else "sd-v1", seed=0)
        if controlnet is not None and arch == "tiny":
            from diffusers import UNet2DConditionModel

            save_teacher_controlnet(UNet2DConditionModel.from_pretrained(out / "unet"), controlnet)
    else:
        build_arch_pipeline(ARCH_NAMES[arch], out, device, controlnet)
    print(f"pipeline: {out} in {time.monotonic() - t0:.1f} s", flush=True)
    build_eval_weights(weights, tiny=arch.startswith("tiny"))
    print(f"evaluation weights: {weights} in {time.monotonic() - t0:.1f} s", flush=True)


def build_arch_pipeline(name: str, out: Path, device: str, controlnet: Path | None = None) -> None:
    """A stock diffusers folder of the architecture ``name`` with random weights, one component in memory at a time.

    ``model_index.json`` comes from the pipeline class itself, made of meta-device components (no memory);
    each component is then built for real on ``device``, saved in safetensors and freed before the next, so
    the peak is the largest component (SDXL's 10.3 GB U-Net), not the whole pipeline. With ``controlnet`` (SD-v1
    layouts) the teacher's ControlNet is made from the U-Net before it is freed (:func:`save_teacher_controlnet`).
    """
    import copy

    import torch
    import transformers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from bksdm.plan.archs import build_scheduler, build_text_encoders, build_unet, build_vae, get_arch
    from bksdm.world.tiny import build_tiny_tokenizer

    spec = get_arch(name)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out / "tokenizer")
    scheduler = build_scheduler(spec)
    meta = dict(unet=build_unet(spec), vae=build_vae(spec), **build_text_encoders(spec))
    if spec.is_sdxl:
        shutil.copytree(out / "tokenizer", out / "tokenizer_2", dirs_exist_ok=True)
        pipe = StableDiffusionXLPipeline(
            tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, add_watermarker=False, **meta
        )
    else:
        pipe = StableDiffusionPipeline(
            tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **meta,
        )  # fmt: skip
    pipe.save_config(out)  # model_index.json, written by diffusers from the registered components
    scheduler.save_pretrained(out / "scheduler")
    del pipe, meta
    torch.manual_seed(0)
    for component, build in (
        ("unet", lambda: build_unet(spec, device=device)),
        ("vae", lambda: build_vae(spec, device=device)),
    ):
        module = build()
        module.save_pretrained(out / component, safe_serialization=True)
        if component == "unet" and controlnet is not None and not spec.is_sdxl:
            save_teacher_controlnet(module, controlnet)
        del module
    for component, kwargs in spec.text_encoder_configs.items():
        # One encoder at a time (build_text_encoders makes all of them; SDXL's bigG alone is 2.8 GB).
        config = transformers.CLIPTextConfig(**copy.deepcopy(kwargs))
        with torch.device(device):
            module = getattr(transformers, spec.text_encoder_classes[component])(config)
        module.save_pretrained(out / component, safe_serialization=True)
        del module


def build_eval_weights(folder: Path, tiny: bool) -> None:
    """FID Inception-v3 (full width: the real network's shapes) and a Hugging Face CLIP, random weights.

    The CLIP is ViT-L/14-sized (openai/clip-vit-large-patch14's shapes, 428M parameters) at real scale; the
    paper's OpenCLIP ViT-g/14 needs open_clip (and torchvision), which bksdm does not install.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from bksdm.eval.inception import InceptionV3
    from bksdm.world.tiny import build_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(InceptionV3(width=1 / 8 if tiny else 1.0).state_dict(), folder / "inception.pth")
    tokenizer = build_tiny_tokenizer(folder / "clip-tokenizer")
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if tiny:
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)  # fmt: skip
        projection, side = 16, 32
    else:  # openai/clip-vit-large-patch14
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14)  # fmt: skip
        projection, side = 768, 224
    text.update(vocab_size=tokenizer.vocab_size, max_position_embeddings=77, **ids)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder / "clip", safe_serialization=True)
    processor.save_pretrained(folder / "clip")


# ----------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Ceilings:
    """Memory ceilings in GiB per command (justified in benchmarks/README.md, "real_scale.py")."""

    build: float
    prune: float
    profile: float
    generate: float
    img2img: float
    evaluate: float
    report: float
    export: float
    serve: float
    cache: float
    distill: float
    dreambooth: float
    lora: float
    lcm: float
    lcm_lora: float
    teacher_lora: float
    adapt_lora: float
    adapt_controlnet: float
    controlnet_kd: float


CEILINGS = {
    # SD-v1.4 fp32: U-Net 3.44 GB, CLIP-L text 0.49 GB, VAE 0.33 GB: 4.3 GB a pipeline; bk-small U-Net 1.93 GB.
    "sd-v1.4": Ceilings(
        build=7,  # U-Net 3.20 GiB, then with the ControlNet made from it (1.35) before it is freed: 4.55 (5.0 measured)
        prune=9,
        profile=7,
        generate=7,
        img2img=7,
        evaluate=5,
        report=4,
        export=12,
        serve=11,
        cache=6,
        distill=18,  # 13.0 of training state + 2.2 of oneDNN-packed teacher convolution weights (the CPU speed lever)
        dreambooth=14,
        lora=7,
        # GiB below (README's units). lcm: bk-small (1.80 a U-Net) as its own teacher: teacher, student, gradients,
        # AdamW x2, EMA target = 10.8 + VAE and text 0.77 (twice at the end: the saved pipeline's) + the oneDNN-packed
        # teacher convolutions 1.27 (distill's CPU kernels) = 13.6, + 2
        lcm=16,
        # teacher U-Net + its frozen copy under the adapters 3.6 + VAE and text 0.77 + packed convolutions 1.27 +
        # rank-64 adapters (38M parameters, 0.14) x5 (weights, gradients, AdamW x2, EMA) 0.71 = 6.4, + the 4
        # data-loader workers (forkserver: each a fresh Python with torch, about 0.4) 1.6, + 2 (9 was passed: 9.06)
        lcm_lora=11,
        teacher_lora=7,  # the teacher pipeline 4.0, frozen, + rank-16 adapters (0.01) + 256-px activations, + 2
        adapt_lora=4,  # configs and the LoRA file (0.03): nothing heavy (U-Nets are built on the meta device)
        adapt_controlnet=5,  # the teacher's ControlNet 1.35 + the pruned one 0.89, + 2
        # teacher pipeline 4.0 + bk-small U-Net 1.80 + teacher ControlNet 1.35 + the carried one 0.89 x4 (weights,
        # gradients, AdamW x2) = 10.7, + 2 (the 32-sample probe runs in chunks of the batch size, 1 here: once
        # VAE-encoded at once it added 0.16 a sample at 256 px, 5.1)
        controlnet_kd=13,
    ),  # fmt: skip
    # SDXL fp32: U-Net 10.3 GB, text encoders 0.49 + 2.78 GB, VAE 0.33 GB: 13.9 GB; bk-small U-Net 5.2 GB.
    "sdxl": Ceilings(
        build=12,
        prune=21,
        profile=17,
        generate=17,
        img2img=17,
        evaluate=5,
        report=4,
        export=0,
        serve=0,
        cache=6,
        distill=0,
        dreambooth=0,
        lora=19,
        lcm=0,
        lcm_lora=0,
        teacher_lora=0,
        adapt_lora=0,
        adapt_controlnet=0,
        controlnet_kd=0,
    ),  # fmt: skip
}
TINY_CEILINGS = Ceilings(*([3.0] * len(fields(Ceilings))))


def steps(arch: str, work: Path, resolution: int, gpu: bool, distill_overrides: tuple[str, ...] = ()) -> list[Step]:
    c = CEILINGS.get(arch, TINY_CEILINGS)
    sdxl = arch in ("sdxl", "tiny-sdxl")
    teacher, data, weights = work / "teacher", work / "data", work / "weights"
    res, steps_gen = str(resolution), "4"
    mp = "fp16" if gpu else "no"
    build = Step(
        "build pipeline (not bksdm)",
        [str(Path(__file__).resolve()), "--build", arch, "--workdir", str(work)],
        c.build, [teacher, weights] + ([] if sdxl else [work / "controlnet"]), python=True, group="build",
    )  # fmt: skip
    prunes = [
        Step(
            f"prune {p}",
            ["prune", "--teacher", teacher, "--plan", p, "--out", work / f"prune-{p}"],
            c.prune,
            [work / f"prune-{p}"],
            [teacher],
            group="prune",
        )  # fmt: skip
        for p in (["bk-small"] if sdxl else ["bk-base", "bk-small", "bk-tiny"])
    ]
    student = work / "prune-bk-small"
    profile = Step(
        "profile teacher",
        ["profile", "--model", teacher, "--resolution", res, "--steps", "2", "--repeats", "1", "--warmup", "1",
         "--out", work / "profile.json"],
        c.profile, [work / "profile.json"], [teacher], group="profile",
    )  # fmt: skip

    def gen(name: str, model: Path) -> Step:
        out = work / f"gen-{name}"
        return Step(
            f"generate {name}",
            ["generate", "--model", model, "--prompts", work / "prompts.txt", "--out", out, "--height", res,
             "--width", res, "--steps", steps_gen, "--batch-size", "2", "--no-safety-checker"],
            c.generate, [out], [model], group="generate", check=lambda: _count_pngs(out, 2),
        )  # fmt: skip

    gens = [gen("teacher", teacher)] + ([] if sdxl else [gen("bk-small", student)])
    img2img = Step(
        "img2img teacher",
        ["img2img", "--model", teacher, "--image", data / "000.png", "--prompt", PROMPTS[1], "--strength", "0.5",
         "--steps", "8", "--size", res, "--out", work / "img2img"],
        c.img2img, [work / "img2img"], [teacher], group="img2img", check=lambda: _count_pngs(work / "img2img", 1),
    )  # fmt: skip
    cache = Step(
        "cache 16 images",
        ["cache", "--out", work / "cache", f"model.teacher={teacher}", f"data.train={data}",
         f"data.resolution={res}"],
        cache_ceiling(c.cache, resolution), [work / "cache"], [teacher], group="cache",
    )  # fmt: skip
    if sdxl:  # see CEILINGS: the other commands need more than a 24 GB machine, or do not take SDXL
        return [build, profile, *gens, *prunes, img2img, cache]
    evals = [
        Step(
            f"evaluate {name}",
            [
                "evaluate",
                "--images",
                work / f"gen-{name}",
                "--metrics",
                "fid,clip",
                "--ref-images",
                data,
                "--inception-weights",
                weights / "inception.pth",
                "--clip-model",
                f"hf:{weights / 'clip'}",
                "--offline",
                "--batch-size",
                "8",
                "--out",
                work / f"gen-{name}" / "evaluation.json",
            ],
            c.evaluate,
            [work / f"gen-{name}" / "evaluation.json"],
            [work / f"gen-{name}"],
            group="evaluate",
        )  # fmt: skip
        for name in ("teacher", "bk-small")
    ]
    report = Step(
        "report",
        ["report", "--model", f"teacher={work / 'gen-teacher'}", "--model", f"bk-small={work / 'gen-bk-small'}",
         "--out", work / "report"],
        c.report, [work / "report"], [work / f"gen-{n}" / "evaluation.json" for n in ("teacher", "bk-small")],
        group="report",
    )  # fmt: skip
    export = Step(
        "export onnx bk-small unet",
        ["export", "onnx", "--model", student, "--components", "unet", "--out", work / "onnx-bk-small"],
        c.export, [work / "onnx-bk-small"], [student], group="export",
    )  # fmt: skip
    serve = Step(
        "serve 1 request",
        ["serve", "--teacher", teacher, "--student", student, "--port", "0", "--steps", "2"],
        c.serve, [], [teacher, student], interact=serve_one_request, group="serve",
    )  # fmt: skip
    common = [
        f"model.teacher={teacher}", "model.plan=bk-small", f"data.train={data}", f"data.resolution={res}",
        "train.batch_size=1", "train.gradient_accumulation_steps=1", f"train.mixed_precision={mp}",
        "train.use_ema=true", "train.checkpoint_every=2", "train.validate_every=0", "train.log_every=1",
        *distill_overrides,
    ]  # fmt: skip
    tag = f" [{' '.join(distill_overrides)}]" if distill_overrides else ""
    uncached_dir, cached_dir = work / f"distill-uncached{_slug(tag)}", work / f"distill-cached{_slug(tag)}"
    distills = [
        Step("distill 2 steps uncached" + tag,
             ["distill", *common, "train.max_steps=2", f"train.output_dir={uncached_dir}"],
             c.distill, [uncached_dir], [teacher], group="distill", check=lambda: _checkpoint_note(uncached_dir)),
        Step("distill 2 steps cached" + tag,
             ["distill", *common, "train.max_steps=2", f"data.cache={work / 'cache'}",
              f"train.output_dir={cached_dir}"],
             c.distill, [cached_dir], [teacher, work / "cache"], group="distill",
             check=lambda: _checkpoint_note(cached_dir)),
        Step("distill resume latest (+1 step)" + tag,
             ["distill", "--resume", "latest", *common, "train.max_steps=3", f"data.cache={work / 'cache'}",
              f"train.output_dir={cached_dir}"],
             c.distill, [cached_dir], [cached_dir / "checkpoints"], keep_outputs=True, group="resume",
             check=lambda: _resumed_note(cached_dir)),
    ]  # fmt: skip
    db = ["--model", student, "--instance-dir", work / "subject", "--instance-prompt", "a photo of sks shape",
          "--steps", "2", "--resolution", res, "--validation-every", "0", "--checkpoint-every", "2"]  # fmt: skip
    if gpu:
        db += ["--mixed-precision", "fp16"]
    dreambooths = [
        Step("dreambooth 2 steps full (bk-small)",
             [*db, "--class-prompt", "a photo of a shape", "--num-class-images", "2", "--sample-steps", "2",
              "--out", work / "db-full"],
             c.dreambooth, [work / "db-full"], [student], group="dreambooth"),
        Step("dreambooth 2 steps LoRA (bk-small)", [*db, "--lora", "--out", work / "db-lora"],
             c.lora, [work / "db-lora"], [student], group="dreambooth"),
    ]  # fmt: skip
    for step in dreambooths:
        step.argv.insert(0, "dreambooth")
    return [
        build, *prunes, profile, *gens, img2img, *evals, report, export, serve, cache, *distills, *dreambooths,
        *lcm_steps(c, work, res, gpu), *adapt_steps(c, work, res, gpu),
    ]  # fmt: skip


def _count_pngs(folder: Path, expected: int) -> str:
    found = len(list(folder.glob("*.png")))
    if found != expected:
        raise RuntimeError(f"{found} PNG files in {folder.name}, expected {expected}")
    return f"{found} images"


def _checkpoint_note(run: Path) -> str:
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    if not checkpoints:
        raise RuntimeError(f"no checkpoint in {run / 'checkpoints'}")
    size = disk_usage([checkpoints[-1]]) / GIB
    return f"{checkpoints[-1].name}: {size:.2f} GiB; run folder {disk_usage([run]) / GIB:.2f} GiB"


def _resumed_note(run: Path) -> str:
    steps_seen = []
    metrics = run / "logs" / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                steps_seen.append(json.loads(line).get("step"))
    if 3 not in steps_seen:
        raise RuntimeError(f"metrics.jsonl has no step 3 after the resume (steps {steps_seen})")
    return _checkpoint_note(run)


# ------------------------------------------------------------------------------------------- table


def table(rows: list[dict[str, Any]]) -> str:
    def num(value: Any, digits: int = 1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = [
        "| command | status | exit | wall s | peak GiB (tree PSS / max RSS) | ceiling GiB | GPU GiB | disk GiB "
        "| note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        peak = (
            ""
            if r["peak_gib"] is None
            else f"{r['peak_gib']:.2f} ({r['peak_tree_pss_gib']:.2f} / {r['peak_process_rss_gib']:.2f})"
        )
        note = r["note"] or _error_line(r["stderr_tail"])
        lines.append(
            f"| {r['name']} | {r['status']} | {'' if r['exit_status'] is None else r['exit_status']} | "
            f"{num(r['wall_s'])} | {peak} | {r['ceiling_gib']:g} | {num(r['gpu_peak_gib'], 2)} | "
            f"{num(r['disk_gib'], 2)} | {note.replace('|', '/')[:160]} |"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCH_NAMES), default="sd-v1.4")
    parser.add_argument("--resolution", type=int, default=None, help="256 on CPU, 512 with a GPU (tiny: 128)")
    parser.add_argument("--only", nargs="+", metavar="CMD", default=None,
                        help="groups to run: build prune profile generate img2img evaluate report export "
                             "serve cache distill resume dreambooth lcm adapt (the command writing a missing "
                             "input, e.g. build or prune, runs too)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="working folder (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (always kept with --workdir)")
    parser.add_argument("--wait-limit", type=float, default=1800.0,
                        help="seconds to wait for MemAvailable >= ceiling + 2 GiB before skipping")  # fmt: skip
    parser.add_argument("--lean", action="store_true",
                        help="delete outputs no later command needs (small disks)")  # fmt: skip
    parser.add_argument("--distill-override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra distill overrides; the rows are named with them")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/...)")
    parser.add_argument("--update", action="store_true", help="merge rows into an existing --out JSON")
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # subprocess entry: build only
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build is not None:
        build_main(args.build, args.workdir / "teacher", args.workdir / "weights", args.workdir / "controlnet")
        return 0
    gpu = _gpu_name() is not None
    resolution = args.resolution or (128 if args.arch.startswith("tiny") else 512 if gpu else 256)
    out = args.out or REPO / "benchmarks" / "results" / f"real_scale_{args.arch}_{resolution}px.json"
    own_workdir = args.workdir is None
    work = args.workdir or Path(f"/tmp/real_scale_{args.arch}_{os.getpid()}")
    work = work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    prepare(work)
    plan = steps(args.arch, work, resolution, gpu, tuple(args.distill_override))
    if args.only:
        wanted = set(args.only) - {"build"}
        unknown = wanted - {s.group for s in plan}
        if unknown:
            print(f"real_scale: error: unknown --only {sorted(unknown)}; known: {sorted({s.group for s in plan})}")
            return 2
        have_teacher = (work / "teacher" / "model_index.json").is_file() and (work / "weights" / "clip").is_dir()
        chosen = [
            s for s in plan if s.group in wanted or (s.group == "build" and ("build" in args.only or not have_teacher))
        ]
        plan = add_prerequisites(chosen, plan)
    host = host_info()
    print(f"real_scale: {args.arch} at {resolution} px in {work}")
    print(f"host: {host['cpu_model']} ({host['cpus_usable']} usable cores, native bf16: {host['native_bf16']}), "
          f"{host['memory_total_gib']} GiB, GPU: {host['gpu']}, torch {host['versions']['torch']}")  # fmt: skip
    result: dict[str, Any] = {
        "arch": args.arch, "resolution": resolution, "host": host, "workdir": str(work),
        "memory_measure": "peak_gib = max(peak sum of PSS over the process tree sampled every 0.5 s, "
                          "the kernel's peak RSS of the largest single process (wait4 ru_maxrss))",
        "times": "indicative: the CPU may be shared with other jobs; see each row's load averages",
    }  # fmt: skip
    earlier = json.loads(out.read_text()).get("rows", []) if args.update and out.is_file() else []
    order = [s.name for s in steps(args.arch, work, resolution, gpu)]
    rows: list[dict[str, Any]] = []
    for index, step in enumerate(plan):
        print(f"- {step.name} (ceiling {step.ceiling_gib:g} GiB) ...", flush=True)
        row = asdict(run_step(step, work / "logs", args.wait_limit))
        rows.append(row)
        if args.lean:
            remove_unneeded(step, plan[index + 1 :])
        peak = "" if row["peak_gib"] is None else f", peak {row['peak_gib']:.2f} GiB"
        print(f"  {row['status']} (exit {row['exit_status']}, {row['wall_s']} s{peak}) {row['note']}", flush=True)
        for line in row["stderr_tail"][-5:]:
            print(f"    | {line}")
        # Written after every command, so a run stopped part-way keeps what it measured.
        names = {r["name"] for r in rows}
        merged = [r for r in earlier if r["name"] not in names] + rows
        result["rows"] = sorted(merged, key=lambda r: row_order(r["name"], order))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if step.group == "build" and row["status"] != "ok":
            break
    rows = result.get("rows", [])
    print()
    print(table(rows))
    print(f"\nwritten {out}")
    if own_workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


def cache_ceiling(at_256: float, resolution: int) -> float:
    """The cache's ceiling at ``resolution``: its 256-px ceiling, or above 256 px the encoders (0.8 GiB) and the
    batch the cache sizes to the memory (16 images of 0.75 GiB each at 512 px, ``bksdm.train.cache.auto_batch_size``)
    plus the 2 GiB runtime margin: 15 GiB at 512 px."""
    if resolution <= 256:
        return at_256
    return float(int(0.8 + 16 * 0.75 * (resolution / 512) ** 2 + 2 + 0.999))


if __name__ == "__main__":
    sys.exit(main())
