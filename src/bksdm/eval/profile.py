"""The profile job: measure a pipeline's components, for ``bksdm profile`` and ``bksdm report``.

- :func:`profile_components` counts parameters and MACs (on weightless ``meta`` copies, so counting is free
  even for SDXL) and, when asked, times every component and the peak memory. It returns one flat,
  JSON-ready dict; it prints nothing.
- :func:`profile_pipeline` is ``bksdm profile``: it loads the components (:func:`bksdm.eval.components
  .load_components`), refuses a resolution whose timed calls would not fit in memory, measures them, times the
  ONNX Runtime U-Net beside PyTorch's when asked, and writes the JSON.

Per-image latency is *composed*, not measured end to end: text encoders + ``steps`` x one U-Net step + one
VAE decode, each timed on its own with synthetic inputs. Architecture presets have no tokenizer (and need
none to be timed), and composing keeps the figure free of scheduler and image post-processing overheads,
which are the same for every student.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from bksdm.eval.components import vae_scale_factor
from bksdm.loading import dtype_name
from bksdm.plan.prune import vae_decoder_params
from bksdm.profiling import (
    LatencyStat,
    count_macs,
    count_params,
    device_name,
    measure_latency,
    peak_memory,
    text_encoder_inputs,
    unet_inputs,
    vae_decoder_inputs,
)

__all__ = ["ProfileOptions", "profile_components", "profile_pipeline"]

logger = logging.getLogger(__name__)

# profiling.unet_inputs / vae_decoder_inputs take a pixel resolution and divide it by SD's factor 8; a VAE
# with another factor is handled by passing latent side x 8.
_PROFILING_SCALE = 8


IMAGE_FORMULA = "text_encoder_s + steps * unet_step_s + vae_decode_s"
IMAGE_CFG_FORMULA = "2 * text_encoder_s + steps * unet_step_cfg_s + vae_decode_s"
LATENCY_NOTE = (
    "per-image figures are composed from separately timed components (text encoders, one U-Net step, one "
    "VAE decode, synthetic inputs): architecture presets have no tokenizer, and composing leaves out "
    "scheduler and image post-processing overheads; with classifier-free guidance the prompt and the "
    "negative prompt are two text-encoder calls and every U-Net step runs at batch 2"
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


def _text_length(encoder: nn.Module) -> int:
    # SD tokenizers pad to 77; a (tiny) encoder with fewer positions cannot take that many.
    length = text_encoder_inputs().shape[1]
    return min(length, getattr(encoder.config, "max_position_embeddings", length))


def _stat_entries(name: str, stat: LatencyStat) -> dict[str, Any]:
    return {f"{name}_s": stat.median, f"{name}_min_s": stat.min, f"{name}_times_s": list(stat.times)}


def profile_components(
    unet: nn.Module,
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

    MACs are counted on ``meta`` copies built from the configs: the U-Net for one step at batch 1, each
    text encoder on 77 tokens, and ``vae.decoder`` on one latent of the resolution. ``*_macs`` is the
    paper's count (convolutions and linear layers); ``*_macs_with_attention`` adds the attention matrix
    products. See :mod:`bksdm.profiling`.

    With ``latency`` every component is timed on synthetic inputs (``warmup`` untimed calls, then
    ``repeats`` timed ones; medians reported, minima and all times kept): a U-Net step at batch 1 and at
    batch 2 (classifier-free guidance), each text encoder at batch 1, and ``vae.decode`` at batch 1. The
    per-image figures are composed from these (see :data:`IMAGE_FORMULA`, :data:`IMAGE_CFG_FORMULA`).
    Peak memory is measured over one guided image's worth of work (text encoders twice, one U-Net step at
    batch 2, one decode): on CUDA the peak of allocated memory, weights included; on CPU the process's
    peak resident set size, which includes everything the process ever held.

    Args:
        unet: The U-Net.
        text_encoders: Text encoder(s) by component name.
        vae: The VAE (``AutoencoderKL``-like, with ``decoder``, ``decode`` and ``config``).
        resolution: Image side in pixels; the latent side is ``resolution // vae_scale_factor(vae)``.
        latency: Time the components and measure peak memory (needs real weights, not ``meta``).
        steps: Denoising steps per image for the composed per-image latency.
        repeats: Timed calls per component.
        warmup: Untimed calls per component before timing.
        device: Where the modules live; ``None`` takes the U-Net's device.
        dtype: Dtype of the synthetic inputs; ``None`` takes the U-Net's parameter dtype.
        on_stage: Called with a short description before each slow stage (for progress output).

    Returns:
        A flat dict of numbers and strings (plus ``text_encoders``, a dict per encoder), ready for
        ``json.dumps``: ``unet_params``, ``unet_macs``, ``unet_macs_with_attention``,
        ``text_encoder_params``/``_macs``/``_macs_with_attention`` (summed over encoders),
        ``vae_decoder_params``/``_macs``/``_macs_with_attention``, ``whole_params`` (U-Net + text encoders
        + VAE decoder, the paper's "whole model"), ``resolution``, ``latent_size``, ``device``, ``dtype``,
        ``torch_version``, ``diffusers_version``; with ``latency`` also ``unet_step_s``,
        ``unet_step_cfg_s``, ``text_encoder_s``, ``vae_decode_s`` (medians, each with ``_min_s`` and
        ``_times_s``), ``image_s``, ``image_cfg_s`` (with ``_min_s``), ``peak_memory_bytes`` and
        ``peak_memory_method``.

    Raises:
        ValueError: Bad ``resolution``/``steps``/``repeats``/``warmup``, or ``latency`` on ``meta`` modules.
    """
    scale = vae_scale_factor(vae)
    if resolution <= 0 or resolution % scale:
        raise ValueError(f"resolution must be a positive multiple of {scale} (the VAE's factor), got {resolution}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1, repeats >= 1, warmup >= 0; got {steps}, {repeats}, {warmup}")
    side = resolution // scale
    param = next(unet.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype if dtype is not None else param.dtype
    stage = on_stage or logger.info
    unet_config = dict(unet.config)
    latent_channels = vae.config.latent_channels

    stage("counting parameters and MACs")
    result: dict[str, Any] = {"resolution": resolution, "latent_size": side}
    unet_count = count_macs(_meta_copy(unet), **unet_inputs(unet_config, side * _PROFILING_SCALE, device="meta"))
    result |= {
        "unet_params": count_params(unet),
        "unet_macs": unet_count.conv_linear,
        "unet_macs_with_attention": unet_count.total,
    }
    encoders: dict[str, dict[str, Any]] = {}
    for name, encoder in text_encoders.items():
        ids = torch.zeros(1, _text_length(encoder), dtype=torch.long, device="meta")
        count = count_macs(_meta_copy(encoder), ids)
        encoders[name] = {
            "class": type(encoder).__name__,
            "params": count_params(encoder),
            "macs": count.conv_linear,
            "macs_with_attention": count.total,
        }
    result["text_encoders"] = encoders
    for key in ("params", "macs", "macs_with_attention"):
        result[f"text_encoder_{key}"] = sum(e[key] for e in encoders.values())
    latents_meta = vae_decoder_inputs(side * _PROFILING_SCALE, latent_channels=latent_channels, device="meta")
    vae_count = count_macs(_meta_copy(vae).decoder, latents_meta)
    result |= {
        "vae_decoder_params": vae_decoder_params(vae),
        "vae_decoder_macs": vae_count.conv_linear,
        "vae_decoder_macs_with_attention": vae_count.total,
    }
    result["whole_params"] = result["unet_params"] + result["text_encoder_params"] + result["vae_decoder_params"]
    result |= {
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "latency": latency,
    }
    if not latency:
        return result

    modules = [unet, vae, *text_encoders.values()]
    if any(_on_meta(m) for m in modules):
        raise ValueError(
            "cannot time modules on the meta device (they have no weights): build them with weights, or "
            "profile without latency"
        )
    result |= {"steps": steps, "repeats": repeats, "warmup": warmup}
    with torch.inference_mode():
        timings = _time_components(unet, text_encoders, vae, side, steps, repeats, warmup, device, dtype, stage)
    for name, stats in timings.pop("text_encoder_latency").items():
        encoders[name] |= stats
    return result | timings


def _time_components(
    unet: nn.Module,
    text_encoders: Mapping[str, nn.Module],
    vae: nn.Module,
    side: int,
    steps: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    stage: Callable[[str], None],
) -> dict[str, Any]:
    """The timing half of :func:`profile_components` (called under ``inference_mode``)."""
    pixels = side * _PROFILING_SCALE
    unet_config = dict(unet.config)
    step_in = unet_inputs(unet_config, pixels, batch=1, device=device, dtype=dtype)
    cfg_in = unet_inputs(unet_config, pixels, batch=2, device=device, dtype=dtype)
    latents = vae_decoder_inputs(pixels, latent_channels=vae.config.latent_channels, device=device, dtype=dtype)
    ids = {name: torch.zeros(1, _text_length(e), dtype=torch.long, device=device) for name, e in text_encoders.items()}

    def timed(fn: Callable[[], Any]) -> LatencyStat:
        return measure_latency(fn, warmup=warmup, repeats=repeats, device=device)

    out: dict[str, Any] = {}
    stage(f"timing one U-Net step, batch 1 ({warmup} warm-up + {repeats} timed)")
    step = timed(lambda: unet(**step_in))
    stage("timing one U-Net step, batch 2 (classifier-free guidance)")
    step_cfg = timed(lambda: unet(**cfg_in))
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

    out |= _stat_entries("unet_step", step)
    out |= _stat_entries("unet_step_cfg", step_cfg)
    out |= _stat_entries("text_encoder", text)
    out |= _stat_entries("vae_decode", decode)
    out["text_encoder_latency"] = encoder_stats
    out["image_s"] = text.median + steps * step.median + decode.median
    out["image_min_s"] = text.min + steps * step.min + decode.min
    out["image_cfg_s"] = 2 * text.median + steps * step_cfg.median + decode.median
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
        unet(**cfg_in)
        vae.decode(latents)

    stage("measuring peak memory")
    out["peak_memory_bytes"] = peak_memory(one_guided_image, device=device)
    out["peak_memory_method"] = (
        "CUDA max memory allocated (weights + activations) over text encoders x2, one U-Net step at batch 2, "
        "one VAE decode"
        if device.type == "cuda"
        else "CPU process peak RSS (getrusage high-water mark: all this process ever held, loading included)"
    )
    return out


# ------------------------------------------------------------------------------------------ the job


@dataclass
class ProfileOptions:
    """What ``bksdm profile`` measures: a pipeline (``model``) or an architecture preset (``arch``), not both."""

    model: str | None = None
    """A diffusers pipeline folder or hub id."""
    arch: str | None = None
    """An architecture preset (:data:`bksdm.plan.archs.ARCHS`), with random weights."""
    plan: str | os.PathLike | None = None
    """A plan (preset name or YAML) applied to the U-Net first."""
    resolution: int | None = None
    """Image side in pixels; None: the model's native one."""
    steps: int = 25
    """Denoising steps per image (the composed per-image latency)."""
    repeats: int = 3
    warmup: int = 1
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: CUDA if available."""
    dtype: str | None = None
    """``fp32``, ``fp16`` or ``bf16``; None: fp16 on CUDA, fp32 elsewhere."""
    latency: bool = True
    """Time the components (loads weights); False only counts parameters and MACs."""
    onnx: str | os.PathLike | None = None
    """A folder of ``bksdm export onnx``: also time its U-Net in ONNX Runtime (CPU, fp32)."""


def profile_pipeline(
    options: ProfileOptions, out: str | os.PathLike | None = None, on_stage: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The job of ``bksdm profile``: load, check, measure, and write the result to ``out`` (when given).

    Returns:
        :func:`profile_components`' dict with ``source`` and ``plan`` first (and ``onnx`` with ``options.onnx``).

    Raises:
        ValueError: Bad option values, or an unknown architecture.
        SamplingError: The resolution's timed calls would not fit in memory.
        PlanError: The plan is malformed or does not fit the U-Net.
        TeacherNotFoundError: The model is neither a pipeline folder nor a reachable hub repo.
        WriteFailed: ``out`` could not be written.
    """
    from bksdm.artifacts import atomic_file
    from bksdm.eval.components import load_components
    from bksdm.loading import resolve_device, resolve_dtype, teacher_or_default

    say = on_stage or (lambda message: None)
    model = options.model
    if model is None and options.arch is None:  # nothing given: the bundled shapes teacher
        model = teacher_or_default(None)
    if options.steps < 1 or options.repeats < 1 or options.warmup < 0:
        raise ValueError("need --steps >= 1, --repeats >= 1 and --warmup >= 0")
    if options.resolution is not None and options.resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {options.resolution}")
    latency = options.latency
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.onnx is not None:
        _check_onnx_options(options.onnx, latency, device, dtype)

    if latency:
        say(f"loading weights onto {device} ({'random' if options.arch else 'from ' + str(model)})")
    parts = load_components(
        model=model, arch=options.arch, plan=options.plan, materialize=latency, device=device, dtype=dtype
    )
    resolution = options.resolution or parts.resolution
    if latency:
        _check_memory(parts, resolution, device, dtype)
    result = profile_components(
        parts.unet,
        parts.text_encoders,
        parts.vae,
        resolution,
        latency=latency,
        steps=options.steps,
        repeats=options.repeats,
        warmup=options.warmup,
        device=device if latency else None,
        dtype=dtype if latency else None,
        on_stage=say if latency else None,
    )
    result = {"source": parts.source, "plan": parts.plan, **result}
    if options.onnx is not None:
        result["onnx"] = _time_onnx(options, parts.unet.config, result, say)
    if out:
        out = Path(out)
        with atomic_file(out) as partial:  # a full disk or read-only folder: WriteFailed, no half file
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _check_memory(parts, resolution: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a --resolution whose timed calls (a guided U-Net step, a VAE decode) would not fit in memory."""
    from bksdm.sampling import SamplingError, available_memory, generation_bytes

    size = dtype.itemsize
    need = generation_bytes(
        parts.unet.config, parts.vae.config, resolution, resolution, 1, guidance=True, unet_dtype_bytes=size,
        vae_dtype_bytes=size,
    )  # fmt: skip
    free, source = available_memory(device)
    if need > free:
        raise SamplingError(
            f"--resolution {resolution} needs about {need / 2**30:,.1f} GiB of memory for its activations, but "
            f"{free / 2**30:,.1f} GiB is {source}; give a smaller --resolution (or --no-latency to count only)"
        )


def _check_onnx_options(onnx: str | os.PathLike, latency: bool, device: torch.device, dtype: torch.dtype) -> None:
    """``--onnx`` compares ONNX Runtime on the CPU in fp32 with PyTorch: refuse anything else before loading."""
    from bksdm.use.onnx.runtime import read_report

    if not latency:
        raise ValueError("--onnx times the exported U-Net: drop --no-latency")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError("--onnx times ONNX Runtime on the CPU in fp32: profile with --device cpu --dtype fp32")
    read_report(onnx)  # not an export folder: fail before any weights are read


def _time_onnx(
    options: ProfileOptions, unet_config: Any, result: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """ONNX Runtime U-Net step timings with the same inputs, warm-up, repeats and threads as PyTorch's."""
    from bksdm.use.onnx.runtime import time_onnx_unet

    say(f"timing the ONNX Runtime U-Net in {options.onnx} ({torch.get_num_threads()} threads)")
    onnx = time_onnx_unet(
        options.onnx,
        unet_config,
        result["latent_size"],
        repeats=options.repeats,
        warmup=options.warmup,
        threads=torch.get_num_threads(),
    )
    # Per image as for PyTorch, with the U-Net steps from ONNX Runtime (text encoder and VAE decoder from PyTorch).
    steps, text, decode = result["steps"], result["text_encoder_s"], result["vae_decode_s"]
    onnx["image_s"] = text + steps * onnx["unet_step_s"] + decode
    onnx["image_cfg_s"] = 2 * text + steps * onnx["unet_step_cfg_s"] + decode
    return onnx
