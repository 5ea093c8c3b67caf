"""The prune job: teacher pipeline + plan → a complete student pipeline folder and a report.

The teacher's denoiser family (:mod:`bksdm.families`: a U-Net, SD3's or FLUX's transformer) is read from its config
and answers everything family-specific: plan resolution, the student model, MACs per step, and which pipeline
attribute (``unet`` or ``transformer``) the student replaces.

Everything that can fail on user input (the plan, the teacher's layout, the output folder) is checked before
any weights are loaded, and the folder is written under a partial name and renamed at the end
(:func:`bksdm.artifacts.atomic_dir`), so a failed run (a full disk, a read-only folder, a kill) never leaves a
half-written ``--out`` and never touches the one that was there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bksdm import __version__
from bksdm.artifacts import atomic_dir
from bksdm.families import family_of
from bksdm.families.unet import UNET
from bksdm.loading import PLAN_FILE, load_denoiser_config, load_pipeline, load_plan, teacher_or_default
from bksdm.plan.archs import Arch, get_arch
from bksdm.plan.render import block_rows, format_plan, prune_markdown
from bksdm.plan.spec import Plan, plan_to_dict
from bksdm.plan.surgery import Resolved, block_params, build_student, describe_config_changes, shapes_of
from bksdm.profiling import VAE_SCALE, MacCount, count_params

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline attributes that may hold a text encoder: SD's one, SDXL's two (CLIP-L, OpenCLIP-bigG), SD3's three
(CLIP-L, CLIP-G, T5-XXL) and FLUX.1's two (CLIP-L, T5-XXL)."""

DEFAULT_RESOLUTION = 1024
"""The image side (px) MACs are counted at for a denoiser whose config has no ``sample_size``: FLUX.1's
transformer config has none, and 1024 px is the resolution FLUX.1-dev and -schnell generate by default."""


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fails early when ``out`` would be clobbered or cannot be created."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")


def unet_macs(config: dict[str, Any], resolution: int, group_depth: int = 6, vae_scale: int = VAE_SCALE) -> MacCount:
    """MACs of one U-Net step at batch 1 and ``resolution`` pixels (latent side ``resolution // vae_scale``),
    counted on a weightless (meta) model built from ``config`` (the U-Net family's ``step_macs``)."""
    return UNET.step_macs(config, resolution, vae_scale, group_depth=group_depth)


def teacher_resolution(config: Mapping[str, Any], vae_scale: int = VAE_SCALE) -> tuple[int, str | None]:
    """The image side (px) a teacher's MACs are counted at: its native one.

    Args:
        config: The denoiser's config.
        vae_scale: Pixels per latent side.

    Returns:
        ``(side, note)``: ``sample_size * vae_scale`` and None when the config has a ``sample_size`` (U-Nets, SD3's
        transformer); otherwise :data:`DEFAULT_RESOLUTION` and a note saying so, for reports (FLUX.1).
    """
    side = config.get("sample_size")
    if side is None:
        name = config.get("_class_name") or "denoiser"
        return DEFAULT_RESOLUTION, f"{DEFAULT_RESOLUTION} px: the {name} config has no sample_size (FLUX.1's default)"
    if not isinstance(side, int):  # (H, W) sample sizes exist; count the square of the height
        side = side[0]
    return int(side) * vae_scale, None


def arch_denoiser_config(arch: Arch) -> dict[str, Any]:
    """An architecture preset's denoiser config: its ``denoiser_config`` where it has one (a transformer preset),
    else its ``unet_config``."""
    return dict(getattr(arch, "denoiser_config", None) or arch.unet_config)


def group_macs(per_module: dict[str, int], addresses: list[str]) -> dict[str, int]:
    """Sums per-module MACs into the given block addresses (each module counts towards its longest prefix)."""
    totals = dict.fromkeys(addresses, 0)
    for module, macs in per_module.items():
        best = None
        for address in addresses:
            if (module == address or module.startswith(address + ".")) and (best is None or len(address) > len(best)):
                best = address
        if best is not None:
            totals[best] += macs
    return totals


def vae_decoder_params(vae: torch.nn.Module) -> int:
    """Parameters of an AutoencoderKL's decoder as the BK-SDM paper counts them: ``vae.decoder`` only.

    The published 49,490,179 (and so the paper's "whole model" totals) is ``vae.decoder`` alone; the 4->4
    ``post_quant_conv`` that ``vae.decode`` also runs adds 20 parameters and is left out to match.

    Args:
        vae: The pipeline's VAE (any module with a ``decoder``, on any device including ``meta``).

    Returns:
        The number of scalar parameters of ``vae.decoder``.
    """
    return count_params(vae.decoder)


def build_report(
    teacher_ref: str,
    resolved: Resolved,
    teacher_denoiser: torch.nn.Module,
    student_denoiser: torch.nn.Module,
    other_params: int,
    resolution: int,
    weights,
    init: str,
    vae_scale: int = VAE_SCALE,
    resolution_note: str | None = None,
) -> dict[str, Any]:
    """The prune report's content: totals, per-block fates with params and MACs, config changes, KD pairs.

    ``denoiser`` holds the teacher's and the student's parameters and MACs for every family; a U-Net report also
    keeps them under ``unet``, as before transformer teachers existed.
    """
    family = family_of(teacher_denoiser)
    student_config = resolved.student_config()
    teacher_macs = family.step_macs(dict(teacher_denoiser.config), resolution, vae_scale)
    student_macs = family.step_macs(student_config, resolution, vae_scale)
    fates = [address for address, _ in resolved.block_fates()]
    params = block_params(resolved, shapes_of(teacher_denoiser))
    rows = block_rows(resolved, params, group_macs(teacher_macs.per_module, fates))
    t_params, s_params = count_params(teacher_denoiser), count_params(student_denoiser)
    sizes = {
        "teacher": {"params": t_params, "macs": teacher_macs.conv_linear, "macs_with_attention": teacher_macs.total},
        "student": {"params": s_params, "macs": student_macs.conv_linear, "macs_with_attention": student_macs.total},
    }
    report: dict[str, Any] = {
        "bksdm_version": __version__,
        "teacher": teacher_ref,
        "family": family.name,
        "plan": plan_to_dict(resolved.plan),
        "resolved_plan": plan_to_dict(resolved.explicit()),
        "resolution": resolution,
    }
    if resolution_note:
        report["resolution_note"] = resolution_note
    if family.denoiser == "unet":
        report["unet"] = sizes
    report["denoiser"] = {"attribute": family.denoiser, "class": type(teacher_denoiser).__name__, **sizes}
    changes = describe_config_changes(teacher_denoiser.config, student_config)
    report |= {
        "whole": {"teacher": t_params + other_params, "student": s_params + other_params},
        "blocks": rows,
        "config_changes": {k: list(v) for k, v in changes.items()},
        "feature_pairs": [vars(p) for p in resolved.feature_pairs()],
        "weights": {
            "init": init,
            "copied": len(weights.sources) if init == "teacher" else 0,
            "random_init": [m[0] for m in weights.mismatched] if init == "teacher" else ["all"],
            "unused_teacher_tensors": len(weights.unused),
        },
    }
    return report


DEFAULT_SHOW_ARCH = "sd-v1.4"
"""The architecture preset :func:`describe_plan` resolves against when given no teacher."""


@dataclass(frozen=True)
class PlanDescription:
    """A plan resolved against a teacher config, block by block, without loading any weights (``bksdm plan show``).

    Attributes:
        plan: The plan as loaded (a preset, a YAML file, or a student folder's recorded plan).
        resolved: The plan resolved against the teacher config (``ResolvedPlan`` or ``ResolvedStacks``).
        teacher: What the plan was resolved against, for the header (a teacher reference or an architecture).
        rows: One row per teacher block (:func:`bksdm.plan.render.block_rows`): address, student address or None
            when removed, parameters and MACs per step at the teacher's native resolution.
        family: The teacher's denoiser family (``"unet"``, ``"sd3"``, ``"flux"``).
        resolution: The image side (px) the MACs are counted at.
        resolution_note: Why ``resolution`` is a default rather than the config's own (FLUX.1), else None.
    """

    plan: Plan
    resolved: Resolved
    teacher: str
    rows: list[dict[str, Any]]
    family: str
    resolution: int
    resolution_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the plan, its explicit resolved form, the student config, the blocks, the KD pairs."""
        data = {
            "family": self.family,
            "resolution": self.resolution,
            "plan": plan_to_dict(self.plan),
            "resolved": plan_to_dict(self.resolved.explicit()),
            "student_config": self.resolved.student_config(),
            "blocks": self.rows,
            "feature_pairs": [vars(p) for p in self.resolved.feature_pairs()],
        }
        if self.resolution_note:
            data["resolution_note"] = self.resolution_note
        return data

    def to_text(self) -> str:
        """The terminal view (:func:`bksdm.plan.render.format_plan`)."""
        macs_at = f"MACs per step at {self.resolution} px" + (
            f" ({self.resolution_note})" if self.resolution_note else ""
        )
        return format_plan(self.resolved, self.rows, teacher=self.teacher, macs_at=macs_at)


def describe_plan(
    plan: str | os.PathLike,
    *,
    teacher: str | os.PathLike | None = None,
    arch: str | None = None,
) -> PlanDescription:
    """Resolves a plan against a teacher's denoiser config and counts each block's parameters and MACs.

    Only configs are read: the teacher's denoiser (a U-Net or a transformer; its family decides) is built on the
    meta device (shapes, no weights), so any architecture can be shown without downloading or allocating it.

    Args:
        plan: Preset name, plan YAML path, or a student folder (its recorded plan).
        teacher: Hub id or local folder whose denoiser config (``unet/`` or ``transformer/``) to resolve against.
        arch: Architecture preset (:data:`bksdm.plan.archs.ARCHS`) to resolve against when no teacher is given;
            default :data:`DEFAULT_SHOW_ARCH`.

    Returns:
        The description; ``to_text()`` and ``to_dict()`` give its two renderings.

    Raises:
        ValueError: Both ``teacher`` and ``arch`` given, or an unknown architecture.
        PlanError: The plan is malformed or does not fit the teacher.
        TeacherNotFoundError: The teacher's config cannot be found.
        UnknownFamilyError: The teacher's denoiser is of no family bksdm knows.
    """
    if teacher is not None and arch is not None:
        raise ValueError("give a teacher or an architecture preset to resolve the plan against, not both")
    loaded = load_plan(plan)
    if teacher is not None:
        config, name = load_denoiser_config(teacher), str(teacher)
        resolution, note = teacher_resolution(config)
    else:
        preset = get_arch(arch or DEFAULT_SHOW_ARCH)
        config, name = arch_denoiser_config(preset), f"{preset.name} (architecture preset)"
        resolution, note = preset.resolution, None
    family = family_of(config)
    resolved = family.resolve(loaded, config)
    macs = family.step_macs(config, resolution, VAE_SCALE)
    fates = [address for address, _ in resolved.block_fates()]
    with torch.device("meta"):
        teacher_denoiser = family.build(config)
    params = block_params(resolved, shapes_of(teacher_denoiser))
    rows = block_rows(resolved, params, group_macs(macs.per_module, fates))
    return PlanDescription(loaded, resolved, name, rows, family.name, resolution, note)


def prune(
    teacher: str | None,
    plan_spec: str,
    out: str | os.PathLike,
    *,
    init: str = "teacher",
    allow_partial_init: bool = False,
    overwrite: bool = False,
    save_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Prunes ``teacher`` with ``plan_spec`` and writes a complete diffusers pipeline to ``out``.

    The teacher's denoiser family decides how the plan resolves and which pipeline component (``unet`` or
    ``transformer``) the student replaces; every other component is saved as the teacher's.

    Args:
        teacher: Hub id or local folder of a diffusers SD / SDXL / SD3 / FLUX.1 pipeline; None: the bundled shapes
            teacher.
        plan_spec: Preset name or plan YAML path.
        out: Output folder; written atomically.
        init: ``"teacher"`` (copy kept weights) or ``"random"`` (ablation).
        allow_partial_init: Let tensors whose shapes differ start from random weights (see WeightMap.check).
        overwrite: Replace a non-empty ``out``.
        save_dtype: Dtype of the saved weights.
        seed: Seed of the student's random initialisation.

    Returns:
        The report (also written to ``out/prune_report.json`` and ``.md``).

    Raises:
        PlanError: The plan is malformed or does not fit the teacher (nothing is written).
        UnknownFamilyError: The teacher's denoiser is of no family bksdm knows (nothing is written).
        WriteFailed: The folder could not be written (full disk, read-only); ``out`` is as it was before.
    """
    out = Path(out)
    teacher = teacher_or_default(teacher)
    plan = load_plan(plan_spec)
    check_output_dir(out, overwrite)
    config = load_denoiser_config(teacher)
    family = family_of(config)
    resolved = family.resolve(plan, config)  # fails here, before any weights are read
    logger.info("plan %s resolves against %s (%s); loading the teacher", plan.name, teacher, family.name)
    pipe = load_pipeline(teacher)
    denoiser = getattr(pipe, family.denoiser)
    surgery = build_student(denoiser, resolved, init=init, allow_mismatched=allow_partial_init, seed=seed)
    other = sum(count_params(getattr(pipe, name)) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None)
    other += vae_decoder_params(pipe.vae)
    resolution, note = teacher_resolution(denoiser.config, pipe.vae_scale_factor)
    report = build_report(
        teacher,
        resolved,
        denoiser,
        surgery.student,
        other,
        resolution,
        surgery.weights,
        init,
        pipe.vae_scale_factor,
        resolution_note=note,
    )
    report["out"] = str(out)
    # The teacher's denoiser is not needed past the report: without this reference it is freed when the student
    # takes its place below, before saving (holding it cost 0.8 GB more peak memory at SD-v1.4 size).
    del denoiser

    with atomic_dir(out) as tmp:
        setattr(pipe, family.denoiser, surgery.student)
        if save_dtype != torch.float32:
            pipe.to(dtype=save_dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        provenance = {
            "bksdm_version": __version__,
            "teacher": teacher,
            "family": family.name,
            "init": init,
            "plan": plan_to_dict(resolved.explicit()),
            "preset": plan_to_dict(plan),
        }
        (tmp / PLAN_FILE).write_text(yaml.safe_dump(provenance, sort_keys=False))
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        (tmp / "prune_report.md").write_text(prune_markdown(report))
    logger.info("wrote %s", out)
    return report
