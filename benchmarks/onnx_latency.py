"""U-Net step latency on the CPU: ONNX Runtime beside PyTorch, for the shapes teacher and its students.

Usage (from the repository root, with ``pip install 'bksdm[onnx]'``)::

    python benchmarks/onnx_latency.py --repeats 3 --warmup 1                # seconds-long smoke run
    python benchmarks/onnx_latency.py --repeats 50 --warmup 5 --threads 1   # the README table, on a quiet machine

For each model -- the teacher and the students ``bksdm prune`` makes of it with ``--plans`` -- the U-Net is
exported with ``bksdm.use.onnx.export.export_onnx`` (its parity error against PyTorch is reported beside the
times), then one U-Net step is timed in PyTorch and in ONNX Runtime (``CPUExecutionProvider``, as many intra-op
threads as torch) on the same inputs as ``bksdm profile`` (zeros, timestep 999, 77 text tokens): at batch 1 and
at batch 2 (a classifier-free-guidance step). The two runtimes alternate on every repeat (PyTorch, ONNX
Runtime, ONNX Runtime, PyTorch, ...) so that drift from other load falls on both; compare them as ratios
measured in one run.

By default the teacher is the shapes teacher's architecture with random weights
(``bksdm.world.teacher.build_untrained_teacher``): latency does not depend on the weights' values, so this is the
bundled teacher's latency. ``--teacher DIR`` times any SD-v1/v2 pipeline folder instead (e.g. the bundled
teacher once its weights are in ``src/bksdm/world/assets/teacher``).

Prints a markdown table and writes every raw timing and setting as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bksdm.loading import load_pipeline
from bksdm.plan.prune import prune
from bksdm.profiling import count_params, unet_inputs
from bksdm.use.onnx.export import export_onnx
from bksdm.use.onnx.runtime import onnx_session, onnx_unet_feeds, require_onnx


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="SD pipeline folder (default: the shapes teacher, random weights)")
    p.add_argument("--plans", default="bk-tiny", help="comma-separated plans for the students (default bk-tiny)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per runtime and batch (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/onnx_latency.json", help="JSON with every timing")
    return p.parse_args(argv)


def _alternate(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating which goes first on every repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _measure(model_dir: Path, label: str, work: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    report = export_onnx(model_dir, work / "onnx", components=["unet"])
    unet = load_pipeline(model_dir).unet.eval()
    vae_scale = report["vae_scale_factor"]
    side = unet.config.sample_size
    session = onnx_session(work / "onnx" / "unet", threads=threads)
    row: dict[str, Any] = {
        "model": label,
        "unet_params": count_params(unet),
        "resolution": side * vae_scale,
        "parity_max_abs_error": report["components"]["unet"]["max_abs_error"],
    }
    for batch in (1, 2):
        # bksdm.profiling.unet_inputs takes pixels at SD's factor 8; ask for the latent side this way.
        torch_in = unet_inputs(unet.config, side * 8, batch=batch)
        feeds = onnx_unet_feeds(unet.config, side, batch)

        def run_torch(inputs: dict[str, Any] = torch_in) -> None:
            with torch.inference_mode():
                unet(**inputs)

        times = _alternate(
            {"pytorch": run_torch, "onnxruntime": lambda feeds=feeds: session.run(None, feeds)},
            args.warmup,
            args.repeats,
        )
        for runtime, values in times.items():
            row[f"{runtime}_b{batch}_times_s"] = values
            row[f"{runtime}_b{batch}_s"] = statistics.median(values)
            row[f"{runtime}_b{batch}_min_s"] = min(values)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | U-Net params | PyTorch step | ONNX Runtime step | ORT speed-up | PyTorch CFG step (batch 2) "
        "| ONNX Runtime CFG step | ORT speed-up | parity max abs error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["model"], f"{r['unet_params']:,}"]
        for batch in (1, 2):
            pt, ort = r[f"pytorch_b{batch}_s"], r[f"onnxruntime_b{batch}_s"]
            cells += [f"{pt * 1e3:.2f} ms", f"{ort * 1e3:.2f} ms", f"{pt / ort:.2f}x"]
        cells.append(f"{r['parity_max_abs_error']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _, ort = require_onnx()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.teacher is None:
            from bksdm.world.teacher import build_untrained_teacher

            teacher_dir, teacher_label = work / "teacher", "shapes teacher (random weights)"
            build_untrained_teacher(seed=0).save_pretrained(teacher_dir)
        else:
            teacher_dir, teacher_label = Path(args.teacher), f"teacher {args.teacher}"
        models = [(teacher_dir, teacher_label)]
        for plan in [p.strip() for p in args.plans.split(",") if p.strip()]:
            student = work / f"student-{plan}"
            prune(str(teacher_dir), plan, student)
            models.append((student, f"{plan} student"))
        for index, (folder, label) in enumerate(models):
            print(f"onnx_latency: {label} ...", file=sys.stderr, flush=True)
            rows.append(_measure(folder, label, work / f"m{index}", args, threads))
    result = {
        "rows": rows,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "threads": threads, "teacher": args.teacher},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "load_average_1min": [load_start, os.getloadavg()[0]],
        },
    }
    print(
        f"onnx_latency: U-Net step latency, CPU, fp32, {threads} threads (torch and ONNX Runtime), "
        f"{args.warmup} warm-up + {args.repeats} timed calls alternating; medians; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; 1-min load average {load_start:.2f} -> {os.getloadavg()[0]:.2f}\n"
    )
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nraw timings: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
