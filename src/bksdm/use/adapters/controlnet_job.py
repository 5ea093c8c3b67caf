"""``bksdm adapt controlnet``: a ControlNet trained on the teacher, pruned for a student made from it.

Every check runs before a weight is read or a file written: the student must have the ``bksdm_plan.yaml`` that made
it, be a U-Net student, and be what that plan makes from its teacher; the ControlNet's config must be the teacher
U-Net's (:func:`bksdm.use.adapters.controlnet.check_controlnet_fits`); the pruned ControlNet must be one a stock
``ControlNetModel`` can hold. Then the ControlNet is pruned (:func:`~bksdm.use.adapters.controlnet.prune_controlnet`),
its residuals checked against the student's skip connections, optionally distilled
(:mod:`bksdm.use.adapters.controlnet_kd`), and written atomically as a ``ControlNetModel`` folder with a report
(``adapt_report.json`` / ``.md``).

What the stock pipeline needs (:data:`PIPELINE_NEEDS`): ``StableDiffusionControlNetPipeline.from_pretrained(student,
controlnet=ControlNetModel.from_pretrained(out))`` (``StableDiffusionXLControlNetPipeline`` for SDXL students) runs
the student's U-Net with the carried ControlNet, because the ControlNet returns one residual per skip connection of
the student's U-Net, each of that skip's shape, and a mid residual of the innermost stage's shape, which diffusers'
U-Net adds where its mid block is or would be.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from bksdm import __version__
from bksdm.artifacts import atomic_dir
from bksdm.loading import check_model_ref
from bksdm.plan.prune import check_output_dir
from bksdm.plan.render import markdown_table
from bksdm.profiling import count_params
from bksdm.use.adapters.controlnet import (
    CarriedControlNet,
    ControlNetMismatchError,
    check_controlnet_fits,
    prune_controlnet,
    pruned_controlnet_config,
    residual_shapes,
)
from bksdm.use.adapters.controlnet_kd import ControlNetKDSettings, distill_controlnet
from bksdm.use.adapters.student import REPORT_FILE, StudentError, trace_student

logger = logging.getLogger(__name__)

__all__ = ["PIPELINE_NEEDS", "StudentError", "adapt_controlnet"]

PIPELINE_NEEDS = (
    "StableDiffusionControlNetPipeline (StableDiffusionXLControlNetPipeline for SDXL) takes the student's U-Net and "
    "this ControlNet as they are. It needs one residual per skip connection of the student's U-Net, in its order and "
    "of its shape (channels, resolution), and a mid residual of the shape of the student's innermost stage, which "
    "diffusers' UNet2DConditionModel adds where its mid block is, or would be when the student has none; the "
    "ControlNet's control-image embedding must downscale as much as the VAE. A ControlNet with more residuals than "
    "the student has skips (the teacher's, unpruned) is cut short by the U-Net's zip and then fails on shapes."
)
"""What stock diffusers needs of a ControlNet for a student, as the report and the README say it."""


def adapt_controlnet(
    student: str | os.PathLike,
    controlnet: str | os.PathLike,
    out: str | os.PathLike,
    teacher: str | os.PathLike | None = None,
    overwrite: bool = False,
    *,
    mid_block: str = "keep",
    distill: ControlNetKDSettings | None = None,
) -> dict[str, Any]:
    """Prunes ``controlnet`` (trained on the student's teacher) for ``student`` and writes it to ``out``.

    Args:
        student: A student pipeline folder with its ``bksdm_plan.yaml`` (from ``bksdm prune``, ``distill``, ``demo``).
        controlnet: The teacher's ControlNet: a ``ControlNetModel`` folder or hub id.
        out: The output ``ControlNetModel`` folder (with ``adapt_report.json`` / ``.md``); written atomically.
        teacher: The teacher (folder or hub id) when the one the plan file records cannot be found.
        overwrite: Replace a non-empty ``out`` (and another distillation run in the run folder).
        mid_block: The mid residual's block when the student has none (:data:`~.controlnet.MID_BLOCK_MODES`).
        distill: Settings of a brief output distillation after pruning; None: prune only.

    Returns:
        The report.

    Raises:
        StudentError: No plan file, or a transformer (SD3 / FLUX.1) student.
        ControlNetMismatchError: The ControlNet was made for another teacher, or the student is not its plan's
            student of the teacher, or no stock ControlNetModel can hold the pruned ControlNet.
        TeacherNotFoundError: The student, the teacher or the ControlNet cannot be found.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is False.
        KDSettingsError: Unusable distillation settings.
    """
    from diffusers import ControlNetModel

    out = Path(out)
    traced = trace_student(
        student,
        teacher,
        "prunes a ControlNet for",
        "; for a ControlNet trained on the student itself, use bksdm.use.adapters.controlnet.controlnet_from_student",
    )
    student, teacher_ref, teacher_config = traced.folder, traced.teacher_ref, traced.teacher_config
    resolved, student_config = traced.resolved, traced.student_config
    if traced.family.denoiser != "unet":
        raise StudentError(
            f"--student {student} is a {traced.family.name} (diffusion transformer) student: carrying ControlNets to "
            "SD3 / FLUX.1 students is not supported yet (their ControlNets add one residual per transformer block, a "
            "different mapping); bksdm adapt controlnet takes U-Net students"
        )
    check_output_dir(out, overwrite)
    check_model_ref(controlnet, "--controlnet")
    try:
        controlnet_config = dict(ControlNetModel.load_config(str(controlnet)))
    except (OSError, ValueError) as err:
        raise ControlNetMismatchError(f"--controlnet {controlnet}: no ControlNetModel config there ({err})") from None
    check_controlnet_fits(controlnet_config, teacher_config, str(controlnet), teacher_ref)
    pruned_controlnet_config(controlnet_config, resolved, mid_block)  # refuses what no stock ControlNet can hold
    if distill is not None:
        distill.check()

    teacher_controlnet = ControlNetModel.from_pretrained(str(controlnet)).eval()
    carried = prune_controlnet(teacher_controlnet, resolved, mid_block=mid_block)
    shapes = residual_shapes(dict(carried.controlnet.config))
    if shapes != residual_shapes(student_config):
        raise ControlNetMismatchError(  # the mapping's own guarantee; a failure here is a bksdm bug
            f"the pruned ControlNet's residuals {shapes} differ from the student's skips "
            f"{residual_shapes(student_config)}"
        )
    report = build_report(carried, teacher_controlnet, teacher_ref, student, str(controlnet), traced.plan.name)
    if distill is not None:
        logger.info("distilling the carried ControlNet for %d steps", distill.steps)
        report["distillation"] = distill_controlnet(
            distill, teacher_ref, str(student), teacher_controlnet, carried.controlnet, out
        )
    report["out"] = str(out)
    with atomic_dir(out) as tmp:
        carried.controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / f"{REPORT_FILE}.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        (tmp / f"{REPORT_FILE}.md").write_text(report_markdown(report))
    logger.info("wrote %s", out)
    return report


def build_report(
    carried: CarriedControlNet, teacher_controlnet, teacher: str, student: Path, controlnet: str, plan: str
) -> dict[str, Any]:
    """What was kept and dropped: skips and their zero convolutions, parameters, the mid residual's block."""
    state = teacher_controlnet.state_dict()
    dropped_params = sum(state[k].numel() for k in carried.weights.unused)
    shapes = residual_shapes(dict(carried.controlnet.config))
    return {
        "bksdm_version": __version__,
        "teacher": teacher,
        "student": str(student),
        "plan": plan,
        "controlnet": controlnet,
        "params": {
            "teacher_controlnet": count_params(teacher_controlnet),
            "carried": count_params(carried.controlnet),
            "dropped": dropped_params,
        },
        "residuals": {
            "skips": [
                {"index": i, "teacher_module": s, "channels": c, "downscale": d}
                for i, (s, (c, d)) in enumerate(zip(carried.skips, shapes, strict=False))
            ],
            "dropped_skips": list(carried.dropped_skips),
            "mid": {"channels": shapes[-1][0], "downscale": shapes[-1][1], "block": carried.mid_block},
        },
        "tensors": {
            "copied": sum(1 for k in carried.weights.sources if k not in carried.fresh),
            "dropped": len(carried.weights.unused),
            "fresh": list(carried.fresh),
        },
        "pipeline": PIPELINE_NEEDS,
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: totals, the residuals kept (with the teacher module each one follows), the dropped."""
    p, r = report["params"], report["residuals"]
    rows = [[s["index"], f"`{s['teacher_module']}`", s["channels"], f"1/{s['downscale']}"] for s in r["skips"]]
    mid = r["mid"]
    mid_text = {
        "plan": "the mid block the student keeps, pruned as its plan says",
        "keep": "the teacher ControlNet's mid block, whole (the student has none; the U-Net adds the residual where it "
        "would be)",
        "resnet": "the first ResNet of the teacher ControlNet's mid block (the student has none)",
    }[mid["block"]]
    lines = [
        "# bksdm adapt controlnet",
        "",
        f"ControlNet `{report['controlnet']}`, trained on `{report['teacher']}`, pruned for the student "
        f"`{report['student']}` (plan `{report['plan']}`). Load it with "
        "`ControlNetModel.from_pretrained(folder)` and pass it, with the student, to "
        "`StableDiffusionControlNetPipeline.from_pretrained(student, controlnet=...)`.",
        "",
        f"- parameters: {p['carried']:,} of the teacher ControlNet's {p['teacher_controlnet']:,} "
        f"({p['dropped']:,} dropped with the removed layers and skips)",
        f"- residuals: {len(r['skips'])} down residuals (the teacher ControlNet's "
        f"{len(r['skips']) + len(r['dropped_skips'])} less the {len(r['dropped_skips'])} skips the student removed) "
        "and the mid residual "
        f"({mid['channels']} channels at 1/{mid['downscale']}), computed by {mid_text}",
        "",
        markdown_table(["residual", "teacher module (skip)", "channels", "resolution"], rows),
        "",
    ]
    if r["dropped_skips"]:
        lines += ["Dropped skips (zero convolutions removed): " + ", ".join(f"`{s}`" for s in r["dropped_skips"]), ""]
    if report["tensors"]["fresh"]:
        lines += [
            f"{len(report['tensors']['fresh'])} mid-block tensors had no teacher source of their shape and start at "
            "diffusers' initialisation; the mid residual starts at zero.",
            "",
        ]
    if "distillation" in report:
        d = report["distillation"]
        probe = d["probe_loss_kd_out"]
        lines += [
            f"Distilled for {d['steps']} steps ({d['seconds']:.0f} s; run folder `{d['run_dir']}`): output-KD loss on "
            f"a fixed probe batch {probe['before']:.5f} -> {probe['after']:.5f}.",
            "",
        ]
    lines += ["What the stock pipeline needs: " + report["pipeline"], ""]
    return "\n".join(lines)
