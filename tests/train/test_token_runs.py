"""Identical trailing text tokens run as one weighted token (bksdm.families.token_runs) inside kd_step: the same
losses and gradients as the stock token count, on SD3 and SD3.5 (query/key norms, dual attention) students."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from bksdm.families import FAMILIES, denoiser_of, family_of
from bksdm.families.token_runs import (
    RepeatedTokenAttnProcessor,
    attn_processors,
    fold_tail,
    trailing_repeats,
    unfold_tail,
)
from bksdm.plan.spec import ALL_PRESETS
from bksdm.plan.surgery import build_student
from bksdm.train.kd import LossWeights, draw_noise, kd_step
from bksdm.world.tiny_dit import build_tiny_dit_pipeline

SD3_LAYOUTS = ("sd3", "sd3.5")
BATCH = 2
LATENT = (16, 16, 16)
CLIP, ZEROS = 5, 11  # text tokens: 5 distinct, then 11 zero tokens (T5's place when T5 is left out)


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {layout: build_tiny_dit_pipeline(layout, seed=2) for layout in SD3_LAYOUTS}


def text_with_zero_tail(width: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.cat([torch.randn(BATCH, CLIP, width, generator=gen), torch.zeros(BATCH, ZEROS, width)], dim=1)


# ------------------------------------------------------------------------------------------ pure parts


def test_trailing_repeats_counts_the_shared_tail() -> None:
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(0))
    assert trailing_repeats(x) == 1
    x[:, 4:] = 0.0
    assert trailing_repeats(x) == 3
    x[:, 3] = 0.0
    assert trailing_repeats(x) == 4
    x[1, 3, 2] = 1e-7  # one sample differs in one element: that token is not part of the run
    assert trailing_repeats(x) == 3
    assert trailing_repeats(torch.zeros(2, 6, 4)) == 6
    assert trailing_repeats(torch.randn(2, 1, 4)) == 1
    tail = torch.randn(1, 1, 4)
    x[:, 4:] = tail  # a repeated non-zero token counts too
    assert trailing_repeats(x) == 3


def test_fold_then_unfold_is_the_identity_on_a_run() -> None:
    x = text_with_zero_tail(8)
    count = trailing_repeats(x)
    assert count == ZEROS
    short = fold_tail(x, count)
    assert short.shape == (BATCH, CLIP + 1, 8)
    assert torch.equal(unfold_tail(short, count), x)
    assert unfold_tail(short, 1) is short


# ------------------------------------------------------------------------------------- the processor


@pytest.mark.parametrize("layout", SD3_LAYOUTS)
def test_folded_blocks_equal_the_stock_blocks(pipes, layout) -> None:
    """Every joint block's image and text outputs and the prediction, folded vs stock, to float rounding."""
    transformer = pipes[layout].transformer
    config = transformer.config
    text = text_with_zero_tail(config.joint_attention_dim)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(BATCH, *LATENT, generator=gen),
        timestep=torch.tensor([950.0, 120.0]),
        pooled_projections=torch.randn(BATCH, config.pooled_projection_dim, generator=gen),
    )

    def run(states: torch.Tensor) -> tuple[torch.Tensor, list]:
        outputs: list = []
        handles = [
            b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in transformer.transformer_blocks
        ]
        try:
            with torch.no_grad():
                return transformer(encoder_hidden_states=states, **inputs).sample, outputs
        finally:
            for handle in handles:
                handle.remove()

    stock, stock_blocks = run(text)
    with attn_processors(transformer, RepeatedTokenAttnProcessor(ZEROS)):
        folded, folded_blocks = run(fold_tail(text, ZEROS))
    torch.testing.assert_close(folded, stock, rtol=0, atol=1e-5)
    for (s_text, s_image), (f_text, f_image) in zip(stock_blocks, folded_blocks, strict=True):
        torch.testing.assert_close(f_image, s_image, rtol=0, atol=1e-5)
        if s_text is None:  # the last block (context_pre_only) ends the text stream
            assert f_text is None
        else:
            torch.testing.assert_close(unfold_tail(f_text, ZEROS), s_text, rtol=0, atol=1e-5)
    # one unweighted token is not eleven: the bias is what makes it exact
    with attn_processors(transformer, RepeatedTokenAttnProcessor(1)):
        unweighted, _ = run(fold_tail(text, ZEROS))
    assert (unweighted - stock).abs().max() > 1e-3
    assert {type(p) for p in transformer.attn_processors.values()} == {JointAttnProcessor2_0}


# ------------------------------------------------------------------------------------------ kd_step


def kd_setup(pipe) -> tuple:
    teacher = denoiser_of(pipe)
    family = family_of(teacher)
    resolved = family.resolve(ALL_PRESETS["keep-half"], dict(teacher.config))
    student = build_student(teacher, resolved).student.train()
    scheduler = family.training_scheduler(pipe.scheduler.config)
    timesteps, noise, _ = draw_noise(
        0, 0, range(BATCH), LATENT, 1000, "cpu", lambda g: family.sample_timestep(g, scheduler.config, LATENT)
    )
    gen = torch.Generator().manual_seed(3)
    config = teacher.config
    inputs = {
        "latents": torch.randn(BATCH, *LATENT, generator=gen),
        "encoder_hidden_states": text_with_zero_tail(config.joint_attention_dim),
        "timesteps": timesteps,
        "noise": noise,
        "added_cond_kwargs": family.conditioning(
            torch.randn(BATCH, config.pooled_projection_dim, generator=gen), 128, "cpu", config
        ),
        "feature_pairs": resolved.feature_pairs(),
        "weights": LossWeights(),
        "family": family,
    }
    return teacher, student, scheduler, inputs


def losses_and_grads(student, teacher, scheduler, inputs, fold: bool) -> tuple[dict, dict]:
    student.zero_grad(set_to_none=True)
    losses = kd_step(student, teacher, scheduler, **inputs, fold_text=fold)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("layout", SD3_LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_kd_step_folded_equals_the_stock_token_count(pipes, layout, checkpointing) -> None:
    teacher, student, scheduler, inputs = kd_setup(pipes[layout])
    if checkpointing:  # the student is then run unfolded (its backward recomputes blocks with stock processors)
        student.enable_gradient_checkpointing()
    calls: list[int] = []  # text lengths the teacher's and the student's blocks saw
    hooks = [
        m.context_embedder.register_forward_hook(lambda _m, _i, out: calls.append(out.shape[1]))
        for m in (teacher, student)
    ]
    try:
        stock_losses, stock_grads = losses_and_grads(student, teacher, scheduler, inputs, fold=False)
        assert calls == [CLIP + ZEROS, CLIP + ZEROS]
        calls.clear()
        losses, grads = losses_and_grads(student, teacher, scheduler, inputs, fold=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls[0] == CLIP + 1  # the teacher always runs folded
    assert calls[1] == (CLIP + ZEROS if checkpointing else CLIP + 1)
    for key, value in stock_losses.items():
        assert value > 0, key
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=0, msg=key)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for model in (teacher, student):
        assert {type(p) for p in model.attn_processors.values()} == {JointAttnProcessor2_0}


def test_only_sd3_folds_its_text() -> None:
    """FLUX rotates text tokens by position ids and U-Nets' cross-attention is not joint: neither folds."""
    assert {name for name, family in FAMILIES.items() if family.folds_text} == {"sd3"}
