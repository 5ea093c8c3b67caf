"""Training throughput of one BK-SDM distillation step: samples/s and peak memory, cached vs uncached.

Usage (from the repository root, with bksdm installed)::

    python benchmarks/train_throughput.py --arch tiny --steps 2            # seconds-long smoke run
    python benchmarks/train_throughput.py --arch sd-v1.4 --plan bk-small --resolution 512 --batch 1 --steps 3

What one "KD step" is, per micro batch, exactly as ``bksdm distill`` does it (``bksdm.train.distill.distill``):

- ``uncached``: VAE-encode the (B, 3, R, R) images and run the text encoder(s) on 77 token ids
  (``bksdm.train.batches.prepare_batch``), then ``draw_noise`` + ``sample_latents`` + ``kd_step`` (teacher forward
  under no_grad, student forward with feature taps) + backward + gradient clipping + AdamW step;
- ``cached``: the same without the VAE and the text encoder: the latent mean/std and text states a
  ``bksdm cache`` would hold are tensors in memory.

Both modes leave out data loading (image decoding and transforms for ``uncached``, reading cache files for
``cached``) and tokenization: this measures compute only. The models are the architecture's real shapes
with random weights (``bksdm.plan.archs``); the student comes from ``build_student(teacher, plan)``. Modes are
timed side by side in one process, alternating their order on every repeat so that drift (thermal, other
load) falls on both; the speed-up is a ratio of medians measured in the same run (DESIGN.md: compare as
ratios, never absolute timings across machines).

Peak memory: on CUDA, ``max_memory_allocated`` with the statistics reset before every step, maxed per mode.
On CPU there is no allocator statistic, so the process's peak resident set size (a high-water mark over
everything the process did, both modes and model building included) is reported once.

Prints a table and writes every raw timing and setting as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler
from torch import nn

from bksdm.devices import parse_dtype
from bksdm.loading import load_plan
from bksdm.plan.archs import ARCHS, build_scheduler, build_text_encoders, build_unet, build_vae, get_arch
from bksdm.plan.surgery import build_student
from bksdm.profiling import TEXT_LENGTH, VAE_SCALE, count_params, device_name
from bksdm.train.config import OptimConfig
from bksdm.train.distill import make_optimizer
from bksdm.train.encoders import encode_images, sample_latents, sdxl_time_ids, vae_dtype
from bksdm.train.kd import LossWeights, draw_noise, kd_step

MODES = ("cached", "uncached")
TINY = "tiny"
SEED = 0
MAX_GRAD_NORM = 1.0  # DistillConfig's default: the trainer clips every step


@dataclass
class Bench:
    """Everything one KD step needs, on the target device."""

    teacher: nn.Module
    student: nn.Module  # possibly the autocast wrapper; the plain student is ``unwrapped``
    unwrapped: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]  # one (SD-v1/v2) or two (SDXL)
    vocab_sizes: list[int]
    scheduler: DDPMScheduler
    feature_pairs: tuple
    optimizer: torch.optim.Optimizer
    grad_scaler: torch.amp.GradScaler | None
    scaling_factor: float
    is_sdxl: bool
    params: dict[str, int]


class _Autocast(nn.Module):
    """Runs the student's forward under autocast, as accelerate's mixed precision does (the weights stay fp32).

    The model sits in ``.module`` so that ``bksdm.train.kd.unwrap`` finds it and the feature taps attach to it.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


def _components(arch: str, device: torch.device) -> tuple[nn.Module, nn.Module, list[nn.Module], dict, int]:
    """Teacher U-Net, VAE, text encoders, scheduler config and native resolution, in fp32 on ``device``."""
    if arch == TINY:
        from bksdm.world.tiny import LATENT_SIZE, VAE_SCALE_FACTOR, build_tiny_pipeline

        pipe = build_tiny_pipeline("sd-v1", seed=SEED)
        encoders = [pipe.text_encoder]
        return (
            pipe.unet.to(device),
            pipe.vae.to(device),
            [e.to(device) for e in encoders],
            dict(pipe.scheduler.config),
            LATENT_SIZE * VAE_SCALE_FACTOR,
        )
    spec = get_arch(arch)
    torch.manual_seed(SEED)
    teacher = build_unet(spec, device=device)
    vae = build_vae(spec, device=device)
    encoders = list(build_text_encoders(spec, device=device).values())
    return teacher, vae, encoders, dict(build_scheduler(spec).config), spec.resolution


def build(args: argparse.Namespace, device: torch.device) -> tuple[Bench, int]:
    """Builds the models as ``bksdm.train.distill.load_models`` does; returns them and the resolution to use."""
    weight_dtype = parse_dtype(args.dtype)
    teacher, vae, encoders, scheduler_config, native = _components(args.arch, device)
    surgery = build_student(teacher, load_plan(args.plan), seed=SEED)
    student = surgery.student
    for module in [teacher, vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
        if weight_dtype != torch.float32:  # (casting to fp32 again would only make diffusers warn)
            module.to(dtype=weight_dtype)
    vae.to(vae_dtype(vae, weight_dtype))  # fp32 where fp16 would overflow, as in the trainer
    student.train()
    optimizer = make_optimizer(student.parameters(), OptimConfig(fused_adam=not args.unfused_adam), lr=5e-5)
    wrapped: nn.Module = student
    scaler = None
    if weight_dtype != torch.float32:
        wrapped = _Autocast(student, device.type, weight_dtype)
        if weight_dtype == torch.float16:
            scaler = torch.amp.GradScaler(device.type)
    params = {
        "teacher_unet": count_params(teacher),
        "student_unet": count_params(student),
        "vae_encoder": count_params(vae.encoder) + count_params(vae.quant_conv),
        "text_encoders": sum(count_params(e) for e in encoders),
    }
    bench = Bench(
        teacher=teacher,
        student=wrapped,
        unwrapped=student,
        vae=vae,
        text_encoders=encoders,
        vocab_sizes=[e.config.vocab_size for e in encoders],
        scheduler=DDPMScheduler.from_config(scheduler_config),
        feature_pairs=surgery.resolved.feature_pairs(),
        optimizer=optimizer,
        grad_scaler=scaler,
        scaling_factor=vae.config.scaling_factor,
        is_sdxl=len(encoders) == 2,
        params=params,
    )
    return bench, args.resolution or native


@torch.no_grad()
def encode_text_ids(bench: Bench, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text states as ``bksdm.train.encoders.encode_text`` computes them, from token ids (B, 77) per encoder."""
    if not bench.is_sdxl:
        return bench.text_encoders[0](ids[0])[0].float(), None  # (B, 77, D)
    states, pooled = [], None
    for encoder, token_ids in zip(bench.text_encoders, ids, strict=True):
        out = encoder(token_ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, P)
            pooled = out[0]
    return torch.cat(states, dim=-1).float(), pooled.float()


def make_inputs(bench: Bench, batch: int, resolution: int, device: torch.device) -> dict[str, Any]:
    """Random images and token ids (uncached mode), and what a cache would hold for them (cached mode)."""
    gen = torch.Generator().manual_seed(SEED)
    pixels = torch.rand(batch, 3, resolution, resolution, generator=gen).mul(2).sub(1).to(device)  # [-1, 1]
    ids = [torch.randint(0, v, (batch, TEXT_LENGTH), generator=gen).to(device) for v in bench.vocab_sizes]
    mean, std = encode_images(bench.vae, pixels)  # (B, 4, R/8, R/8) each
    text, pooled = encode_text_ids(bench, ids)
    return {"pixels": pixels, "ids": ids, "mean": mean, "std": std, "text": text, "pooled": pooled}


def train_step(bench: Bench, inputs: dict[str, Any], mode: str, step: int, device: torch.device) -> tuple[float, float]:
    """One micro batch of the distillation loop.

    Returns:
        The loss (``.item()`` is a sync point, like the trainer's logging) and the seconds spent in the frozen
        encoders (0 in cached mode).
    """
    encode_s = 0.0
    if mode == "uncached":
        _sync(device)
        start = time.perf_counter()
        mean, std = encode_images(bench.vae, inputs["pixels"])
        text, pooled = encode_text_ids(bench, inputs["ids"])
        _sync(device)
        encode_s = time.perf_counter() - start
    else:
        mean, std, text, pooled = inputs["mean"], inputs["std"], inputs["text"], inputs["pooled"]
    batch, resolution = mean.shape[0], mean.shape[-1] * VAE_SCALE
    added = None
    if pooled is not None:
        added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch, resolution, device)}
    timesteps, noise, eps = draw_noise(
        SEED, step, range(batch), tuple(mean.shape[1:]), bench.scheduler.config.num_train_timesteps, device
    )
    latents = sample_latents(mean, std, eps, bench.scaling_factor)  # (B, 4, R/8, R/8)
    losses = kd_step(
        bench.student,
        bench.teacher,
        bench.scheduler,
        latents,
        text,
        timesteps,
        noise,
        bench.feature_pairs,
        LossWeights(),
        added,
    )
    params = bench.unwrapped.parameters()
    if bench.grad_scaler is not None:
        bench.grad_scaler.scale(losses["loss"]).backward()
        bench.grad_scaler.unscale_(bench.optimizer)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        bench.grad_scaler.step(bench.optimizer)
        bench.grad_scaler.update()
    else:
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        bench.optimizer.step()
    bench.optimizer.zero_grad(set_to_none=True)
    return losses["loss"].item(), encode_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds, warms up and times every mode; returns the JSON record."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tick = time.perf_counter()
    bench, resolution = build(args, device)
    build_s = time.perf_counter() - tick
    if resolution % VAE_SCALE:
        raise SystemExit(f"--resolution must be a multiple of {VAE_SCALE}, got {resolution}")
    inputs = make_inputs(bench, args.batch, resolution, device)
    log(f"built in {build_s:.1f} s on {describe_device(device)}; {resolution} px, batch {args.batch}")

    modes = args.modes
    times: dict[str, list[float]] = {m: [] for m in modes}
    warmup_times: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, int] = {m: 0 for m in modes}
    losses: dict[str, list[float]] = {m: [] for m in modes}
    encode_times: dict[str, list[float]] = {m: [] for m in modes}
    cpu_times: dict[str, list[float]] = {m: [] for m in modes}
    load_before = _loadavg()
    step = 0
    total = (args.warmup + args.steps) * len(modes)
    for repeat in range(args.warmup + args.steps):
        # Alternate the order so that neither mode always runs first (drift, caches, allocator state).
        order = modes if repeat % 2 == 0 else modes[::-1]
        for mode in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss, encode_s = train_step(bench, inputs, mode, step, device)
            _sync(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            step += 1
            warm = repeat < args.warmup
            (warmup_times if warm else times)[mode].append(elapsed)
            losses[mode].append(loss)
            if not warm:
                encode_times[mode].append(encode_s)
                cpu_times[mode].append(cpu)
            if device.type == "cuda":
                peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated(device))
            log(
                f"[{step}/{total}] {mode:<8} {'warm-up' if warm else 'timed':<7} {elapsed:8.3f} s "
                f"(VAE + text {encode_s:.3f} s, process CPU {cpu:.1f} s)  loss {loss:.4f}"
            )

    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    results = {}
    for mode in modes:
        median = statistics.median(times[mode])
        results[mode] = {
            "samples_per_s": args.batch / median,
            "s_per_step_median": median,
            "s_per_step_min": min(times[mode]),
            "times_s": times[mode],
            "warmup_times_s": warmup_times[mode],
            "losses": losses[mode],
            "encode_times_s": encode_times[mode],
            "encode_s_median": statistics.median(encode_times[mode]),
            # CPU seconds of this process (all threads) per timed step: on a shared machine, wall time grows
            # with other processes' load while this stays roughly put, so a much larger wall/CPU gap flags it.
            "process_cpu_times_s": cpu_times[mode],
            "peak_memory_bytes": peaks[mode] if device.type == "cuda" else None,
        }
    speedup = speedup_min = None
    if "cached" in results and "uncached" in results:
        speedup = results["cached"]["samples_per_s"] / results["uncached"]["samples_per_s"]
        # From the fastest step of each mode: less sensitive to other processes competing for the cores.
        speedup_min = results["uncached"]["s_per_step_min"] / results["cached"]["s_per_step_min"]
    return {
        "benchmark": "train_throughput",
        "settings": {
            "arch": args.arch,
            "plan": args.plan,
            "resolution": resolution,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": args.dtype,
            "modes": list(modes),
            "loss_weights": asdict(LossWeights()),
            "max_grad_norm": MAX_GRAD_NORM,
            "optimizer": "AdamW (for-each)" if args.unfused_adam else "AdamW (fused)",
        },
        "environment": {
            "device": describe_device(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            # Other processes on the machine inflate the timings; a load well above the thread count says so.
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": _loadavg(),
        },
        "params": bench.params,
        "build_s": build_s,
        "results": results,
        "speedup_cached_over_uncached": speedup,
        "speedup_cached_over_uncached_from_min": speedup_min,
        "process_peak_rss_bytes": rss_peak,
    }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


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


def _load(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def table(record: dict[str, Any]) -> str:
    """The results as a Markdown table, with the settings above it."""
    s, env, res = record["settings"], record["environment"], record["results"]
    cuda = env["device_type"] == "cuda"
    lines = [
        f"train_throughput: {s['arch']} -> {s['plan']}, {s['resolution']} px, batch {s['batch']}, {s['dtype']}, "
        f"{s['steps']} timed steps (+{s['warmup']} warm-up) per mode",
        f"device {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"{env['torch_threads']} torch threads, 1-min load average {_load(env['loadavg_1min_before'])} (start) "
        f"-> {_load(env['loadavg_1min_after'])} (end)",
        f"params: teacher {record['params']['teacher_unet']:,}, student {record['params']['student_unet']:,}",
        "",
        f"| mode | samples/s | s/step median (min) | of which VAE + text | peak memory{' (allocated)' if cuda else ''} "
        "| speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = res.get("uncached", {}).get("samples_per_s")
    for mode, r in res.items():
        speed = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
        memory = _gib(r["peak_memory_bytes"]) if cuda else "see below"
        lines.append(
            f"| {mode} | {r['samples_per_s']:.4g} | {r['s_per_step_median']:.3f} ({r['s_per_step_min']:.3f}) "
            f"| {r['encode_s_median']:.3f} | {memory} | {speed} |"
        )
    if not cuda:
        lines += ["", f"process peak RSS (high-water mark of the whole run): {_gib(record['process_peak_rss_bytes'])}"]
    if record["speedup_cached_over_uncached"] is not None:
        lines.append(
            f"cached / uncached samples/s: {record['speedup_cached_over_uncached']:.2f}x from the medians, "
            f"{record['speedup_cached_over_uncached_from_min']:.2f}x from the fastest steps"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd-v1.4", choices=[*sorted(ARCHS), TINY], help="teacher architecture")
    parser.add_argument("--plan", default="bk-small", help="plan preset or YAML file")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default: the arch's)")
    parser.add_argument("--batch", type=int, default=1, help="micro batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="teacher/VAE/text dtype; fp16/bf16 also train the fp32 student under autocast",
    )
    parser.add_argument("--modes", default=",".join(MODES[::-1]), help="comma-separated: cached, uncached")
    parser.add_argument("--unfused-adam", action="store_true", help="the for-each AdamW (before 0.1: default)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args(argv)
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}; got {args.modes}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --batch >= 1")
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
