"""The profile job: measure a pipeline's components, for ``bksdm profile`` and ``bksdm report``.

- :func:`profile_components` counts parameters and MACs (on weightless ``meta`` copies, so counting is free
  even for SDXL or FLUX.1's 12B transformer) and, when asked, times every component and the peak memory. It
  returns one flat, JSON-ready dict; it prints nothing.
- :func:`bksdm.eval.per_image.per_image` says where one image's work goes (text encoders, ``steps`` denoiser steps,
  one VAE decode), each part with its MACs and seconds and its share of the image;
  :func:`~bksdm.eval.per_image.measured_breakdown` sets the same parts against one real pipeline call, so what
  composing leaves out is measured, not assumed.
- :func:`bksdm.eval.profile_job.profile_pipeline` is ``bksdm profile``: it loads the components, checks them,
  calls this, times a stock pipeline call where there is one, and writes the JSON.

Any denoiser family (:mod:`bksdm.families`) is measured the same way: its ``step_macs`` count one step and its
``mac_inputs`` are the synthetic inputs of the timed steps. Per-image latency is *composed*: text encoders +
``steps`` x one denoiser step + one VAE decode, each timed on its own with synthetic inputs. Architecture presets
have no tokenizer (and need none to be timed), and composing shows each component's cost apart; the scheduler,
image post-processing and Python overhead show up only in the end-to-end call.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import diffusers
import torch
from torch import nn

from bksdm.devices import dtype_name
from bksdm.eval.components import prompt_length, vae_scale_factor
from bksdm.eval.per_image import GUIDED_TWICE, per_image
from bksdm.families import Family, family_of
from bksdm.plan.prune import vae_decoder_params
from bksdm.profiling import (
    LatencyStat,
    count_macs,
    count_params,
    device_name,
    measure_latency,
    peak_memory,
    vae_decoder_inputs,
)

__all__ = ["IMAGE_CFG_FORMULA", "IMAGE_FORMULA", "profile_components"]

logger = logging.getLogger(__name__)

# profiling.vae_decoder_inputs takes a pixel resolution and divides it by SD's factor 8; a VAE with another
# factor is handled by passing latent side x 8.
_PROFILING_SCALE = 8


IMAGE_FORMULA = "text_encoder_s + steps * denoiser_step_s + vae_decode_s"
IMAGE_CFG_FORMULA = "2 * text_encoder_s + steps * denoiser_step_cfg_s + vae_decode_s"
LATENCY_NOTE = (
    "per-image figures are composed from separately timed components (text encoders, one denoiser step, one "
    "VAE decode, synthetic inputs): architecture presets have no tokenizer, and composing shows each component "
    "apart; with classifier-free guidance the prompt and the negative prompt are two text-encoder calls and every "
    "denoiser step runs at batch 2 (FLUX.1's true CFG: two calls at batch 1); the scheduler, image post-processing "
    "and Python overhead are in end_to_end, where a stock pipeline call was timed"
)

# ------------------------------------------------------------------------------------------- measuring


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _meta_copy(module: nn.Module) -> nn.Module:
    """A weightless copy built from the module's config: counting MACs then allocates nothing."""
    if _on_meta(module):
        return module
    with torch.device("meta"):
        if isinstance(module, diffusers.ConfigMixin):
            return type(module).from_config(copy.deepcopy(dict(module.config))).eval()
        return type(module)(copy.deepcopy(module.config)).eval()  # a transformers model


def _stat_entries(name: str, stat: LatencyStat) -> dict[str, Any]:
    return {f"{name}_s": stat.median, f"{name}_min_s": stat.min, f"{name}_times_s": list(stat.times)}


def step_inputs(
    family: Family,
    config: Mapping[str, Any],
    resolution: int,
    vae_scale: int,
    batch: int,
    device,
    dtype,
    text_tokens: int | None = None,
) -> dict[str, Any]:
    """Synthetic inputs of one denoiser step: the family's ``mac_inputs`` (batch 1) at ``batch`` and ``dtype``.

    Floating tensors take ``dtype``; every tensor whose leading dimension is the batch of 1 is repeated ``batch``
    times (FLUX's position ids, (tokens, 3), have no batch dimension and stay as they are).
    """

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            value = value.to(dtype)
        return value.repeat(batch, *[1] * (value.ndim - 1)) if value.ndim and value.shape[0] == 1 else value

    return convert(family.mac_inputs(config, resolution, device, vae_scale, text_tokens))


def profile_components(
    denoiser: nn.Module,
    text_encoders: Mapping[str, nn.Module],
    vae: nn.Module,
    resolution: int,
    *,
    latency: bool = True,
    steps: int = 25,
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Parameters, MACs and (optionally) latency and peak memory of a pipeline's components.

    MACs are counted on ``meta`` copies built from the configs: the denoiser for one step at batch 1
    (``family.step_macs``) on the text tokens the pipeline gives it (``family.text_tokens`` of the encoders' prompt
    lengths, reported as ``denoiser_text_tokens``: SD3's 77 + 256, FLUX.1-dev's 512 T5 tokens, schnell's 256), each
    text encoder on its prompt length (:func:`~bksdm.eval.components.prompt_length`: 77 for CLIP),
    and ``vae.decoder`` on one latent of the resolution. ``*_macs`` is the paper's count (convolutions and linear
    layers); ``*_macs_with_attention`` adds the attention matrix products. See :mod:`bksdm.profiling`.

    With ``latency`` every component is timed on synthetic inputs (``warmup`` untimed calls, then
    ``repeats`` timed ones; medians reported, minima and all times kept): a denoiser step at batch 1 and a guided
    one (classifier-free guidance: batch 2, or two calls at batch 1 for :data:`GUIDED_TWICE`), each text encoder at
    batch 1, and ``vae.decode`` at batch 1. The
    per-image figures are composed from these (see :data:`IMAGE_FORMULA`, :data:`IMAGE_CFG_FORMULA`).
    Peak memory is measured over one guided image's worth of work (text encoders twice, one denoiser step at
    batch 2, one decode): on CUDA the peak of allocated memory, weights included; on CPU the process's
    peak resident set size, which includes everything the process ever held.

    Args:
        denoiser: The U-Net or transformer (any family of :mod:`bksdm.families`).
        text_encoders: Text encoder(s) by component name.
        vae: The VAE (``AutoencoderKL``-like, with ``decoder``, ``decode`` and ``config``).
        resolution: Image side in pixels; the latent side is ``resolution // vae_scale_factor(vae)``.
        latency: Time the components and measure peak memory (needs real weights, not ``meta``).
        steps: Denoising steps per image for the composed per-image latency.
        repeats: Timed calls per component.
        warmup: Untimed calls per component before timing.
        device: Where the modules live; ``None`` takes the denoiser's device.
        dtype: Dtype of the synthetic inputs; ``None`` takes the denoiser's parameter dtype.
        on_stage: Called with a short description before each slow stage (for progress output).

    Returns:
        A flat dict of numbers and strings (plus ``text_encoders``, a dict per encoder with its ``class``,
        ``tokens``, ``params`` and MACs), ready for ``json.dumps``: ``family``, ``denoiser_class``,
        ``denoiser_params``, ``denoiser_macs``, ``denoiser_macs_with_attention`` (for U-Nets also the same three
        as ``unet_*``), ``text_encoder_params``/``_macs``/``_macs_with_attention`` (summed over encoders),
        ``vae_decoder_params``/``_macs``/``_macs_with_attention``, ``whole_params`` (denoiser + text encoders
        + VAE decoder, the paper's "whole model"), ``resolution``, ``latent_size``, ``steps``, ``device``,
        ``dtype``, ``torch_version``, ``diffusers_version``, ``guidance_mode``, ``image_macs`` and
        ``image_cfg_macs`` (with ``_with_attention``), ``per_image`` and ``per_image_cfg``
        (:func:`per_image`, without and with guidance); with ``latency`` also ``denoiser_step_s``,
        ``denoiser_step_cfg_s`` (for U-Nets also as ``unet_step_s``, ``unet_step_cfg_s``), ``text_encoder_s``,
        ``vae_decode_s`` (medians, each with ``_min_s`` and ``_times_s``), ``image_s``, ``image_cfg_s`` (with
        ``_min_s``), ``peak_memory_bytes`` and ``peak_memory_method``.

    Raises:
        ValueError: Bad ``resolution``/``steps``/``repeats``/``warmup``, or ``latency`` on ``meta`` modules.
        UnknownFamilyError: A denoiser of no family bksdm knows.
    """
    family = family_of(denoiser)
    scale = vae_scale_factor(vae)
    # A transformer cuts the latent into 2x2 patches (SD3's patch_size 2, FLUX's packing): twice the VAE's factor.
    multiple, why = (scale, "the VAE's factor") if family.denoiser == "unet" else (2 * scale, "VAE x 2x2 patches")
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple} ({why}), got {resolution}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1, repeats >= 1, warmup >= 0; got {steps}, {repeats}, {warmup}")
    side = resolution // scale
    param = next(denoiser.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype if dtype is not None else param.dtype
    stage = on_stage or logger.info
    config = dict(denoiser.config)

    stage("counting parameters and MACs")
    lengths = {name: prompt_length(encoder, config) for name, encoder in text_encoders.items()}
    tokens = family.text_tokens(config, lengths)
    result: dict[str, Any] = {"resolution": resolution, "latent_size": side, "denoiser_text_tokens": tokens}
    count = family.step_macs(config, resolution, scale, text_tokens=tokens)
    counts = {"params": count_params(denoiser), "macs": count.conv_linear, "macs_with_attention": count.total}
    if family.denoiser == "unet":  # the names U-Net reports have always had
        result |= {f"unet_{key}": value for key, value in counts.items()}
    result |= {"family": family.name, "denoiser_class": type(denoiser).__name__}
    result |= {f"denoiser_{key}": value for key, value in counts.items()}
    encoders: dict[str, dict[str, Any]] = {}
    for name, encoder in text_encoders.items():
        ids = torch.zeros(1, lengths[name], dtype=torch.long, device="meta")
        macs = count_macs(_meta_copy(encoder), ids)
        encoders[name] = {
            "class": type(encoder).__name__,
            "tokens": lengths[name],
            "params": count_params(encoder),
            "macs": macs.conv_linear,
            "macs_with_attention": macs.total,
        }
    result["text_encoders"] = encoders
    for key in ("params", "macs", "macs_with_attention"):
        result[f"text_encoder_{key}"] = sum(e[key] for e in encoders.values())
    latents_meta = vae_decoder_inputs(
        side * _PROFILING_SCALE, latent_channels=vae.config.latent_channels, device="meta"
    )
    vae_count = count_macs(_meta_copy(vae).decoder, latents_meta)
    result |= {
        "vae_decoder_params": vae_decoder_params(vae),
        "vae_decoder_macs": vae_count.conv_linear,
        "vae_decoder_macs_with_attention": vae_count.total,
    }
    result["whole_params"] = result["denoiser_params"] + result["text_encoder_params"] + result["vae_decoder_params"]
    result |= {
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "latency": latency,
        "steps": steps,
        "guidance_mode": "two denoiser calls at batch 1" if family.name in GUIDED_TWICE else "denoiser at batch 2",
    }
    if not latency:
        return _with_images(result)

    modules = [denoiser, vae, *text_encoders.values()]
    if any(_on_meta(m) for m in modules):
        raise ValueError(
            "cannot time modules on the meta device (they have no weights): build them with weights, or "
            "profile without latency"
        )
    result |= {"repeats": repeats, "warmup": warmup}
    with torch.inference_mode():
        timings = _time_components(
            denoiser, family, text_encoders, lengths, vae, resolution, steps, repeats, warmup, device, dtype, stage
        )
    for name, stats in timings.pop("text_encoder_latency").items():
        encoders[name] |= stats
    if family.denoiser == "unet":
        for suffix in ("", "_cfg"):
            for end in ("s", "min_s", "times_s"):
                timings[f"unet_step{suffix}_{end}"] = timings[f"denoiser_step{suffix}_{end}"]
    return _with_images(result | timings)


def _with_images(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the per-image breakdowns and MACs (and times, when timed) from :func:`per_image`."""
    images = {"per_image": per_image(result, guided=False), "per_image_cfg": per_image(result, guided=True)}
    for key, name in (("per_image", "image"), ("per_image_cfg", "image_cfg")):
        result[f"{name}_macs"] = images[key]["image_macs"]
        result[f"{name}_macs_with_attention"] = images[key]["image_macs_with_attention"]
        if "image_s" in images[key]:
            result[f"{name}_s"] = images[key]["image_s"]
    return result | images


def _time_components(
    denoiser: nn.Module,
    family: Family,
    text_encoders: Mapping[str, nn.Module],
    lengths: Mapping[str, int],
    vae: nn.Module,
    resolution: int,
    steps: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    stage: Callable[[str], None],
) -> dict[str, Any]:
    """The timing half of :func:`profile_components` (called under ``inference_mode``)."""
    scale = vae_scale_factor(vae)
    config = dict(denoiser.config)
    tokens = family.text_tokens(config, lengths)
    step_in = step_inputs(family, config, resolution, scale, 1, device, dtype, tokens)
    # One guided step: batch 2, or the same batch-1 call twice for the families that guide that way.
    twice = family.name in GUIDED_TWICE
    guided_in = (
        [step_in, step_in] if twice else [step_inputs(family, config, resolution, scale, 2, device, dtype, tokens)]
    )
    pixels = resolution // scale * _PROFILING_SCALE
    latents = vae_decoder_inputs(pixels, latent_channels=vae.config.latent_channels, device=device, dtype=dtype)
    ids = {name: torch.zeros(1, lengths[name], dtype=torch.long, device=device) for name in text_encoders}

    def timed(fn: Callable[[], Any]) -> LatencyStat:
        return measure_latency(fn, warmup=warmup, repeats=repeats, device=device)

    out: dict[str, Any] = {}
    stage(f"timing one denoiser step, batch 1 ({warmup} warm-up + {repeats} timed)")
    step = timed(lambda: denoiser(**step_in))
    stage(f"timing one denoiser step with classifier-free guidance ({'two calls' if twice else 'batch 2'})")
    step_cfg = timed(lambda: [denoiser(**inputs) for inputs in guided_in])
    text_times = [0.0] * repeats
    encoder_stats: dict[str, dict[str, Any]] = {}
    for name, encoder in text_encoders.items():
        stage(f"timing {name}")
        stat = timed(lambda encoder=encoder, name=name: encoder(ids[name]))
        text_times = [a + b for a, b in zip(text_times, stat.times, strict=True)]
        encoder_stats[name] = _stat_entries("latency", stat)
    stage("timing the VAE decode")
    decode = timed(lambda: vae.decode(latents))
    # Repeat i of "the text encoders" is the sum of every encoder's repeat i: a pipeline runs them in turn.
    text = LatencyStat(times=tuple(text_times)) if text_encoders else LatencyStat(times=(0.0,) * repeats)

    out |= _stat_entries("denoiser_step", step)
    out |= _stat_entries("denoiser_step_cfg", step_cfg)
    out |= _stat_entries("text_encoder", text)
    out |= _stat_entries("vae_decode", decode)
    out["text_encoder_latency"] = encoder_stats
    # image_s and image_cfg_s (medians) come from per_image; the minima are composed here.
    out["image_min_s"] = text.min + steps * step.min + decode.min
    out["image_cfg_min_s"] = 2 * text.min + steps * step_cfg.min + decode.min
    out |= {
        "image_formula": IMAGE_FORMULA,
        "image_cfg_formula": IMAGE_CFG_FORMULA,
        "latency_note": LATENCY_NOTE,
    }

    def one_guided_image() -> None:
        for _ in range(2):  # prompt and negative prompt
            for name, encoder in text_encoders.items():
                encoder(ids[name])
        for inputs in guided_in:
            denoiser(**inputs)
        vae.decode(latents)

    stage("measuring peak memory")
    out["peak_memory_bytes"] = peak_memory(one_guided_image, device=device)
    out["peak_memory_method"] = (
        "CUDA max memory allocated (weights + activations) over text encoders x2, one guided denoiser step, "
        "one VAE decode"
        if device.type == "cuda"
        else "CPU process peak RSS (getrusage high-water mark: all this process ever held, loading included)"
    )
    return out
