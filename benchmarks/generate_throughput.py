"""Generation throughput: images/s of bksdm's batched generation against a plain one-image-at-a-time loop.

Usage (from the repository root, with bksdm installed)::

    python benchmarks/generate_throughput.py --count 2 --repeats 1 --warmup 0   # seconds-long smoke run
    python benchmarks/generate_throughput.py                                    # the bundled teacher, CPU
    python benchmarks/generate_throughput.py --model CompVis/stable-diffusion-v1-4 --device cuda --count 32

Modes, all on one pipeline with the same prompts, seeds, scheduler, steps, guidance and size:

- ``diffusers loop``: what the official evaluation does, one ``pipe(prompt, generator=...)`` call per image
  (each with its own seeded generator here, so its images are comparable);
- ``bksdm batch B`` for each ``--batches`` B: :func:`bksdm.eval.generate.generate_images`, the code path of
  ``bksdm generate``, which puts B prompts in one pipeline call with one seeded generator per prompt.

Only generation is timed: writing PNGs, loading the model and starting processes are left out of every mode.
Each repeat times ``--count`` images per mode; modes alternate their order on every repeat so that drift (other
load on the machine, thermals) falls on all of them; images/s = count / median time. The speed-up is a ratio of
medians measured side by side in one process (compare as ratios, never absolute times across machines). The
record also checks the images: bksdm at batch 1 must equal the diffusers loop exactly (same seeds, same calls);
larger batches may differ by float rounding (convolution kernels are chosen by batch shape).

Default model: the bundled shapes teacher. While its trained weights are not in ``bksdm/world/assets/teacher``,
the script uses ``build_untrained_teacher()`` (the same architecture and size, random weights: the same speed)
and says so in the table and the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from bksdm.devices import parse_dtype
from bksdm.eval.generate import generate_images, prompt_seed
from bksdm.loading import load_pipeline
from bksdm.profiling import device_name
from bksdm.world.shapes import all_scenes

LOOP = "diffusers loop"
SEED = 0


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, str, dict]:
    """The pipeline, a description of it, and its sampling defaults (steps, guidance)."""
    from bksdm.world.teacher import TEACHER_DIR, build_untrained_teacher, recommended_settings

    if args.model:
        pipe = load_pipeline(args.model, dtype, str(device))
        return pipe, args.model, {"num_inference_steps": 25, "guidance_scale": 7.5}
    settings = recommended_settings()
    if (TEACHER_DIR / "model_index.json").is_file():
        return load_pipeline(TEACHER_DIR, dtype, str(device)), f"bundled shapes teacher ({TEACHER_DIR})", settings
    log(f"no trained teacher in {TEACHER_DIR}: timing build_untrained_teacher() (same architecture, random weights)")
    pipe = build_untrained_teacher(seed=SEED).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return (
        pipe,
        "untrained shapes teacher (build_untrained_teacher(): trained weights not in the package yet)",
        settings,
    )


def run_mode(pipe, mode: str, prompts: list[str], seeds: list[int], settings: dict[str, Any], device: torch.device):
    """Generate one image per prompt in ``mode``; returns the PIL images."""
    if mode == LOOP:
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            result = pipe(
                prompt,
                num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance"],
                height=settings["height"],
                width=settings["width"],
                generator=torch.Generator("cpu").manual_seed(seed),
            )
            images.extend(result.images)
        return images
    batch = int(mode.rsplit(" ", 1)[1])
    return generate_images(
        pipe,
        prompts,
        seeds,
        steps=settings["steps"],
        guidance_scale=settings["guidance"],
        batch_size=batch,
        height=settings["height"],
        width=settings["width"],
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the model, warms up and times every mode; returns the JSON record."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    tick = time.perf_counter()
    pipe, model, defaults = load_model(args, device, parse_dtype(dtype_name))
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - tick
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = {
        "steps": args.steps or int(defaults["num_inference_steps"]),
        "guidance": args.guidance if args.guidance is not None else float(defaults["guidance_scale"]),
        "height": args.resolution or native,
        "width": args.resolution or native,
        "scheduler": type(pipe.scheduler).__name__,
    }
    captions = [scene.caption for scene in all_scenes()]
    prompts = [captions[(7 * i) % len(captions)] for i in range(args.count)]  # varied, reproducible
    seeds = [prompt_seed(SEED, i) for i in range(args.count)]
    modes = [LOOP, *[f"bksdm batch {b}" for b in args.batches]]
    log(f"{model} on {describe_device(device)}: {settings}, loaded in {load_s:.1f} s")

    # Warm-up: one batch per mode on other prompts (first calls allocate, pick kernels, fill caches).
    for _ in range(args.warmup):
        for mode in modes:
            n = 1 if mode == LOOP else int(mode.rsplit(" ", 1)[1])
            run_mode(pipe, mode, captions[-n:], seeds[:1] * n, settings, device)

    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu_times: dict[str, list[float]] = {m: [] for m in modes}
    images: dict[str, list] = {}
    load_before = _loadavg()
    for repeat in range(args.repeats):
        order = modes if repeat % 2 == 0 else modes[::-1]
        for mode in order:
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            images[mode] = run_mode(pipe, mode, prompts, seeds, settings, device)
            _sync(device)
            elapsed = time.perf_counter() - start
            times[mode].append(elapsed)
            cpu_times[mode].append(time.process_time() - cpu_start)
            log(
                f"[repeat {repeat + 1}/{args.repeats}] {mode:<16} {elapsed:8.3f} s  {args.count / elapsed:.3f} images/s"
            )

    reference = np.stack([np.asarray(im, dtype=np.int16) for im in images[LOOP]])
    results = {}
    for mode in modes:
        median = statistics.median(times[mode])
        diff = np.abs(np.stack([np.asarray(im, dtype=np.int16) for im in images[mode]]) - reference)
        results[mode] = {
            "images_per_s": args.count / median,
            "s_median": median,
            "s_min": min(times[mode]),
            "times_s": times[mode],
            "process_cpu_times_s": cpu_times[mode],
            # Against the diffusers loop's images (same prompts and seeds), in 8-bit levels.
            "max_pixel_diff_vs_loop": int(diff.max()),
            "fraction_pixels_differing_vs_loop": float((diff > 0).mean()),
        }
    base = results[LOOP]["images_per_s"]
    for r in results.values():
        r["speedup_vs_loop"] = r["images_per_s"] / base
    return {
        "benchmark": "generate_throughput",
        "model": model,
        "settings": {
            **settings,
            "count": args.count,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "dtype": dtype_name,
            "batches": args.batches,
            "seed": SEED,
        },  # fmt: skip
        "environment": {
            "device": describe_device(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": _loadavg(),
        },
        "load_s": load_s,
        "results": results,
    }


def table(record: dict[str, Any]) -> str:
    """The results as a Markdown table, with the settings above it."""
    s, env = record["settings"], record["environment"]
    lines = [
        f"generate_throughput: {record['model']}",
        f"{s['height']}x{s['width']} px, {s['steps']} steps {s['scheduler']}, guidance {s['guidance']}, {s['dtype']}, "
        f"{s['count']} images per mode x {s['repeats']} repeats (+{s['warmup']} warm-up)",
        f"device {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, 1-min load average "
        f"{_load(env['loadavg_1min_before'])} (start) -> {_load(env['loadavg_1min_after'])} (end)",
        "",
        "| mode | images/s | s per image, median (min) | speed-up | same images as the loop |",
        "|---|---:|---:|---:|---|",
    ]
    for mode, r in record["results"].items():
        same = (
            "reference"
            if mode == LOOP
            else "identical"
            if r["max_pixel_diff_vs_loop"] == 0
            else f"max diff {r['max_pixel_diff_vs_loop']}/255 on {100 * r['fraction_pixels_differing_vs_loop']:.3f}%"
        )
        per = s["count"]
        lines.append(
            f"| {mode} | {r['images_per_s']:.4g} | {r['s_median'] / per:.4f} ({r['s_min'] / per:.4f}) "
            f"| {r['speedup_vs_loop']:.2f}x | {same} |"
        )
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _load(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    return device_name(device)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: the bundled teacher)")
    parser.add_argument("--count", type=int, default=16, help="images per mode and repeat (default 16)")
    parser.add_argument("--batches", default="1,8", help="bksdm batch sizes to time (default 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per mode (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per mode first (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's recommended)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: recommended / 7.5)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default: native)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generate_throughput.json"))
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.count < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("need --batches >= 1, --count >= 1, --repeats >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    record = run(args)
    print(table(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
