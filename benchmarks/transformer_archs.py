"""What each transformer preset makes of the published SD3 / SD3.5 / FLUX.1 teachers: size, cost, kept blocks.

For every architecture of :mod:`bksdm.plan.dit_archs` and every preset of
:data:`bksdm.plan.spec.TRANSFORMER_PRESETS` (and ``identity``, the teacher itself), the plan is resolved by the
architecture's family against the published ``transformer/config.json``, and the student is built on the meta
device from its config (no download, no memory): its denoiser parameters, its MACs for one denoiser step at batch
1 and 1024 px (conv + linear, the BK-SDM paper's count, and with the attention products; text as the pipelines
give it: SD3 77 + 256 tokens, FLUX.1-dev 512 T5 tokens, schnell 256), and the teacher indices each stack keeps.
Also the whole pipeline's parameters per architecture (denoiser + text encoders + VAE decoder, as ``bksdm
profile`` counts them). Prints a table and writes ``benchmarks/results/transformer_archs.json``.

Usage::

    python benchmarks/transformer_archs.py [--out benchmarks/results/transformer_archs.json]

Counting only: takes about a second per (architecture, preset) on one CPU core; no timing, so the figures are the
same on every machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import diffusers
import torch

from bksdm.eval.profile_job import ProfileOptions, profile_pipeline
from bksdm.families import family_of
from bksdm.plan.archs import build_denoiser
from bksdm.plan.dit_archs import TRANSFORMER_ARCHS
from bksdm.plan.spec import PRESETS, TRANSFORMER_PRESETS
from bksdm.profiling import count_params

RESOLUTION = 1024
PLANS = {"identity": PRESETS["identity"], **TRANSFORMER_PRESETS}


def measure(arch_name: str, plan_name: str) -> dict[str, Any]:
    """One (architecture, preset): the student's denoiser params, MACs per step and kept blocks."""
    arch = TRANSFORMER_ARCHS[arch_name]
    teacher = dict(arch.denoiser_config)
    family = family_of(teacher)
    resolved = family.resolve(PLANS[plan_name], teacher)
    student = resolved.student_config()
    macs = family.step_macs(student, RESOLUTION, 8)
    return {
        "arch": arch_name,
        "plan": plan_name,
        "denoiser_params": count_params(build_denoiser(student)),
        "denoiser_macs": macs.conv_linear,
        "denoiser_macs_with_attention": macs.total,
        "kept": {stack.spec.address: list(stack.kept) for stack in resolved.stacks},
        "depth": {stack.spec.address: stack.depth for stack in resolved.stacks},
        "config_updates": dict(resolved.updates),
    }


def _kept(row: dict[str, Any]) -> str:
    parts = []
    for stack, kept in row["kept"].items():
        short = "single" if stack.startswith("single") else "joint" if row["arch"].startswith("sd3") else "double"
        shown = "all" if len(kept) == row["depth"][stack] else ",".join(map(str, kept))
        parts.append(f"{short} {len(kept)}/{row['depth'][stack]}: {shown}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transformer_archs.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    rows = [measure(arch, plan) for arch in TRANSFORMER_ARCHS for plan in PLANS]
    wholes = {}
    for arch in TRANSFORMER_ARCHS:
        profile = profile_pipeline(ProfileOptions(arch=arch, latency=False))
        wholes[arch] = {
            "denoiser_params": profile["denoiser_params"],
            "text_encoders": {k: e["params"] for k, e in profile["text_encoders"].items()},
            "vae_decoder_params": profile["vae_decoder_params"],
            "whole_params": profile["whole_params"],
            "text_encoder_macs": profile["text_encoder_macs"],
            "vae_decoder_macs": profile["vae_decoder_macs"],
        }
    elapsed = time.perf_counter() - start

    teacher = {r["arch"]: r for r in rows if r["plan"] == "identity"}
    print(f"Transformer presets at {RESOLUTION} px, one denoiser step, batch 1 (counted on the meta device)\n")
    header = f"{'arch':<15}{'plan':<17}{'params':>16}{'share':>7}{'MACs/step':>11}{'+attention':>11}  kept blocks"
    print(header)
    print("-" * len(header))
    for r in rows:
        share = r["denoiser_params"] / teacher[r["arch"]]["denoiser_params"]
        print(
            f"{r['arch']:<15}{r['plan']:<17}{r['denoiser_params']:>16,}{share:>7.1%}"
            f"{r['denoiser_macs'] / 1e12:>10.2f}T{r['denoiser_macs_with_attention'] / 1e12:>10.2f}T  {_kept(r)}"
        )
    print("\nWhole pipelines (denoiser + text encoders + VAE decoder):\n")
    for arch, w in wholes.items():
        encoders = " + ".join(f"{p:,}" for p in w["text_encoders"].values())
        parts = f"{w['denoiser_params']:,} + ({encoders}) + {w['vae_decoder_params']:,}"
        print(f"{arch:<15}{w['whole_params']:>16,} = {parts}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "resolution": RESOLUTION,
        "presets": rows,
        "pipelines": wholes,
        "seconds": elapsed,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "python": platform.python_version(),
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out} ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
