"""Self-attention feature sites (KOALA's choice for SDXL students): derived from the plan, exact on identity."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from bksdm.plan.resolved import resolve
from bksdm.plan.spec import PRESETS, plan_from_dict
from bksdm.plan.surgery import build_student
from bksdm.train.kd import LossWeights, kd_step
from bksdm.world.tiny import build_tiny_pipeline, tiny_unet_config

HALF_DEPTH = {  # the tiny SDXL's innermost stage and mid block hold 3 transformer blocks per attention
    "name": "tiny-sdxl-depth",
    "base": "bk-base",
    "transformer_blocks": {
        "down_blocks.2.attentions.*": "first:2",
        "up_blocks.0.attentions.*": "first:2",
        "mid_block.attentions.0": "first:2",
    },
}


def test_each_kept_block_is_matched_at_the_end_of_the_run_it_replaces() -> None:
    resolved = resolve(plan_from_dict(HALF_DEPTH), tiny_unet_config("sdxl"))
    pairs = {p.student: p.teacher for p in resolved.self_attention_pairs()}
    assert len(pairs) == 14 and all(p.stream == "self-attention" for p in resolved.self_attention_pairs())
    # Blocks 0 and 1 of 3 kept: block 0 stands for itself, block 1 for teacher blocks 1 and 2.
    assert pairs["down_blocks.2.attentions.0.transformer_blocks.1.attn1"] == (
        "down_blocks.2.attentions.0.transformer_blocks.2.attn1"
    )
    assert (
        pairs["mid_block.attentions.0.transformer_blocks.0.attn1"]
        == "mid_block.attentions.0.transformer_blocks.0.attn1"
    )
    # bk-base keeps the first and last layer of an up stage: student attention 1 is the teacher's attention 2.
    assert pairs["up_blocks.0.attentions.1.transformer_blocks.1.attn1"] == (
        "up_blocks.0.attentions.2.transformer_blocks.2.attn1"
    )
    assert not any(k.startswith("down_blocks.0") for k in pairs)  # SDXL's first stage has no attention


def test_sd_v1_bk_tiny_has_one_site_per_kept_attention() -> None:
    resolved = resolve(PRESETS["bk-tiny"], tiny_unet_config("sd-v1"))
    students = [p.student for p in resolved.self_attention_pairs()]
    assert students == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
    ]


def test_self_attention_kd_is_zero_for_identity_and_positive_for_a_pruned_student() -> None:
    pipe = build_tiny_pipeline("sdxl")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 77, 96, generator=g)
    extra = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.zeros(1, 6)}
    terms = {}
    for name, plan in (("identity", PRESETS["identity"]), ("depth", plan_from_dict(HALF_DEPTH))):
        resolved = resolve(plan, dict(pipe.unet.config))
        student = build_student(pipe.unet, resolved).student
        with torch.no_grad():
            losses = kd_step(
                student, pipe.unet, scheduler, latents, text, torch.tensor([500]), noise,
                resolved.self_attention_pairs(), LossWeights(), extra,
            )  # fmt: skip
        terms[name] = float(losses["loss_kd_feat"])
    assert terms["identity"] < 1e-10 and terms["depth"] > 1e-3
