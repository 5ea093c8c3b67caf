"""The job of ``bksdm profile``: load the components, check that timing them can work, measure, write the JSON.

:func:`profile_pipeline` loads what the user points at (:func:`bksdm.eval.components.load_components`: a pipeline
folder or hub id, or an architecture preset, U-Net or transformer, optionally pruned by a plan), refuses what
cannot work before any weights are built (random weights of a preset that would not fit in memory, activations of
a resolution that would not, ``--onnx`` on anything but a CPU fp32 U-Net), measures with
:func:`bksdm.eval.profile.profile_components`, times one stock pipeline call beside the composed figure
(:func:`time_end_to_end`: a pipeline folder or hub id only, since presets have no tokenizer), adds the teacher's
MACs when a plan made a student, times the ONNX Runtime U-Net beside PyTorch's when asked, and writes the result
atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bksdm.devices import dtype_name
from bksdm.eval.components import Components, load_components
from bksdm.eval.per_image import measured_breakdown, teacher_macs
from bksdm.eval.profile import profile_components
from bksdm.families import family_of
from bksdm.loading import load_denoiser_config
from bksdm.plan.archs import get_arch
from bksdm.profiling import count_params, measure_latency

__all__ = ["END_TO_END_PROMPT", "ProfileOptions", "profile_pipeline", "time_end_to_end"]

END_TO_END_PROMPT = "a photograph of an astronaut riding a horse"
"""The prompt of the timed pipeline call (its content does not change the work: prompts are padded to their
encoder's length)."""
END_TO_END_SEED = 0


@dataclass
class ProfileOptions:
    """What ``bksdm profile`` measures: a pipeline (``model``) or an architecture preset (``arch``), not both."""

    model: str | None = None
    """A diffusers pipeline folder or hub id."""
    arch: str | None = None
    """An architecture preset (:data:`bksdm.plan.archs.ALL_ARCHS`: U-Nets and transformers), with random weights."""
    plan: str | os.PathLike | None = None
    """A plan (preset name or YAML) applied to the denoiser first, resolved by its family."""
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
    end_to_end: bool = True
    """Also time one stock pipeline call (``model`` only: an ``arch`` preset has no tokenizer to call it with)."""


def profile_pipeline(
    options: ProfileOptions, out: str | os.PathLike | None = None, on_stage: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The job of ``bksdm profile``: load, check, measure, and write the result to ``out`` (when given).

    Returns:
        :func:`~bksdm.eval.profile.profile_components`' dict with ``source`` and ``plan`` first, ``end_to_end``
        (:func:`time_end_to_end`, or None) and ``end_to_end_note`` (why it is None, or None), with a plan
        :func:`~bksdm.eval.per_image.teacher_macs`' ``teacher_macs`` and ``macs_ratio_to_teacher``, and ``onnx`` with
        ``options.onnx``.

    Raises:
        ValueError: Bad option values, or an unknown architecture.
        SamplingError: The preset's weights or the resolution's timed calls would not fit in memory.
        PlanError: The plan is malformed or does not fit the denoiser.
        TeacherNotFoundError: The model is neither a pipeline folder nor a reachable hub repo.
        WriteFailed: ``out`` could not be written.
    """
    from bksdm.artifacts import atomic_file
    from bksdm.devices import resolve_device, resolve_dtype
    from bksdm.loading import teacher_or_default

    say = on_stage or (lambda message: None)
    model = options.model
    if model is not None or options.arch is None:  # a bundled teacher's name, or nothing: the bundled shapes teacher
        model = teacher_or_default(model)
    if options.steps < 1 or options.repeats < 1 or options.warmup < 0:
        raise ValueError("need --steps >= 1, --repeats >= 1 and --warmup >= 0")
    if options.resolution is not None and options.resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {options.resolution}")
    latency = options.latency
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.onnx is not None:
        _check_onnx_options(options, model, latency, device, dtype)
    if latency and options.arch is not None:
        _check_weights(load_components(arch=options.arch, plan=options.plan), options.arch, device, dtype)

    if latency:
        say(f"loading weights onto {device} ({'random' if options.arch else 'from ' + str(model)})")
    parts = load_components(
        model=model, arch=options.arch, plan=options.plan, materialize=latency, device=device, dtype=dtype
    )
    resolution = options.resolution or parts.resolution
    if latency:
        _check_memory(parts, resolution, device, dtype)
    result = profile_components(
        parts.denoiser,
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
    if parts.plan is not None:
        result |= teacher_macs(result, get_arch(options.arch).denoiser_config if options.arch else
                               load_denoiser_config(model))  # fmt: skip
    result["end_to_end_note"] = _end_to_end_note(options)
    result["end_to_end"] = None
    if result["end_to_end_note"] is None:
        from bksdm.sampling import sampling_defaults

        pipe = _stock_pipeline(model, parts, device, dtype)
        scale = sampling_defaults(model, denoiser=parts.denoiser).guidance_scale
        say(f"timing one stock {type(pipe).__name__} call: {options.steps} steps, guidance {scale:g}")
        timed = time_end_to_end(pipe, resolution, options.steps, scale, warmup=min(options.warmup, 1), device=device)
        breakdown = result["per_image_cfg" if timed["classifier_free"] else "per_image"]
        result["end_to_end"] = timed | measured_breakdown(breakdown, timed["s"], timed["steps_run"])
        del pipe
    if options.onnx is not None:
        result["onnx"] = _time_onnx(options, parts.denoiser.config, result, say)
    if out:
        out = Path(out)
        with atomic_file(out) as partial:  # a full disk or read-only folder: WriteFailed, no half file
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _end_to_end_note(options: ProfileOptions) -> str | None:
    """Why no stock pipeline call is timed, or None when one is."""
    if options.arch is not None:
        return (
            "not measured: an --arch preset is built from configs with random weights and has no tokenizer or "
            "scheduler, so there is no stock pipeline to call; profile a pipeline folder or hub id for it"
        )
    if not options.latency:
        return "not measured: --no-latency"
    return None if options.end_to_end else "not measured: --no-end-to-end"


def _stock_pipeline(model: str, parts: Components, device: torch.device, dtype: torch.dtype):
    """The model's own pipeline class around the components already loaded (the plan's student as its denoiser):
    diffusers reads only what was not passed (tokenizers, scheduler, a safety checker where there is one)."""
    from bksdm.loading import load_pipeline

    modules = {family_of(parts.denoiser).denoiser: parts.denoiser, "vae": parts.vae, **parts.text_encoders}
    return load_pipeline(model, dtype=dtype, device=str(device), **modules)


def time_end_to_end(
    pipe, resolution: int, steps: int, guidance_scale: float, *, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """One stock ``pipe(...)`` call, timed as a user makes it: fixed prompt and seed, ``steps`` steps, the model's
    guidance, images post-processed to PIL; what the separately timed components leave out shows in its gap.

    With classifier-free guidance the negative prompt is ``""``, given explicitly so that SDXL encodes it as the
    composed figure assumes (SDXL would use zeros for none). ``warmup`` untimed calls of one step come first (the
    composed figures also time warm components). A step callback counts the steps the scheduler really ran.

    Returns:
        ``s`` (wall time, synchronised on CUDA), ``steps``, ``steps_run``, ``guidance_scale``,
        ``classifier_free``, ``negative_prompt``, ``prompt``, ``seed``, ``warmup_calls``, ``pipeline``,
        ``scheduler`` and ``image_size`` ([width, height] of the image it returned).
    """
    from bksdm.sampling import classifier_free

    guided = classifier_free(pipe, guidance_scale)
    taken: list[int] = []

    def on_step(_pipe, step: int, _timestep, tensors: dict[str, Any]) -> dict[str, Any]:
        taken.append(step)
        return tensors

    def call(count: int):
        taken.clear()
        extra = {"negative_prompt": ""} if guided else {}
        generator = torch.Generator("cpu").manual_seed(END_TO_END_SEED)
        return pipe(
            prompt=END_TO_END_PROMPT, height=resolution, width=resolution, num_inference_steps=count,
            guidance_scale=guidance_scale, generator=generator, callback_on_step_end=on_step, **extra,
        ).images  # fmt: skip

    pipe.set_progress_bar_config(disable=True)
    for _ in range(warmup):
        call(1)
    images: list[Any] = []
    stat = measure_latency(lambda: images.extend(call(steps)), warmup=0, repeats=1, device=device)
    return {
        "s": stat.median,
        "steps": steps,
        "steps_run": len(taken),
        "guidance_scale": guidance_scale,
        "classifier_free": guided,
        "negative_prompt": "" if guided else None,
        "prompt": END_TO_END_PROMPT,
        "seed": END_TO_END_SEED,
        "warmup_calls": warmup,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "image_size": list(images[0].size),
    }


def _check_weights(meta: Components, arch: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse to time a preset whose random weights (counted on its meta build) would not fit in memory: FLUX.1's
    pipeline alone is 67 GB in fp32."""
    from bksdm.sampling import SamplingError, available_memory

    modules = [meta.denoiser, meta.vae, *meta.text_encoders.values()]
    need = sum(count_params(m) for m in modules) * dtype.itemsize
    free, source = available_memory(device)
    if need > free:
        raise SamplingError(
            f"--arch {arch} needs {need / 2**30:,.1f} GiB for its random {dtype_name(dtype)} weights, but "
            f"{free / 2**30:,.1f} GiB is {source}; add --no-latency to count params and MACs only (no weights)"
        )


def _check_memory(parts: Components, resolution: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a --resolution whose timed calls (a guided U-Net step, a VAE decode) would not fit in memory.

    The estimate (:func:`bksdm.sampling.generation_bytes`) models a U-Net; for a transformer only its weights
    are checked (by :func:`_check_weights`, for presets).
    """
    from bksdm.sampling import SamplingError, available_memory, generation_bytes

    if family_of(parts.denoiser).denoiser != "unet":
        return
    size = dtype.itemsize
    need = generation_bytes(
        parts.denoiser.config, parts.vae.config, resolution, resolution, 1, guidance=True, unet_dtype_bytes=size,
        vae_dtype_bytes=size,
    )  # fmt: skip
    free, source = available_memory(device)
    if need > free:
        raise SamplingError(
            f"--resolution {resolution} needs about {need / 2**30:,.1f} GiB of memory for its activations, but "
            f"{free / 2**30:,.1f} GiB is {source}; give a smaller --resolution (or --no-latency to count only)"
        )


def _check_onnx_options(
    options: ProfileOptions, model: str | None, latency: bool, device: torch.device, dtype: torch.dtype
) -> None:
    """``--onnx`` compares ONNX Runtime on the CPU in fp32 with PyTorch's U-Net: refuse anything else before
    loading."""
    from bksdm.use.onnx.runtime import read_report

    if not latency:
        raise ValueError("--onnx times the exported U-Net: drop --no-latency")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError("--onnx times ONNX Runtime on the CPU in fp32: profile with --device cpu --dtype fp32")
    config = get_arch(options.arch).denoiser_config if options.arch else load_denoiser_config(model)
    family = family_of(config)
    if family.denoiser != "unet":
        raise ValueError(
            f"--onnx times an exported U-Net, but this pipeline's denoiser is a {family.name} transformer, which "
            "bksdm does not export (Hugging Face optimum's exporters cover SD3 and FLUX.1); drop --onnx"
        )
    read_report(options.onnx)  # not an export folder: fail before any weights are read


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
