"""The profile job: load (or build) a pipeline's components and measure them, for ``bksdm profile``.

Two halves:

- :func:`load_components` finds what the user points at -- a diffusers folder or hub id, or an architecture
  preset from :mod:`bksdm.plan.archs` -- optionally applies a plan to its U-Net, and returns the U-Net, the text
  encoder(s) and the VAE. Without timing everything is built on the ``meta`` device from the configs alone
  (no weights read, so profiling a hub model costs a few JSON files); with timing the modules get real
  weights on the target device.
- :func:`profile_components` counts parameters and MACs (on weightless ``meta`` copies, so counting is free
  even for SDXL) and, when asked, times every component and the peak memory. It returns one flat,
  JSON-ready dict; it prints nothing.

Per-image latency is *composed*, not measured end to end: text encoders + ``steps`` x one U-Net step + one
VAE decode, each timed on its own with synthetic inputs. Architecture presets have no tokenizer (and need
none to be timed), and composing keeps the figure free of scheduler and image post-processing overheads,
which are the same for every student.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from torch import nn

from bksdm.loading import (
    TeacherNotFoundError,
    check_pipeline_ref,
    dtype_name,
    load_pipeline,
    load_plan,
    load_unet_config,
)
from bksdm.plan.archs import build_text_encoders, build_unet, build_vae, get_arch
from bksdm.plan.prune import TEXT_ENCODERS, vae_decoder_params
from bksdm.plan.resolved import resolve
from bksdm.plan.surgery import build_student
from bksdm.profiling import (
    LatencyStat,
    count_macs,
    count_params,
    measure_latency,
    peak_memory,
    text_encoder_inputs,
    unet_inputs,
    vae_decoder_inputs,
)

__all__ = [
    "TEXT_ENCODERS",
    "Components",
    "device_name",
    "load_components",
    "native_resolution",
    "profile_components",
    "vae_scale_factor",
]

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


@dataclass
class Components:
    """The parts of a pipeline that ``bksdm profile`` measures.

    Attributes:
        unet: The U-Net (the teacher's, or the student made by a plan).
        text_encoders: Text encoder(s) by pipeline component name (``"text_encoder"``, ``"text_encoder_2"``).
        vae: The ``AutoencoderKL`` (only its decoder is profiled).
        resolution: Native image side in pixels (U-Net ``sample_size`` x VAE scale factor).
        source: What was loaded, in words, for reports (e.g. ``"sd-v1.4 (architecture preset, random
            weights)"``).
        plan: Name of the plan applied to the U-Net, or ``None``.
    """

    unet: nn.Module
    text_encoders: dict[str, nn.Module]
    vae: nn.Module
    resolution: int
    source: str
    plan: str | None = None


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent side of a VAE: 2 per downsampling stage, as diffusers pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_resolution(unet_config: Mapping[str, Any], vae: nn.Module) -> int:
    """The image side a pipeline generates by default: the U-Net's ``sample_size`` x the VAE scale factor."""
    side = unet_config["sample_size"]
    if not isinstance(side, int):  # (H, W) sample sizes exist; profile the square of the height
        side = side[0]
    return int(side) * vae_scale_factor(vae)


def device_name(device: torch.device | str) -> str:
    """The device in words, e.g. ``"cpu (2 threads)"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``.

    CPU timings scale with the threads torch may use, so the count is part of the name.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        bf16 = ", native bf16" if cpu_has_native_bf16() else ""
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads{bf16})"
    if device.type == "meta":
        return "none (counted on meta-device shapes; nothing ran)"
    return str(device)


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    entries = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        entries[key.strip()] = value.strip()
    return entries


def cpu_model() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC"``; CPU timings mean little without it."""
    import platform

    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX), which makes bf16 mixed
    precision faster than fp32 there; on other CPUs bf16 is emulated and slower."""
    flags = set(_cpuinfo().get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# --------------------------------------------------------------------------------------------- loading


def _meta_pipeline_parts(ref: str) -> tuple[dict[str, nn.Module], nn.Module]:
    """Text encoders and VAE of a pipeline built on ``meta`` from their configs (no weights are read)."""
    try:
        index = diffusers.DiffusionPipeline.load_config(ref)
    except Exception as err:  # diffusers raises several error types for missing files / hub failures
        raise TeacherNotFoundError(f"cannot read model_index.json of {ref}: {err}") from err
    encoders: dict[str, nn.Module] = {}
    for name in TEXT_ENCODERS:
        entry = index.get(name)
        if not entry or entry[0] != "transformers" or entry[1] is None:
            continue
        model_cls = getattr(transformers, entry[1])
        config = model_cls.config_class.from_pretrained(ref, subfolder=name)
        with torch.device("meta"):
            encoders[name] = model_cls(config).eval()
    vae_entry = index.get("vae") or ("diffusers", "AutoencoderKL")
    vae_cls = getattr(diffusers, vae_entry[1])
    with torch.device("meta"):
        vae = vae_cls.from_config(vae_cls.load_config(ref, subfolder="vae")).eval()
    return encoders, vae


def load_components(
    *,
    model: str | os.PathLike | None = None,
    arch: str | None = None,
    plan: str | os.PathLike | None = None,
    materialize: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Components:
    """Load or build the components to profile, from a pipeline or an architecture preset.

    Every user error (unknown architecture, bad plan, missing folder, unreachable hub id) is raised before
    any weights are read.

    Args:
        model: A diffusers pipeline folder or hub id. Exactly one of ``model`` and ``arch`` must be given.
        arch: An architecture preset name (see :data:`bksdm.plan.archs.ARCHS`); its modules get random weights.
        plan: A preset name or plan YAML applied to the U-Net. For ``model`` with ``materialize`` the
            student is made by :func:`bksdm.plan.surgery.build_student` from the loaded teacher's weights;
            otherwise it is built from the student config (random or no weights: only shapes matter).
        materialize: Give every module real weights on ``device`` in ``dtype`` (needed to time them).
            When false, modules live on ``meta``: counting only, nothing allocated.
        device: Target device when ``materialize``.
        dtype: Target dtype when ``materialize``.

    Returns:
        The components, the native resolution and a description of the source.

    Raises:
        ValueError: Neither or both of ``model`` and ``arch``, or an unknown architecture.
        PlanError: The plan is malformed or does not fit the U-Net.
        TeacherNotFoundError: ``model`` is neither a pipeline folder nor a reachable hub repo.
    """
    if (model is None) == (arch is None):
        raise ValueError("give either a model (folder or hub id) or --arch, not both or neither")
    plan_obj = load_plan(plan) if plan is not None else None
    where = device if materialize else "meta"
    # None keeps the fp32 the modules are built in (an explicit .to(fp32) only makes diffusers warn).
    kind = dtype if materialize and dtype != torch.float32 else None

    if arch is not None:
        spec = get_arch(arch)
        unet_config = dict(spec.unet_config)
        if plan_obj is not None:
            unet_config = resolve(plan_obj, unet_config).student_config()
        weights = "random weights" if materialize else "no weights"
        return Components(
            unet=build_unet(unet_config, device=where, dtype=kind),
            text_encoders=build_text_encoders(spec, device=where, dtype=kind),
            vae=build_vae(spec, device=where, dtype=kind),
            resolution=spec.resolution,
            source=f"{spec.name} (architecture preset, {weights})",
            plan=plan_obj.name if plan_obj is not None else None,
        )

    ref = str(model)
    check_pipeline_ref(ref)  # a path that is no folder: one line, and no hub request
    teacher_config = load_unet_config(ref)  # raises TeacherNotFoundError with a fix for hub failures
    resolved = resolve(plan_obj, teacher_config) if plan_obj is not None else None  # fail before loading
    if materialize:
        pipe = load_pipeline(ref, dtype=dtype, device=str(device))
        unet = pipe.unet
        if resolved is not None:
            # allow_mismatched: a custom plan that moves layers still profiles; values do not matter here.
            unet = build_student(unet, resolved, allow_mismatched=True).student
        encoders = {n: getattr(pipe, n) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None}
        vae = pipe.vae
    else:
        config = resolved.student_config() if resolved is not None else teacher_config
        unet = build_unet(config, device="meta")
        encoders, vae = _meta_pipeline_parts(ref)
    return Components(
        unet=unet,
        text_encoders=encoders,
        vae=vae,
        resolution=native_resolution(teacher_config, vae),
        source=ref,
        plan=plan_obj.name if plan_obj is not None else None,
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
