"""What ``bksdm profile`` measures: a pipeline's denoiser, text encoder(s) and VAE, loaded or built.

:func:`load_components` finds what the user points at -- a diffusers folder or hub id, or an architecture preset
from :mod:`bksdm.plan.archs` (U-Nets) or :mod:`bksdm.plan.dit_archs` (SD3 / SD3.5 / FLUX.1 transformers) --
optionally applies a plan to its denoiser (the family's resolver), and returns the denoiser, the text encoder(s) and
the VAE. Without timing everything is built on the ``meta`` device from the configs alone (no weights read, so
profiling a hub model or a 12B architecture costs a few JSON files); with timing the modules get real weights on the
target device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from torch import nn

from bksdm.families import denoiser_of, family_of, flux, sd3
from bksdm.loading import TeacherNotFoundError, check_pipeline_ref, load_denoiser_config, load_pipeline, load_plan
from bksdm.plan.archs import build_denoiser, build_text_encoders, build_vae, get_arch
from bksdm.plan.prune import TEXT_ENCODERS, teacher_resolution
from bksdm.plan.surgery import build_student
from bksdm.profiling import TEXT_LENGTH

__all__ = ["Components", "load_components", "native_resolution", "prompt_length", "vae_scale_factor"]


@dataclass
class Components:
    """The parts of a pipeline that ``bksdm profile`` measures.

    Attributes:
        denoiser: The U-Net or transformer (the teacher's, or the student made by a plan).
        text_encoders: Text encoder(s) by pipeline component name (``"text_encoder"``, ``"text_encoder_2"``,
            SD3's ``"text_encoder_3"``).
        vae: The ``AutoencoderKL`` (only its decoder is profiled).
        resolution: Native image side in pixels (:func:`native_resolution`).
        source: What was loaded, in words, for reports (e.g. ``"sd-v1.4 (architecture preset, random
            weights)"``).
        plan: Name of the plan applied to the denoiser, or ``None``.
    """

    denoiser: nn.Module
    text_encoders: dict[str, nn.Module]
    vae: nn.Module
    resolution: int
    source: str
    plan: str | None = None

    @property
    def unet(self) -> nn.Module:
        """The denoiser under its U-Net name, which ``bksdm report`` still reads and swaps."""
        return self.denoiser

    @unet.setter
    def unet(self, module: nn.Module) -> None:
        self.denoiser = module


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent side of a VAE: 2 per downsampling stage, as diffusers pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_resolution(denoiser_config: Mapping[str, Any], vae: nn.Module) -> int:
    """The image side a pipeline generates by default: the denoiser's ``sample_size`` x the VAE scale factor
    (1024 px for FLUX.1, whose config has no ``sample_size``: :func:`bksdm.plan.prune.teacher_resolution`)."""
    return teacher_resolution(denoiser_config, vae_scale_factor(vae))[0]


def prompt_length(encoder: nn.Module, denoiser_config: Mapping[str, Any]) -> int:
    """Tokens a text encoder reads per prompt in the stock pipeline (what its MACs and timings are counted on).

    CLIP: 77, or fewer where its position table is shorter (tiny test encoders). T5 has relative positions and no
    table; its length is the one the transformer's family pads T5 prompts to: 256 for SD3 (after CLIP's 77), 512
    for FLUX.1-dev, 256 for schnell (``T5_TOKENS`` of :mod:`bksdm.families.sd3` / :mod:`~bksdm.families.flux`).
    """
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions is not None:
        return min(TEXT_LENGTH, int(positions))
    family = family_of(denoiser_config)
    if family is flux.FLUX:
        return flux.T5_TOKENS[bool(denoiser_config.get("guidance_embeds"))]
    if family is sd3.SD3:
        return sd3.T5_TOKENS
    raise ValueError(f"no prompt length known for {type(encoder).__name__} in a {family.name} pipeline")


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
        arch: An architecture preset name (see :data:`bksdm.plan.archs.ALL_ARCHS`); its modules get random weights.
        plan: A preset name or plan YAML applied to the denoiser, resolved by its family (``bk-*`` for U-Nets,
            ``keep-*`` or ``blocks:`` rules for transformers). For ``model`` with ``materialize`` the student is
            made by :func:`bksdm.plan.surgery.build_student` from the loaded teacher's weights; otherwise it is
            built from the student config (random or no weights: only shapes matter).
        materialize: Give every module real weights on ``device`` in ``dtype`` (needed to time them).
            When false, modules live on ``meta``: counting only, nothing allocated.
        device: Target device when ``materialize``.
        dtype: Target dtype when ``materialize``.

    Returns:
        The components, the native resolution and a description of the source.

    Raises:
        ValueError: Neither or both of ``model`` and ``arch``, or an unknown architecture.
        PlanError: The plan is malformed or does not fit the denoiser (a U-Net plan on a transformer, ...).
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
        config = dict(spec.denoiser_config)
        if plan_obj is not None:
            config = family_of(config).resolve(plan_obj, config).student_config()
        weights = "random weights" if materialize else "no weights"
        return Components(
            denoiser=build_denoiser(config, device=where, dtype=kind),
            text_encoders=build_text_encoders(spec, device=where, dtype=kind),
            vae=build_vae(spec, device=where, dtype=kind),
            resolution=spec.resolution,
            source=f"{spec.name} (architecture preset, {weights})",
            plan=plan_obj.name if plan_obj is not None else None,
        )

    ref = str(model)
    check_pipeline_ref(ref)  # a path that is no folder: one line, and no hub request
    teacher_config = load_denoiser_config(ref)  # raises TeacherNotFoundError with a fix for hub failures
    family = family_of(teacher_config)
    resolved = family.resolve(plan_obj, teacher_config) if plan_obj is not None else None  # fail before loading
    if materialize:
        pipe = load_pipeline(ref, dtype=dtype, device=str(device))
        denoiser = denoiser_of(pipe)
        if resolved is not None:
            # allow_mismatched: a custom plan that moves layers still profiles; values do not matter here.
            denoiser = build_student(denoiser, resolved, allow_mismatched=True).student
        encoders = {n: getattr(pipe, n) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None}
        vae = pipe.vae
    else:
        denoiser = build_denoiser(resolved.student_config() if resolved is not None else teacher_config)
        encoders, vae = _meta_pipeline_parts(ref)
    return Components(
        denoiser=denoiser,
        text_encoders=encoders,
        vae=vae,
        resolution=native_resolution(teacher_config, vae),
        source=ref,
        plan=plan_obj.name if plan_obj is not None else None,
    )
