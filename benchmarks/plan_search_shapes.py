"""Searched plans against the paper's hand-picked ones, in the shapes world, each distilled with the demo's budget.

Usage (from the repository root, with bksdm installed)::

    python benchmarks/plan_search_shapes.py                     # score, search, 4 demo runs (about 15 min, 2 cores)
    python benchmarks/plan_search_shapes.py --steps 50          # a quick check of the script

What it runs, every step a real ``bksdm`` command in its own process:

1. ``bksdm plan score`` of the bundled shapes teacher (defaults, ``--validate 10``: the additivity check);
2. ``bksdm plan search --budget params=F`` at F = bk-tiny's and bk-small's U-Net parameter fractions;
3. ``bksdm demo --plan P`` for bk-tiny, the plan searched at its size, bk-small and the plan searched at its size:
   the same data, seeds, steps and evaluation for all four (the demo's budget: 400 steps of batch 32);
4. a table of prompt accuracy, Fréchet distance (shapes classifier features), U-Net params, MACs per step and U-Net
   step latency from each demo's summary, with each searched plan's predicted and the presets' predicted losses.

Latencies come from four separate demo runs: compare them only when the load average (recorded) stayed low.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PRESETS = {"bk-tiny": 1_507_204, "bk-small": 1_918_660}  # U-Net params of the shapes teacher's students (demo)
TEACHER_PARAMS = 3_277_988


def bksdm(*args: str) -> str:
    done = subprocess.run(["bksdm", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bksdm {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def demo_figures(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    student = next(v for k, v in summary["models"].items() if k != "teacher")
    return {
        "prompt_accuracy": student["prompt_accuracy"],
        "frechet_distance": student["frechet_distance"],
        "unet_params": student["unet_params"],
        "unet_macs": student["unet_macs"],
        "unet_step_ms": student["unet_step_ms"],
        "teacher_step_ms": summary["models"]["teacher"]["unet_step_ms"],
        "seconds": summary["seconds"],
        "load_average_after": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/plan_search_shapes"), help="scores, plans, demos")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per student (demo's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_search_shapes.json"))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": os.getloadavg()}

    scores = work / "scores"
    if not (scores / "scores.json").is_file():
        bksdm("plan", "score", "--out", str(scores), "--validate", "10")
    record["scores"] = json.loads((scores / "scores.json").read_text()).get("validation")
    plans = {"bk-tiny": "bk-tiny", "bk-small": "bk-small"}
    for preset, params in PRESETS.items():
        fraction = params / TEACHER_PARAMS
        target = work / f"searched-{preset}.yaml"
        bksdm("plan", "search", "--scores", str(scores), "--budget", f"params={fraction:.4f}", "--out", str(target),
              "--name", f"searched-at-{preset}")  # fmt: skip
        plans[f"searched at {preset}"] = str(target)
    record["results"] = {}
    for name, plan in plans.items():
        out = work / f"demo-{name.replace(' ', '-')}"
        if not (out / "summary.json").is_file():
            extra = ["--steps", str(args.steps)] if args.steps else []
            bksdm("demo", "--plan", plan, "--out", str(out), *extra)
        record["results"][name] = demo_figures(out) | {"plan": plan}
        print(name, record["results"][name], flush=True)

    lines = [
        "| plan | prompt accuracy | Fréchet distance | U-Net params | MACs / step | U-Net step (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in record["results"].items():
        lines.append(
            f"| {name} | {r['prompt_accuracy']:.3f} | {r['frechet_distance']:.2f} | {r['unet_params']:,} "
            f"({r['unet_params'] / TEACHER_PARAMS:.1%}) | {r['unet_macs'] / 1e6:.1f}M | {r['unet_step_ms']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    record["table"] = table
    kept = args.out.with_suffix("")  # the scores and the searched plans (small) beside the JSON; demos stay in --work
    kept.mkdir(parents=True, exist_ok=True)
    for path in [*(scores / f"scores.{ext}" for ext in ("json", "md", "csv")), *work.glob("searched-*.yaml")]:
        (kept / path.name).write_bytes(path.read_bytes())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
