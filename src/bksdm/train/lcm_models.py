"""What ``bksdm lcm`` distils: the pipeline checked and loaded, its U-Net frozen as the ODE-solver teacher, and the
student built from it (a full U-Net with a guidance embedding, or LoRA adapters), equal to the teacher at the start.

Only U-Net teachers with epsilon or velocity targets on a DDPM schedule: the DDIM solver and the boundary scalings
are defined for them (SD3 / FLUX.1 are flow-matching transformers, whose few-step distillation is another method);
SDXL is refused too, for want of its unconditional pooled embedding and micro-conditioning here. The refusals read
configs only, before any weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from bksdm.families import family_of
from bksdm.families.base import Family
from bksdm.loading import load_denoiser_config, load_pipeline, teacher_or_default
from bksdm.train.distill import TrainingSetupError
from bksdm.train.encoders import freeze_teacher_parts
from bksdm.train.lcm_config import LcmConfig, LcmModelConfig
from bksdm.train.lcm_step import DDIMSolver, LcmObjective
from bksdm.use.lora import lora_config

__all__ = ["LcmModels", "build_lcm_student", "check_teacher", "load_lcm_models"]


@dataclass
class LcmModels:
    """Everything the loop needs: the teacher pipeline, the student and the objective."""

    ref: str  # the pipeline distilled (hub id or folder)
    pipe: Any  # its pipeline: text encoder, VAE and the teacher U-Net
    family: Family  # the U-Net family (prompt encoding and the batches' conditioning)
    teacher: torch.nn.Module  # the pipeline's U-Net, frozen
    student: torch.nn.Module  # full: a U-Net with a guidance embedding; lora: the U-Net with LoRA adapters
    objective: LcmObjective
    uncond: torch.Tensor  # (1, L, D): the empty prompt's text states
    names: list[str]  # the student's trained parameters, by name (the EMA target's order)


def check_teacher(ref: str) -> Family:
    """Refuses, from the configs alone (no weights read), a pipeline LCM cannot distil here.

    Raises:
        TeacherNotFoundError: no such pipeline.
        TrainingSetupError: a transformer, SDXL, or a U-Net that already has a guidance embedding.
    """
    config = load_denoiser_config(ref)
    family = family_of(config)
    name = config.get("_class_name", family.name)
    if family.name != "unet":
        raise TrainingSetupError(
            f"{ref} is a {name} pipeline; bksdm lcm distils U-Net pipelines (SD-v1/v2 and their bksdm students): "
            "its DDIM solver and boundary scalings are defined for epsilon/v-prediction DDPM U-Nets, not for "
            "flow-matching transformers"
        )
    if config.get("addition_embed_type"):
        raise TrainingSetupError(
            f"{ref} is an SDXL-style U-Net (addition_embed_type {config['addition_embed_type']!r}); bksdm lcm "
            "distils SD-v1/v2 U-Nets (SDXL's unconditional pooled embedding and micro-conditioning are not handled)"
        )
    if config.get("time_cond_proj_dim"):
        raise TrainingSetupError(
            f"{ref}'s U-Net already has a guidance embedding (time_cond_proj_dim {config['time_cond_proj_dim']}): "
            "it looks like an LCM already; give the pipeline it was distilled from"
        )
    return family


def build_lcm_student(teacher: torch.nn.Module, m: LcmModelConfig, weight_dtype: torch.dtype) -> torch.nn.Module:
    """The student, equal to ``teacher`` before training (``teacher`` itself is not changed).

    full: a U-Net of the teacher's config plus a guidance embedding of width ``m.time_cond_proj_dim`` (diffusers'
    LCM script), with the teacher's weights and the new projection at zero, so ``timestep_cond`` adds nothing yet
    (diffusers' script leaves it random, which starts the student off the teacher); lora: a copy of the teacher,
    frozen in ``weight_dtype``, with fp32 LoRA adapters (B = 0: the identity) on ``m.lora_targets``.

    Raises:
        TrainingSetupError: the teacher's weights do not fit its own config.
    """
    if m.mode == "full":
        student = type(teacher).from_config(dict(teacher.config), time_cond_proj_dim=m.time_cond_proj_dim)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        if set(missing) != {"time_embedding.cond_proj.weight"} or unexpected:
            raise TrainingSetupError(f"the U-Net's weights do not fit its config ({missing}, {unexpected})")
        with torch.no_grad():
            student.time_embedding.cond_proj.weight.zero_()
        return student.to(torch.float32)
    student = copy.deepcopy(teacher).requires_grad_(False).to(weight_dtype)  # a frozen base, as dreambooth's LoRA
    student.add_adapter(lora_config(m.lora_rank, m.lora_alpha, m.lora_targets))
    for param in student.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # the adapters train in fp32
    return student


def load_lcm_models(cfg: LcmConfig, device: torch.device, weight_dtype: torch.dtype) -> LcmModels:
    """Loads the pipeline, builds the student from its U-Net and freezes every teacher part."""
    ref = teacher_or_default(cfg.model.teacher)
    family = check_teacher(ref)
    pipe = load_pipeline(ref)
    teacher = pipe.unet
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingSetupError(f"{ref}: prediction_type {prediction_type!r}; LCM distils epsilon or v_prediction")
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod  # (T,)
    solver = DDIMSolver.from_alphas(alphas, cfg.lcm.num_ddim_timesteps)
    m = cfg.model
    student = build_lcm_student(teacher, m, weight_dtype)
    freeze_teacher_parts(pipe, teacher, device, weight_dtype)
    student.to(device)
    student.train()
    uncond, _ = family.encode_prompt(pipe, [""], device)  # (1, L, D): classifier-free guidance's empty prompt
    objective = LcmObjective(
        solver,
        prediction_type,
        cfg.lcm.loss,
        cfg.lcm.huber_c,
        cfg.lcm.timestep_scaling,
        m.time_cond_proj_dim if m.mode == "full" else None,
    )
    names = [name for name, p in student.named_parameters() if p.requires_grad]
    return LcmModels(ref, pipe, family, teacher, student, objective, uncond, names)
