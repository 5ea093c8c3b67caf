"""One KD step on an SD3 teacher whose T5 tokens are zeros, with the zeros run as one weighted token or at full length.

Usage (from the repository root, with bksdm installed; offline)::

    python benchmarks/token_runs.py                    # the bundled SD3-shaped teacher, keep-half, batch 32
    python benchmarks/token_runs.py --batch 8 --rounds 5

``bksdm.train.kd.kd_step`` runs a trailing stretch of identical text tokens as one token with log(count) added to its
attention logit (:mod:`bksdm.families.token_runs`); ``fold_text=False`` runs the stock token count. Both are timed on
the same teacher, student and batch, alternating (``--rounds`` of each, forward + backward, the student's gradients
cleared between), so a change in the machine's load hits both alike; the losses of the two are printed beside the
times (they agree to float rounding). Prints a table and writes ``benchmarks/results/token_runs.json`` with the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from cpu_contention import environment

from bksdm.families import denoiser_of, family_of
from bksdm.families.token_runs import fold_tail, trailing_repeats
from bksdm.loading import teacher_or_default
from bksdm.plan.spec import ALL_PRESETS
from bksdm.plan.surgery import build_student
from bksdm.train.kd import LossWeights, draw_noise, kd_step

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="bundled-sd3")
    parser.add_argument("--plan", default="keep-half")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "token_runs.json")
    args = parser.parse_args()

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(teacher_or_default(args.teacher))
    teacher = denoiser_of(pipe).eval().requires_grad_(False)
    family = family_of(teacher)
    resolved = family.resolve(ALL_PRESETS[args.plan], dict(teacher.config))
    student = build_student(teacher, resolved).student.train()
    scheduler = family.training_scheduler(pipe.scheduler.config)
    side = 64 // pipe.vae_scale_factor  # the shapes world's 64-px images
    latent = (teacher.config.in_channels, side, side)
    captions = ["a small red circle at the top left", "a large blue square at the bottom right"] * (args.batch // 2)
    text, pooled = family.encode_prompt(pipe, captions[: args.batch], "cpu")  # (B, 16 + 256, 4096-wide), zeros last
    timesteps, noise, _ = draw_noise(
        0, 0, range(args.batch), latent, 1000, "cpu", family.timestep_sampler(scheduler.config, latent)
    )
    inputs = {
        "latents": torch.randn(args.batch, *latent, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": text,
        "timesteps": timesteps,
        "noise": noise,
        "feature_pairs": resolved.feature_pairs(),
        "weights": LossWeights(),
        "added_cond_kwargs": family.conditioning(pooled, 64, "cpu", teacher.config),
        "family": family,
    }

    def step(fold: bool) -> tuple[float, float]:
        student.zero_grad(set_to_none=True)
        began = time.perf_counter()
        losses = kd_step(student, teacher, scheduler, **inputs, fold_text=fold)
        losses["loss"].backward()
        return time.perf_counter() - began, losses["loss"].item()

    for fold in (True, False):  # warm-up: first calls pack weights and allocate
        step(fold)
    times: dict[str, list[float]] = {"folded": [], "full": []}
    loss: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fold in (("folded", True), ("full", False)):
            seconds, loss[name] = step(fold)
            times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = {
        "folded": {"text_tokens": fold_tail(text, trailing_repeats(text)).shape[1]},
        "full": {"text_tokens": text.shape[1]},
    }
    for name in rows:
        rows[name] |= {
            "step_s": median[name],
            "samples_per_s": args.batch / median[name],
            "loss": loss[name],
            "times_s": times[name],
        }
    speedup = median["full"] / median["folded"]
    print(f"{args.teacher}, {args.plan}, batch {args.batch}, {args.rounds} alternating rounds, medians")
    print(f"{'text stream':<12} {'tokens':>6} {'KD step (s)':>12} {'samples/s':>10} {'loss':>10}")
    for name, row in rows.items():
        print(
            f"{name:<12} {row['text_tokens']:>6} {row['step_s']:>12.3f} {row['samples_per_s']:>10.1f} "
            f"{row['loss']:>10.6f}"
        )
    print(f"speed-up of the folded step: {speedup:.2f}x")
    result = {
        "environment": environment(),
        "settings": vars(args) | {"out": str(args.out)},
        "rows": rows,
        "speedup": speedup,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
