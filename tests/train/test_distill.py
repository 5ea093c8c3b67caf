"""Distillation on tiny SD-shaped teachers: loss values, hooks, frozen teacher, seeding, DDP, mixed precision."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from torch import nn

from bksdm.plan.resolved import resolve
from bksdm.plan.spec import PRESETS
from bksdm.plan.surgery import build_student
from bksdm.train.kd import FeatureTap, LossWeights, diffusion_target, draw_noise, kd_losses, kd_step, unwrap
from bksdm.world.tiny import build_tiny_pipeline

BATCH = 2


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {layout: build_tiny_pipeline(layout, seed=1) for layout in ("sd-v1", "sd-v2-v", "sdxl")}


def setup(pipes: dict, layout: str, preset: str) -> tuple:
    """Teacher, student, training scheduler and feature pairs for a layout and a preset."""
    pipe = pipes[layout]
    teacher = pipe.unet
    resolved = resolve(PRESETS[preset], dict(teacher.config))
    student = build_student(teacher, resolved).student
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return teacher, student, scheduler, resolved.feature_pairs()


def batch(config: dict, seed: int = 0) -> dict:
    """Unit-scale latents, text states, timesteps and noise (SDXL: with added conditioning)."""
    side = config["sample_size"]
    gen = torch.Generator().manual_seed(seed)
    timesteps, noise, _ = draw_noise(seed, 0, range(BATCH), (4, side, side), 1000, "cpu")
    inputs = {
        "latents": torch.randn(BATCH, 4, side, side, generator=gen),
        "encoder_hidden_states": torch.randn(BATCH, 77, config["cross_attention_dim"], generator=gen),
        "timesteps": timesteps,
        "noise": noise,
    }
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(BATCH, text_dim, generator=gen),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * BATCH),
        }
    return inputs


def forward_hooks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks]


# ------------------------------------------------------------------------------------------ losses


def test_kd_losses_equal_hand_computed_mse() -> None:
    gen = torch.Generator().manual_seed(0)
    s_pred, t_pred, target = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    s_feats = [torch.randn(2, 5, 3, 3, generator=gen), torch.randn(2, 9, 6, generator=gen)]
    t_feats = [torch.randn(2, 5, 3, 3, generator=gen), torch.randn(2, 9, 6, generator=gen)]
    weights = LossWeights(task=0.5, out=2.0, feat=3.0)
    got = kd_losses(s_pred, t_pred, target, s_feats, t_feats, weights)

    task = ((s_pred - target) ** 2).mean()
    out = ((s_pred - t_pred) ** 2).mean()
    feat = ((s_feats[0] - t_feats[0]) ** 2).mean() + ((s_feats[1] - t_feats[1]) ** 2).mean()
    assert torch.allclose(got["loss_task"], task, rtol=1e-6, atol=0)
    assert torch.allclose(got["loss_kd_out"], out, rtol=1e-6, atol=0)
    assert torch.allclose(got["loss_kd_feat"], feat, rtol=1e-6, atol=0)
    assert torch.allclose(got["loss"], 0.5 * task + 2.0 * out + 3.0 * feat, rtol=1e-6, atol=0)
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in got.values())


def test_kd_losses_are_float32_for_half_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    got = kd_losses(a.bfloat16(), b.bfloat16(), b, [a.bfloat16()], [b], LossWeights())
    expected = ((a.bfloat16().float() - b) ** 2).mean()
    assert got["loss_task"].dtype == torch.float32
    assert torch.allclose(got["loss_task"], expected, rtol=1e-6, atol=0)
    assert torch.allclose(got["loss_kd_feat"], expected, rtol=1e-6, atol=0)


def test_kd_losses_reject_mismatched_features() -> None:
    pred = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"pair 1.*\(1, 8, 2, 2\).*\(1, 8, 4, 4\)"):
        kd_losses(pred, pred, pred, [pred, torch.zeros(1, 8, 2, 2)], [pred, torch.zeros(1, 8, 4, 4)], LossWeights())
    with pytest.raises(ValueError, match="2 student features but 1 teacher"):
        kd_losses(pred, pred, pred, [pred, pred], [pred], LossWeights())


def test_kd_losses_task_only_needs_no_teacher() -> None:
    a, b = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    got = kd_losses(a, None, b, [], None, LossWeights(task=1.0, out=0.0, feat=0.0))
    assert got["loss"].item() == 1.0 and got["loss_kd_out"].item() == 0.0 and got["loss_kd_feat"].item() == 0.0
    with pytest.raises(ValueError, match="teacher outputs are needed"):
        kd_losses(a, None, b, [], None, LossWeights(out=0.0))
    with pytest.raises(ValueError, match=">= 0"):
        LossWeights(feat=-1.0)


# ------------------------------------------------------------------------------------------ kd_step


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_identity_student_has_zero_kd_terms(pipes: dict, onednn: str, monkeypatch) -> None:
    monkeypatch.setenv("BKSDM_ONEDNN", onednn)
    teacher, student, scheduler, pairs = setup(pipes, "sd-v1", "identity")
    assert len(pairs) == 8
    losses = kd_step(
        student, teacher, scheduler, **batch(dict(teacher.config)), feature_pairs=pairs, weights=LossWeights()
    )
    assert losses["loss_task"].item() > 0.1
    if onednn == "0":  # the same kernels for both: exactly zero
        assert losses["loss_kd_out"].item() == 0.0
        assert losses["loss_kd_feat"].item() == 0.0
        assert losses["loss"].item() == losses["loss_task"].item()
    else:  # the frozen teacher's convolutions use packed weights, the student's not: zero to float rounding
        assert losses["loss_kd_out"].item() < 1e-10
        assert losses["loss_kd_feat"].item() < 1e-10
        assert losses["loss"].item() == pytest.approx(losses["loss_task"].item(), rel=1e-9)


@pytest.mark.parametrize("preset", ["bk-small", "bk-tiny"])
def test_pruned_student_has_positive_kd_terms(pipes: dict, preset: str) -> None:
    teacher, student, scheduler, pairs = setup(pipes, "sd-v1", preset)
    assert len(pairs) == (8 if preset == "bk-small" else 6)
    losses = kd_step(
        student, teacher, scheduler, **batch(dict(teacher.config)), feature_pairs=pairs, weights=LossWeights()
    )
    assert losses["loss_kd_out"].item() > 0 and losses["loss_kd_feat"].item() > 0 and losses["loss_task"].item() > 0
    expected = losses["loss_task"] + losses["loss_kd_out"] + losses["loss_kd_feat"]
    assert torch.allclose(losses["loss"], expected, rtol=1e-6, atol=0)
    assert set(losses) == {"loss", "loss_task", "loss_kd_out", "loss_kd_feat"}


def test_kd_step_freezes_teacher_trains_student_and_leaves_no_hooks(pipes: dict) -> None:
    teacher, student, scheduler, pairs = setup(pipes, "sd-v1", "bk-small")
    student.train()
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())  # nothing to hide behind
    grad_mode = []  # no_grad keeps the teacher from storing activations for a backward that never comes
    handle = teacher.register_forward_pre_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))
    try:
        losses = kd_step(
            student, teacher, scheduler, **batch(dict(teacher.config)), feature_pairs=pairs, weights=LossWeights()
        )
    finally:
        handle.remove()
    assert grad_mode == [False]
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert forward_hooks(teacher) == [] and forward_hooks(student) == []


def test_task_only_ablation_skips_the_teacher(pipes: dict) -> None:
    teacher, student, scheduler, pairs = setup(pipes, "sd-v1", "bk-small")
    calls = []
    handle = teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        inputs = batch(dict(teacher.config))
        only = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights(1.0, 0.0, 0.0))
        assert calls == []
        full = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
        assert calls == [1]
    finally:
        handle.remove()
    assert only["loss_kd_out"].item() == 0.0 and only["loss_kd_feat"].item() == 0.0
    assert torch.equal(only["loss"], only["loss_task"])
    assert torch.equal(only["loss_task"], full["loss_task"])


def test_bf16_teacher_with_fp32_student(pipes: dict) -> None:
    teacher, student, scheduler, pairs = setup(pipes, "sd-v1", "bk-small")
    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    inputs = batch(dict(teacher.config))
    losses = kd_step(student, teacher_bf16, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
    reference = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
    for key, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    # the task term never sees the teacher; the KD terms do, at bf16's precision
    assert torch.equal(losses["loss_task"], reference["loss_task"])
    assert losses["loss_kd_out"].item() != reference["loss_kd_out"].item()
    assert math.isclose(losses["loss_kd_out"].item(), reference["loss_kd_out"].item(), rel_tol=0.1)
    assert next(teacher_bf16.parameters()).dtype == torch.bfloat16


def test_sdxl_with_added_conditioning(pipes: dict) -> None:
    teacher, student, scheduler, pairs = setup(pipes, "sdxl", "bk-small")
    inputs = batch(dict(teacher.config))
    losses = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_kd_out"].item() > 0 and losses["loss_kd_feat"].item() > 0
    # the conditioning really reaches both models
    inputs["added_cond_kwargs"] = {k: v + 1 for k, v in inputs["added_cond_kwargs"].items()}
    other = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
    assert other["loss_task"].item() != losses["loss_task"].item()


@pytest.mark.slow
def test_ddp_wrapped_student_matches_unwrapped(pipes: dict, tmp_path) -> None:
    teacher, student, scheduler, pairs = setup(pipes, "sd-v1", "bk-small")
    inputs = batch(dict(teacher.config))
    expected = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
    expected["loss"].backward()
    expected_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(student)
        assert unwrap(wrapped) is student
        losses = kd_step(wrapped, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
        losses["loss"].backward()
    finally:
        dist.destroy_process_group()
    for key in expected:
        assert torch.equal(losses[key], expected[key]), key
    for name, param in student.named_parameters():
        assert param.grad is not None, name
        assert torch.allclose(param.grad, expected_grads[name], rtol=1e-6, atol=1e-8), name
    assert forward_hooks(student) == []


# ------------------------------------------------------------------------------------------ FeatureTap


def test_feature_tap_records_outputs_in_address_order(pipes: dict) -> None:
    unet = pipes["sd-v1"].unet
    inputs = batch(dict(unet.config))
    sample, t, text = inputs["latents"], inputs["timesteps"], inputs["encoder_hidden_states"]
    addresses = ["up_blocks.3", "conv_in", "down_blocks.1.attentions.0"]
    with torch.no_grad(), FeatureTap(unet, addresses) as tap:
        out = unet(sample, t, encoder_hidden_states=text).sample
        features = tap.features
        assert sorted(forward_hooks(unet)) == sorted(addresses)
    assert forward_hooks(unet) == []
    assert [tuple(f.shape) for f in features] == [(2, 32, 16, 16), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert torch.equal(features[1], unet.conv_in(sample))
    assert torch.equal(unet.conv_out(unet.conv_act(unet.conv_norm_out(features[0]))), out)
    tap.clear()
    with pytest.raises(RuntimeError, match="'up_blocks.3'"):
        _ = tap.features


def test_feature_tap_unwraps_wrappers(pipes: dict) -> None:
    unet = pipes["sd-v1"].unet

    class Wrapper(nn.Module):  # the shape of DDP / accelerate wrappers and torch.compile's OptimizedModule
        def __init__(self, inner: nn.Module, attribute: str):
            super().__init__()
            setattr(self, attribute, inner)

    wrapped = Wrapper(Wrapper(unet, "_orig_mod"), "module")
    assert unwrap(wrapped) is unet and unwrap(unet) is unet
    with FeatureTap(wrapped, ["conv_in"]) as tap:
        x = torch.randn(1, 4, 16, 16)
        with torch.no_grad():
            expected = unet.conv_in(x)
        assert torch.equal(tap.features[0], expected)
    assert forward_hooks(unet) == []


def test_feature_tap_removes_hooks_when_forward_raises(pipes: dict) -> None:
    unet = pipes["sd-v1"].unet
    bad_text = torch.zeros(1, 77, 5)  # wrong cross-attention width
    with pytest.raises(RuntimeError), FeatureTap(unet, ["down_blocks.0", "conv_in"]):
        assert len(forward_hooks(unet)) == 2
        unet(torch.zeros(1, 4, 16, 16), torch.tensor([1]), encoder_hidden_states=bad_text)
    assert forward_hooks(unet) == []


def test_feature_tap_unknown_address() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="down_blocks.9"):
        FeatureTap(model, ["0", "down_blocks.9"])
    assert forward_hooks(model) == []


# ------------------------------------------------------------------------------------------ randomness


def test_draw_noise_depends_only_on_seed_step_and_position() -> None:
    shape = (4, 8, 8)
    t_all, n_all, e_all = draw_noise(7, 3, [0, 1, 2, 3], shape, 1000, "cpu")
    t_sub, n_sub, e_sub = draw_noise(7, 3, torch.tensor([2, 3]), shape, 1000, "cpu")
    assert t_all.dtype == torch.long and t_all.shape == (4,)
    assert n_all.dtype == e_all.dtype == torch.float32 and n_all.shape == e_all.shape == (4, *shape)
    assert torch.equal(t_all[2:], t_sub) and torch.equal(n_all[2:], n_sub) and torch.equal(e_all[2:], e_sub)
    assert not torch.equal(n_all[0], n_all[1]) and not torch.equal(n_all[0], e_all[0])
    t_next, n_next, e_next = draw_noise(7, 4, [0, 1, 2, 3], shape, 1000, "cpu")
    assert not torch.equal(n_next, n_all) and not torch.equal(e_next, e_all) and not torch.equal(t_next, t_all)
    assert not torch.equal(draw_noise(8, 3, [0], shape, 1000, "cpu")[1], n_all[:1])


def test_draw_noise_timesteps_are_uniform() -> None:
    t, _, _ = draw_noise(0, 0, range(2000), (1, 1, 1), 10, "cpu")
    counts = torch.bincount(t, minlength=10)
    assert t.min() >= 0 and t.max() <= 9 and counts.numel() == 10
    assert counts.min() > 150 and counts.max() < 250  # 200 expected per bin


# ------------------------------------------------------------------------------------------ targets


def test_diffusion_target_follows_prediction_type(pipes: dict) -> None:
    config = pipes["sd-v2-v"].scheduler.config
    scheduler = DDPMScheduler.from_config(config)
    assert scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    t = torch.tensor([5, 900])
    v = diffusion_target(scheduler, latents, noise, t)
    assert torch.equal(v, scheduler.get_velocity(latents, noise, t))
    alpha_bar = scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    assert torch.allclose(v, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents, atol=1e-6)

    eps = DDPMScheduler.from_config(config, prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    with pytest.raises(ValueError, match="'sample'"):
        diffusion_target(DDPMScheduler.from_config(config, prediction_type="sample"), latents, noise, t)


def test_v_prediction_teacher_distils_velocity(pipes: dict) -> None:
    teacher, student, scheduler, pairs = setup(pipes, "sd-v2-v", "identity")
    inputs = batch(dict(teacher.config))
    losses = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
    noisy = scheduler.add_noise(inputs["latents"], inputs["noise"], inputs["timesteps"])
    with torch.no_grad():
        pred = teacher(noisy, inputs["timesteps"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    velocity = scheduler.get_velocity(inputs["latents"], inputs["noise"], inputs["timesteps"])
    assert torch.allclose(losses["loss_task"], ((pred - velocity) ** 2).mean(), rtol=1e-5, atol=0)
    # An identical student: zero but for float rounding (the frozen teacher runs on packed oneDNN weights).
    assert losses["loss_kd_out"].item() < 1e-10


def test_fused_adamw_takes_the_same_steps_as_the_for_each_one() -> None:
    from bksdm.train.config import OptimConfig
    from bksdm.train.distill import make_optimizer

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    inputs, targets = torch.randn(32, 8), torch.randn(32, 4)
    finals = []
    for fused in (True, False):
        model = copy.deepcopy(base)
        optimizer = make_optimizer(model.parameters(), OptimConfig(fused_adam=fused), lr=1e-2)
        assert optimizer.defaults["fused"] is fused
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    assert (finals[0] - start).abs().max() > 1e-3  # it really trained
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("force_upcast", "weight", "expected"),
    [
        (True, torch.float16, torch.float32),  # SD's VAEs may overflow in fp16: fp32, as diffusers' pipelines do
        (False, torch.float16, torch.float16),  # a VAE fixed for fp16 stays in fp16
        (True, torch.bfloat16, torch.bfloat16),  # bf16 has fp32's range: never upcast
        (True, torch.float32, torch.float32),
    ],
)
def test_vae_runs_in_fp32_only_where_fp16_would_overflow(force_upcast, weight, expected) -> None:
    from types import SimpleNamespace

    from bksdm.train.encoders import vae_dtype

    vae = SimpleNamespace(config={"force_upcast": force_upcast})
    assert vae_dtype(vae, weight) == expected


# ------------------------------------------------------------------------------------------ CPU kernels


def _onednn_calls(fn) -> tuple[object, list[str]]:
    """``fn()``'s result and the names of the oneDNN operators it called (from the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = sorted({e.key for e in prof.key_averages() if "pointwise" in e.key or "mkldnn_convolution" in e.key})
    return out, names


def test_cpu_kernels_linear_forward_and_backward_equal_the_default_ones(monkeypatch) -> None:
    from bksdm.train.cpu_kernels import cpu_kernels

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 48, generator=gen)
    layer = nn.Linear(48, 24)

    def run(onednn: bool):
        monkeypatch.setenv("BKSDM_ONEDNN", "1" if onednn else "0")
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        with cpu_kernels():
            out = layer(xi)
        out.pow(2).sum().backward()
        return out.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()

    ours, names = _onednn_calls(lambda: run(True))
    stock, stock_names = _onednn_calls(lambda: run(False))
    assert names == ["mkldnn::_linear_pointwise"] and stock_names == []
    for a, b in zip(ours, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, torch.zeros_like(a))


def test_cpu_kernels_pack_a_frozen_conv_weight_once_and_again_when_it_changes() -> None:
    from bksdm.train.cpu_kernels import _PACKED, cpu_kernels

    conv = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(0))  # the weight outweighs the input
    with cpu_kernels():
        first = conv(x)
        packed = _PACKED[id(conv.weight)][-1]
        again = conv(x)
        assert _PACKED[id(conv.weight)][-1] is packed  # reused, not packed on every call
        torch.testing.assert_close(first, nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
        assert torch.equal(first, again)
        conv.weight.mul_(2)  # an in-place change (loading other weights) makes a new packing
        changed = conv(x)
        assert _PACKED[id(conv.weight)][-1] is not packed
    torch.testing.assert_close(changed, nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    key = id(conv.weight)
    del conv
    assert key not in _PACKED  # dropped with the weight
    big = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    with cpu_kernels():
        big(torch.randn(1, 8, 32, 32))  # an activation larger than the weight: PyTorch's own convolution
    assert id(big.weight) not in _PACKED


@pytest.mark.parametrize(
    ("channels", "size", "stride", "padding", "dilation", "bias"),
    [((64, 320), (4, 4), 1, 1, 1, True), ((48, 400), (7, 5), 2, 1, 1, True), ((40, 512), (4, 3), 1, 2, 2, False)],
)
def test_cpu_kernels_train_a_large_kernel_over_few_positions_as_an_unfolded_product(
    channels, size, stride, padding, dilation, bias, monkeypatch
) -> None:
    from bksdm.train.cpu_kernels import IM2COL_MIN_WEIGHTS_PER_ROW, cpu_kernels

    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(*channels, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(1, channels[0], *size, generator=gen)
    target = None

    def run(onednn: bool, train_weight: bool = True):
        nonlocal target
        monkeypatch.setenv("BKSDM_ONEDNN", "1" if onednn else "0")
        conv.zero_grad(set_to_none=True)
        conv.requires_grad_(train_weight)
        xi = x.clone().requires_grad_()
        with cpu_kernels():
            out = conv(xi)
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if target is None else target
        (out * target).sum().backward()
        grads = [p.grad for p in conv.parameters()]
        return out.detach(), xi.grad, *grads

    ours, names = _onednn_calls(lambda: run(True))
    stock, _ = _onednn_calls(lambda: run(False))
    rows = ours[0].shape[0] * ours[0].shape[2] * ours[0].shape[3]
    assert conv.weight.numel() >= IM2COL_MIN_WEIGHTS_PER_ROW * rows  # the case the unfolded product is for
    assert ours[0].shape == stock[0].shape and ours[0].is_contiguous()
    assert names == ["mkldnn::_linear_pointwise"]  # one matrix product each way, no convolution kernel
    for a, b in zip(ours, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, torch.zeros_like(a))
    frozen, stock_frozen = run(True, train_weight=False), run(False, train_weight=False)
    assert all(grad is None for grad in frozen[2:])  # a frozen weight (LoRA, adapters) gets no gradient
    torch.testing.assert_close(frozen[1], stock_frozen[1], rtol=1e-5, atol=1e-5)


def test_cpu_kernels_leave_a_trained_kernel_over_many_positions_to_pytorch() -> None:
    from bksdm.train.cpu_kernels import cpu_kernels

    conv = nn.Conv2d(64, 320, 3, padding=1)
    x = torch.randn(1, 64, 16, 16)  # 256 output rows: 184,320 weights are too few for the unfolded product
    with cpu_kernels():
        _, names = _onednn_calls(lambda: conv(x).sum().backward())
    assert "mkldnn::_linear_pointwise" not in names


def test_cpu_kernels_leave_half_precision_and_autocast_to_pytorch() -> None:
    from bksdm.train.cpu_kernels import cpu_kernels

    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with cpu_kernels():
        (_, bf16) = _onednn_calls(lambda: layer.to(torch.bfloat16)(x.to(torch.bfloat16)))
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (out, autocast) = _onednn_calls(lambda: layer(x))
    assert bf16 == [] and autocast == [] and out.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["sd-v1", "sdxl"])
def test_kd_step_on_onednn_kernels_equals_the_default_kernels(pipes: dict, layout: str, monkeypatch) -> None:
    teacher, student, scheduler, pairs = setup(pipes, layout, "bk-small")
    student.train()
    inputs = batch(dict(teacher.config))

    def run(flag: str) -> tuple[dict, list]:
        monkeypatch.setenv("BKSDM_ONEDNN", flag)
        student.zero_grad(set_to_none=True)
        losses = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
        losses["loss"].backward()
        return {k: v.detach() for k, v in losses.items()}, [p.grad.clone() for p in student.parameters()]

    (ours, ours_grads), names = _onednn_calls(lambda: run("1"))
    (stock, stock_grads), stock_names = _onednn_calls(lambda: run("0"))
    assert "mkldnn::_linear_pointwise" in names and "mkldnn::_convolution_pointwise" in names
    assert not any("pointwise" in name for name in stock_names)  # (PyTorch's own convolutions use oneDNN too)
    for key in stock:
        torch.testing.assert_close(ours[key], stock[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, stock_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_student_checkpointed_with_the_kernels_runs_them_and_equals_the_default_kernels(pipes, monkeypatch) -> None:
    from bksdm.train.cpu_kernels import kernel_checkpointing, student_kernels

    teacher, student, scheduler, pairs = setup(pipes, "sd-v1", "bk-small")
    student.train()
    inputs = batch(dict(teacher.config))

    def run(flag: str) -> tuple[tuple, int]:
        monkeypatch.setenv("BKSDM_ONEDNN", flag)
        student.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            losses = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights())
            losses["loss"].backward()  # the checkpointed blocks are recomputed here
        calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
        return ({k: v.detach() for k, v in losses.items()}, [p.grad.clone() for p in student.parameters()]), calls

    student.enable_gradient_checkpointing()  # diffusers' own: recomputed outside the kernels, so none for the student
    assert isinstance(student_kernels(student, "cpu"), contextlib.nullcontext)
    _, teacher_only_calls = run("1")
    student.enable_gradient_checkpointing(kernel_checkpointing())
    assert not isinstance(student_kernels(student, "cpu"), contextlib.nullcontext)
    (ours, ours_grads), calls = run("1")
    (stock, stock_grads), stock_calls = run("0")
    assert calls > teacher_only_calls > 0 and stock_calls == 0  # the student's layers joined, recomputation too
    for key in stock:
        torch.testing.assert_close(ours[key], stock[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, stock_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ema_update_equals_diffusers_ema_step() -> None:
    from diffusers.training_utils import EMAModel

    from bksdm.train.kd import ema_update

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].bias.requires_grad_(False)  # a frozen parameter is copied, not averaged
    ours = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, update_after_step=1)
    reference = copy.deepcopy(ours)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema_update(ours, model.parameters())
        reference.step(model.parameters())
        assert ours.optimization_step == reference.optimization_step
        assert ours.cur_decay_value == reference.cur_decay_value
        for a, b in zip(ours.shadow_params, reference.shadow_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ours.cur_decay_value > 0  # the decay did act (update_after_step passed)
    assert torch.equal(ours.shadow_params[-1], model[1].bias)
    assert not torch.equal(ours.shadow_params[0], model[0].weight)
    with pytest.raises(ValueError, match="3 were given"):
        ema_update(ours, list(model.parameters())[:3])
