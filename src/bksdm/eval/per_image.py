"""Where one image's work and time go: text encoders, ``steps`` denoiser steps, one VAE decode.

:func:`per_image` composes an image from a :func:`bksdm.eval.profile.profile_components` result (each part with its
calls, MACs and seconds and its share); :func:`measured_breakdown` sets the same parts against one real pipeline
call; :func:`teacher_macs` puts a student's figures beside its teacher's. Pure: no files, no prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bksdm.families import family_of

__all__ = ["GUIDED_TWICE", "PARTS", "measured_breakdown", "per_image", "teacher_macs"]

GUIDED_TWICE = frozenset({"flux"})
"""Families whose pipeline runs classifier-free guidance as two denoiser calls at batch 1, not one at batch 2:
FluxPipeline's true CFG (``true_cfg_scale`` with a negative prompt) calls the transformer once for each prompt."""

PARTS = ("text_encoders", "denoiser", "vae_decode")
"""The parts of one image, in the order a pipeline runs them."""


def _calls(family: str, steps: int, guided: bool) -> dict[str, dict[str, int]]:
    """Calls and batch of each part of one image: guidance encodes the negative prompt too and runs the denoiser on
    two samples per step (batch 2, or two calls for :data:`GUIDED_TWICE`)."""
    twice = guided and family in GUIDED_TWICE
    return {
        "text_encoders": {"calls": 2 if guided else 1, "batch": 1},
        "denoiser": {"calls": steps * (2 if twice else 1), "batch": 2 if guided and not twice else 1},
        "vae_decode": {"calls": 1, "batch": 1},
    }


def per_image(result: Mapping[str, Any], guided: bool) -> dict[str, Any]:
    """Where one image's work goes, from a :func:`bksdm.eval.profile.profile_components` result: each part's calls,
    MACs and (when timed) seconds, with its share of the image.

    MACs come from the batch-1 counts and are linear in the batch: text encoders (twice with guidance) + ``steps``
    denoiser steps (two samples each with guidance) + one VAE decode. Seconds are the medians times the calls:
    ``steps`` x the guided step's median (batch 2, or both calls for :data:`GUIDED_TWICE`) with guidance.

    Returns:
        ``{"guidance", "steps", "parts": {text_encoders, denoiser, vae_decode}, "image_macs",
        "image_macs_with_attention"}`` and, when ``result`` is timed, ``"image_s"``. Each part has ``calls``,
        ``batch``, ``macs``, ``macs_with_attention``, ``macs_share`` and, timed, ``s`` and ``share``. The parts sum
        to the image exactly (the image figures are these sums).
    """
    steps = result["steps"]
    parts: dict[str, dict[str, Any]] = _calls(result["family"], steps, guided)
    samples = 2 if guided else 1
    for suffix in ("macs", "macs_with_attention"):
        counts = (result[f"text_encoder_{suffix}"], result[f"denoiser_{suffix}"], result[f"vae_decoder_{suffix}"])
        each = (samples * counts[0], steps * samples * counts[1], counts[2])
        for name, value in zip(PARTS, each, strict=True):
            parts[name][suffix] = value
    out: dict[str, Any] = {"guidance": guided, "steps": steps, "parts": parts}
    out["image_macs"] = sum(p["macs"] for p in parts.values())
    out["image_macs_with_attention"] = sum(p["macs_with_attention"] for p in parts.values())
    for part in parts.values():
        part["macs_share"] = part["macs"] / out["image_macs"]
    if "denoiser_step_s" not in result:
        return out
    step = result["denoiser_step_cfg_s" if guided else "denoiser_step_s"]
    seconds = (samples * result["text_encoder_s"], steps * step, result["vae_decode_s"])
    out["image_s"] = seconds[0] + seconds[1] + seconds[2]
    for name, value in zip(PARTS, seconds, strict=True):
        parts[name] |= {"s": value, "share": value / out["image_s"]}
    return out


def measured_breakdown(breakdown: Mapping[str, Any], measured_s: float, steps_run: int) -> dict[str, Any]:
    """One real pipeline call's seconds split into the composed parts and the rest.

    The denoiser part is counted at the steps the pipeline really ran (PNDM, SD-v1's scheduler, runs one more
    than asked); ``other`` is what no component accounts for: the scheduler, image post-processing (to PIL), the
    safety checker where there is one, Python. It can be slightly negative when the call ran faster than the
    components' medians.

    Args:
        breakdown: A timed :func:`per_image` (guided as the call was).
        measured_s: The call's wall time.
        steps_run: Denoising steps the call ran (its step callbacks).
    """
    parts = breakdown["parts"]
    seconds = {
        "text_encoders": parts["text_encoders"]["s"],
        "denoiser": steps_run * parts["denoiser"]["s"] / breakdown["steps"],
        "vae_decode": parts["vae_decode"]["s"],
    }
    seconds["other"] = measured_s - sum(seconds.values())
    return {
        "composed_s": breakdown["image_s"],
        "gap_s": measured_s - breakdown["image_s"],
        "measured_over_composed": measured_s / breakdown["image_s"],
        "parts_s": seconds,
        "shares": {name: value / measured_s for name, value in seconds.items()},
    }


def teacher_macs(result: Mapping[str, Any], teacher_config: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's per-image MACs beside a student's (same text encoders, VAE, resolution and steps), and the
    ratios the MACs predict for the student's step and image times."""
    family = family_of(teacher_config)
    scale, tokens = result["resolution"] // result["latent_size"], result.get("denoiser_text_tokens")
    count = family.step_macs(dict(teacher_config), result["resolution"], scale, text_tokens=tokens)
    shared = ("steps", "text_encoder_macs", "text_encoder_macs_with_attention", "vae_decoder_macs",
              "vae_decoder_macs_with_attention")  # fmt: skip
    counts = {key: result[key] for key in shared}
    counts |= {"family": family.name, "denoiser_macs": count.conv_linear, "denoiser_macs_with_attention": count.total}
    teacher = {"denoiser_macs": count.conv_linear}
    teacher["image_macs"] = per_image(counts, guided=False)["image_macs"]
    teacher["image_cfg_macs"] = per_image(counts, guided=True)["image_macs"]
    ratio = {
        "denoiser_step": result["denoiser_macs"] / count.conv_linear,
        "image": result["image_macs"] / teacher["image_macs"],
        "image_cfg": result["image_cfg_macs"] / teacher["image_cfg_macs"],
    }
    return {"teacher_macs": teacher, "macs_ratio_to_teacher": ratio}
