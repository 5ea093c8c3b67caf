"""End-to-end image time and where it goes: SD-v1.4 against BK-SDM-Base, -Small and -Tiny, idle and contended.

Usage (from the repository root, with bksdm installed)::

    python benchmarks/end_to_end.py                                         # 512 px, 25 steps, CFG: the README table
    python benchmarks/end_to_end.py --resolution 128 --steps 2 --repeats 1 --out /tmp/e2e.json   # a quick try
    python benchmarks/end_to_end.py --pipeline                              # + one stock pipeline call per model
    python benchmarks/end_to_end.py --device cuda --out benchmarks/results/gpu/end_to_end_512px_cuda.json

Each cell is ``bksdm profile`` of one model (``--arch sd-v1.4``, random weights, with ``--plan bk-base``,
``bk-small`` or ``bk-tiny`` for the students) in its own process, so bksdm's threading default sees the other load
as a user's command would, while 0 or 1 other processes spin on the CPU (``cpu_contention.busy_processes``). Per
image with classifier-free guidance (the pipelines' default): text encoder twice (prompt and negative prompt) +
``--steps`` U-Net steps at batch 2 + one VAE decode, each part timed on its own (``--warmup`` untimed, ``--repeats``
timed calls, medians) with its share of the image; the image time as the parts compose it; the student/teacher
ratio of that time beside the ratio the MACs predict (text + steps x guided step + decode).

``--pipeline`` also measures one stock ``StableDiffusionPipeline`` call per model (``--steps`` steps, guidance 7.5,
seed 0, PIL output): the SD-v1.4 folder is built once with random weights and real_scale.py's byte-level tokenizer
(about 4 GB under ``--workdir``; ``--folder`` gives one already built and implies ``--pipeline``), the students are
made by the plans from it, and the gap between the call and the composition (PNDM's extra step, the scheduler,
post-processing, Python) is in the table. It about doubles the time.

Writes ``--out`` (default ``benchmarks/results/end_to_end_<R>px.json``): the environment (CPU model, cores, flags,
torch threads, load average), the settings, every cell's summary and its full ``bksdm profile`` JSON. Compare ratios
measured in one run: absolute figures depend on the machine and on whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cpu_contention import busy_processes, command_env, environment

PLANS = ("bk-base", "bk-small", "bk-tiny")
"""The students, by the plan that makes each from the teacher (BK-SDM-Base, -Small, -Tiny)."""
PARTS = {"text_encoders": "text enc.", "denoiser": "U-Net", "vae_decode": "VAE decode"}


def profile_args(args: argparse.Namespace, plan: str | None, folder: Path | None) -> list[str]:
    """The ``bksdm profile`` command of one model."""
    command = ["bksdm", "profile", str(folder)] if folder else ["bksdm", "profile", "--arch", args.arch]
    command += ["--plan", plan] if plan else []
    command += ["--resolution", str(args.resolution), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    command += ["--warmup", str(args.warmup), "--device", args.device, "--json"]
    return command + (["--dtype", args.dtype] if args.dtype else [])


def run_cell(command: list[str]) -> dict[str, Any]:
    """One ``bksdm profile`` run with bksdm's default threading (no thread variables of ours); its JSON."""
    done = subprocess.run(command, env=command_env("auto"), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def summary(profile: dict[str, Any]) -> dict[str, Any]:
    """The figures the tables show, from one guided image of a profile."""
    image = profile["per_image_cfg"]
    cell = {
        "image_s": image["image_s"],
        "image_macs": image["image_macs"],
        "parts": {
            name: {k: part[k] for k in ("calls", "batch", "macs", "macs_share", "s", "share")}
            for name, part in image["parts"].items()
        },
        "device": profile["device"],
        "peak_memory_bytes": profile["peak_memory_bytes"],
    }
    end = profile.get("end_to_end")
    if end:
        keys = ("s", "steps_run", "scheduler", "measured_over_composed", "shares")
        cell["end_to_end"] = {k: end[k] for k in keys}
    return cell


def add_ratios(cells: dict[str, dict[str, Any]]) -> None:
    """Each model's image time and MACs over the teacher's (first model) at the same load."""
    teacher = next(iter(cells.values()))
    for cell in cells.values():
        cell["time_ratio"] = cell["image_s"] / teacher["image_s"]
        cell["macs_ratio"] = cell["image_macs"] / teacher["image_macs"]
        if "end_to_end" in cell:
            cell["end_to_end"]["ratio"] = cell["end_to_end"]["s"] / teacher["end_to_end"]["s"]


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _load(n: int) -> str:
    return "idle" if n == 0 else f"{n} busy"


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]) for r in rows
    ]


def tables(record: dict[str, Any]) -> str:
    """Where the time goes per model and load; then idle and contended side by side with the MACs' prediction."""
    s = record["settings"]
    results = {int(load): cells for load, cells in record["results"].items()}
    env = record["environment"]
    lines = [
        f"{s['arch']} vs BK-SDM at {s['resolution']} px, {s['steps']} steps, classifier-free guidance (text encoder "
        f"x2, U-Net at batch 2, one VAE decode); {env['cpu']}, {env['cores']} cores; device {s['device']}",
        "",
    ]
    pipeline = any("end_to_end" in c for cells in results.values() for c in cells.values())
    header = ["model", "load"] + [f"{label} s (share)" for label in PARTS.values()] + ["image", "/teacher"]
    header += ["MACs/teacher"] + (["stock call", "/teacher", "other"] if pipeline else [])
    rows = [header]
    for load, cells in results.items():
        for model, cell in cells.items():
            row = [model, _load(load)]
            row += [f"{_seconds(cell['parts'][p]['s'])} ({100 * cell['parts'][p]['share']:.1f}%)" for p in PARTS]
            row += [_seconds(cell["image_s"]), f"{cell['time_ratio']:.3f}", f"{cell['macs_ratio']:.3f}"]
            if pipeline:
                end = cell.get("end_to_end")
                other = f"{100 * end['shares']['other']:.1f}%" if end else ""
                row += [_seconds(end["s"]), f"{end['ratio']:.3f}", other] if end else [""] * 3
            rows.append(row)
    lines += _aligned(rows) + [""]
    loads = sorted(results)
    header = ["model", "MACs/image", "MACs ratio"]
    for load in loads:
        header += [f"{_load(load)}: image", "ratio"] + (["of idle"] if load and 0 in results else [])
    rows = [header]
    for model in results[loads[0]]:
        first = results[loads[0]][model]
        row = [model, f"{first['image_macs'] / 1e12:.2f}T", f"{first['macs_ratio']:.3f}"]
        for load in loads:
            cell = results[load][model]
            row += [_seconds(cell["image_s"]), f"{cell['time_ratio']:.3f}"]
            if load and 0 in results:
                row.append(f"{100 * results[0][model]['image_s'] / cell['image_s']:.0f}%")
        rows.append(row)
    lines += _aligned(rows)
    lines += [
        f"'ratio': the model's image time over {s['arch']}'s at the same load; 'MACs ratio': what the MACs predict;",
        "'of idle': throughput kept beside the busy processes (idle image time / contended image time);",
        "'stock call': one StableDiffusionPipeline call, 'other' its share that no part accounts for.",
    ]
    return "\n".join(lines)


def build_teacher(arch: str, workdir: Path, device: str) -> Path:
    """The ``arch`` pipeline folder with random weights (real_scale.py's build), made once and reused."""
    folder = workdir / f"{arch}-random"
    if not (folder / "model_index.json").is_file():
        from real_scale import build_arch_pipeline

        build_arch_pipeline(arch, folder, device)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd-v1.4", help="the teacher's architecture preset (default sd-v1.4)")
    parser.add_argument("--plans", nargs="*", default=list(PLANS), choices=PLANS, help="students (default: all)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per component (medians)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loads", nargs="+", type=int, default=[0, 1], help="busy processes beside each run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bksdm profile's)")
    parser.add_argument("--pipeline", action="store_true", help="also time one stock pipeline call per model")
    parser.add_argument("--workdir", type=Path, default=None, help="--pipeline: where the teacher folder is built")
    parser.add_argument(
        "--folder", type=Path, default=None, help="an existing teacher folder (real_scale.py --build's): --pipeline"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    models = {args.arch: None} | {plan: plan for plan in args.plans}  # the teacher first: ratios are over it
    out = args.out or Path(f"benchmarks/results/end_to_end_{args.resolution}px.json")

    record: dict[str, Any] = {"environment": environment(), "settings": vars(args) | {"out": str(out)}}
    from real_scale import host_info

    record["environment"]["cpu_flags"] = host_info()["cpu_flags"]
    record["settings"] |= {k: str(getattr(args, k)) if getattr(args, k) else None for k in ("workdir", "folder")}
    record |= {"results": {}, "profiles": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or (
            build_teacher(args.arch, args.workdir or Path(tmp), args.device) if args.pipeline else None
        )
        for load in args.loads:
            busy = busy_processes(load)
            cells, profiles = {}, {}
            try:
                time.sleep(1.0)
                for model, plan in models.items():
                    t0 = time.monotonic()
                    profiles[model] = run_cell(profile_args(args, plan, folder))
                    cells[model] = summary(profiles[model]) | {"wall_s": time.monotonic() - t0}
                    print(f"{model:<9} {_load(load):<7} image {_seconds(cells[model]['image_s'])} "
                          f"(run {cells[model]['wall_s']:.0f} s)", flush=True)  # fmt: skip
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            add_ratios(cells)
            record["results"][str(load)] = cells
            record["profiles"][str(load)] = profiles
    record["wall_s"] = time.monotonic() - started
    print()
    print(tables(record))
    print(f"\n{record['wall_s']:.0f} s in all; {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
