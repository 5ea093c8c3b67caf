"""CPU throughput idle and under contention, for each threading setting, side by side.

Usage (from the repository root, with bksdm installed)::

    python benchmarks/cpu_contention.py                       # generate + distill, 0/1/2 busy processes
    python benchmarks/cpu_contention.py --workloads generate --loads 0 1 --images 4

Each cell runs a real ``bksdm`` command in its own process while 0, 1 or 2 other processes spin on the CPU
(``python -c "while True: pass"``, what laptops, shared servers and CI runners always have in some form):

- ``generate``: ``bksdm generate`` on the bundled shapes teacher (``--images`` prompts, ``--steps`` steps); the
  figure is the images/s that generate itself reports (model loading is not timed);
- ``distill``: ``bksdm distill`` of the bundled teacher to bk-tiny on a small shapes-world data set; the figure is
  the median ``samples_per_s`` of the logged steps after the first (start-up and the first step are not timed).

Threading settings (each a set of environment variables for the command):

- ``spin``: OpenMP's own default, waiting threads spin (``BKSDM_OMP_WAIT=active``); what bksdm did before;
- ``auto``: bksdm's default since issue 15 (:mod:`bksdm.threads`: unchanged on an idle machine, as many passive
  threads as free cores when other processes are busy at start);
- ``passive``: ``BKSDM_OMP_WAIT=passive`` (waiting threads sleep, all cores);
- ``spin-10k``: spinning threads that give up after 10,000 spins (``GOMP_SPINCOUNT``);
- ``one-thread``: ``OMP_NUM_THREADS=1`` (one OpenMP thread, nothing to wait for).

The table gives each setting's throughput and its share of the same setting's idle figure, and the JSON records the
CPU, its flags, torch's thread count and the load average. Compare ratios measured in one run: absolute figures
depend on the machine and on whatever else runs.

``--late N`` measures contention that starts *after* the command: each distill run starts on the idle machine and
N busy processes start once it has logged ``--late-after`` steps; the figure is the median samples/s of the steps
logged after that, beside the same run's idle steps (``spin`` cannot adapt; ``auto`` hands threads back and forth
as the machine changes, :class:`bksdm.threads.ThreadGovernor`). It writes ``cpu_contention_late.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SETTINGS: dict[str, dict[str, str]] = {
    "spin": {"BKSDM_OMP_WAIT": "active"},
    "auto": {},
    "passive": {"BKSDM_OMP_WAIT": "passive"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000", "BKSDM_OMP_WAIT": "active"},
    "one-thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "BKSDM_OMP_WAIT", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def busy_processes(count: int) -> list[subprocess.Popen]:
    """``count`` processes that spin on the CPU until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def command_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(SETTINGS[setting])
    return env


def run_generate(work: Path, setting: str, images: int, steps: int) -> float:
    """images/s of one ``bksdm generate`` run (generation only, as generate reports it)."""
    from bksdm.world.shapes import all_scenes

    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(s.caption for s in all_scenes()[:images]) + "\n")
    out = work / f"gen-{setting}-{time.time_ns()}"
    done = subprocess.run(
        ["bksdm", "generate", "--prompts", str(prompts), "--out", str(out), "--steps", str(steps)],
        env=command_env(setting),
        capture_output=True,
        text=True,
        check=True,
    )
    rate = re.search(r"([0-9.]+) images/s", done.stdout + done.stderr)
    if not rate:
        raise RuntimeError(f"no images/s in generate's output:\n{done.stdout}\n{done.stderr}")
    return float(rate.group(1))


def distill_args(data: Path, out: Path, steps: int) -> list[str]:
    """``bksdm distill`` overrides of a timed run: bk-tiny of the bundled teacher, batch 8, every step logged."""
    return [
        "model.plan=bk-tiny", f"data.train={data}", "data.resolution=64", "data.num_workers=0",
        f"train.output_dir={out}",
        f"train.max_steps={steps}", "train.batch_size=8", "train.gradient_accumulation_steps=1",
        "train.mixed_precision=no", "train.gradient_checkpointing=false", "train.validate_every=0",
        "train.log_every=1", "train.checkpoint_every=0", "train.use_ema=false",
    ]  # fmt: skip


def run_distill(work: Path, data: Path, setting: str, steps: int) -> float:
    """Median samples/s of the logged distill steps after the first."""
    out = work / f"distill-{setting}-{time.time_ns()}"
    args = distill_args(data, out, steps)
    subprocess.run(["bksdm", "distill", *args], env=command_env(setting), capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in records[1:])


def run_distill_late(work: Path, data: Path, setting: str, steps: int, busy: int, after: int) -> dict[str, float]:
    """One distill run that starts idle; ``busy`` processes start once it has logged ``after`` steps.

    Returns the median samples/s of the steps logged before (idle) and after the busy processes started.
    """
    out = work / f"late-{setting}-{time.time_ns()}"
    args = distill_args(data, out, steps)
    metrics = out / "logs" / "metrics.jsonl"
    command = subprocess.Popen(
        ["bksdm", "-v", "distill", *args], env=command_env(setting), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    started: list[subprocess.Popen] = []
    at = None
    try:
        while command.poll() is None:
            logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            if at is None and logged >= after:
                at, started = logged, busy_processes(busy)
            time.sleep(0.05)
    finally:
        for process in started:
            process.kill()
            process.wait()
    log = command.stderr.read().decode()
    if command.returncode != 0 or at is None:
        raise RuntimeError(f"distill failed or ended before {after} steps:\n{log}")
    rates = [json.loads(line)["samples_per_s"] for line in metrics.read_text().splitlines()]  # one step each
    changes = re.findall(r"CPU threads (\d+) -> (\d+)", log)
    return {
        "idle": statistics.median(rates[1:at]),
        "contended": statistics.median(rates[at + 1 :]),
        "thread_changes": len(changes),
        "threads_after": int(changes[-1][1]) if changes else None,
    }


def environment() -> dict[str, Any]:
    import torch

    from bksdm.profiling import cpu_has_native_bf16, cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "avx512": "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def table(record: dict[str, Any]) -> str:
    lines = [f"CPU {record['environment']['cpu']}, {record['environment']['cores']} cores", ""]
    for workload, rows in record["results"].items():
        unit = "images/s" if workload == "generate" else "samples/s"
        loads = sorted({int(k) for row in rows.values() for k in row})
        header = f"{workload} ({unit})".ljust(24) + "".join(f"{f'{n} busy':>22}" for n in loads)
        lines += [header]
        for setting, row in rows.items():
            idle = row.get("0")
            cells = []
            for n in loads:
                value = row.get(str(n))
                share = f" ({100 * value / idle:.0f}%)" if idle and value is not None and n else ""
                cells.append(f"{value:.3f}{share}".rjust(22) if value is not None else "-".rjust(22))
            lines.append(setting.ljust(24) + "".join(cells))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["generate", "distill"], choices=["generate", "distill"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; the table gives their median")
    parser.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2], help="busy processes beside the command")
    parser.add_argument("--images", type=int, default=8, help="generate: prompts (one image each)")
    parser.add_argument("--steps", type=int, default=10, help="generate: sampling steps")
    parser.add_argument("--distill-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_contention.json"))
    parser.add_argument("--late", type=int, default=0, help="busy processes that start after distill has started")
    parser.add_argument("--late-after", type=int, default=10, help="logged steps before they start")
    parser.add_argument("--late-steps", type=int, default=40, help="distill steps of each --late run")
    args = parser.parse_args()
    if args.late:
        return late_contention(args)

    from bksdm.world.shapes import export

    record: dict[str, Any] = {"environment": environment(), "settings": vars(args) | {"out": str(args.out)}}
    record["results"] = {w: {s: {} for s in args.settings} for w in args.workloads}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = export(work / "data", count=64, seed=0) if "distill" in args.workloads else None
        for load in args.loads:
            busy = busy_processes(load)
            try:
                time.sleep(1.0)
                for workload in args.workloads:
                    for setting in args.settings:
                        values = []
                        for _ in range(args.repeats):
                            if workload == "generate":
                                values.append(run_generate(work, setting, args.images, args.steps))
                            else:
                                values.append(run_distill(work, data, setting, args.distill_steps))
                        value = statistics.median(values)
                        record["results"][workload][setting][str(load)] = value
                        print(f"{workload:<9} {setting:<11} {load} busy: {value:.3f}", flush=True)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
    print()
    print(table(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def late_contention(args: argparse.Namespace) -> int:
    """``--late N``: distill runs that start idle and meet N busy processes part-way; spin vs auto, side by side."""
    from bksdm.world.shapes import export

    settings = [s for s in args.settings if s in ("spin", "auto")] or ["spin", "auto"]
    record: dict[str, Any] = {"environment": environment(), "settings": vars(args) | {"out": str(args.out)}}
    record["late"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = export(work / "data", count=64, seed=0)
        for _ in range(args.repeats):
            for setting in settings:  # alternating, so a slow spell of the machine hits both
                run = run_distill_late(work, data, setting, args.late_steps, args.late, args.late_after)
                record["late"].setdefault(setting, []).append(run)
                print(f"late {setting:<5} {run}", flush=True)
    print(f"\ndistill (samples/s), {args.late} busy process(es) starting after {args.late_after} steps")
    for setting, runs in record["late"].items():
        idle = statistics.median(r["idle"] for r in runs)
        contended = statistics.median(r["contended"] for r in runs)
        print(f"{setting:<6} idle {idle:8.2f}   after {contended:8.2f} ({100 * contended / idle:.0f}%)")
        record["late"][setting] = {"runs": runs, "idle": idle, "contended": contended}
    out = args.out.with_name(args.out.stem + "_late.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
