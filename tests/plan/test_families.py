"""The model-family seam (issue 13): which family a denoiser belongs to, and each family's training maths."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from bksdm.families import FAMILIES, UnknownFamilyError, denoiser_of, family_of
from bksdm.families.base import dynamic_shift, logit_normal
from bksdm.families.flux import FLUX, pack, unpack
from bksdm.families.sd3 import SD3
from bksdm.families.unet import UNET
from bksdm.train.kd import draw_noise
from bksdm.world.tiny import build_tiny_pipeline, tiny_unet_config
from bksdm.world.tiny_dit import build_tiny_dit_pipeline, tiny_dit_config


@pytest.fixture(scope="module")
def dit_pipes() -> dict:
    return {layout: build_tiny_dit_pipeline(layout) for layout in ("sd3", "sd3.5", "flux", "flux-schnell")}


def test_each_denoiser_finds_its_family_by_class_and_by_config(dit_pipes) -> None:
    expected = {"sd3": SD3, "sd3.5": SD3, "flux": FLUX, "flux-schnell": FLUX}
    for layout, family in expected.items():
        transformer = denoiser_of(dit_pipes[layout])
        assert family_of(transformer) is family
        assert family_of(dict(transformer.config)) is family  # in-memory configs have no _class_name
        assert family_of({"_class_name": type(transformer).__name__}) is family
    pipe = build_tiny_pipeline("sd-v1")
    unet = pipe.unet
    assert denoiser_of(pipe) is unet
    assert family_of(unet) is UNET and family_of(tiny_unet_config("sdxl")) is UNET
    assert set(FAMILIES) == {"unet", "sd3", "flux"}


def test_an_unknown_denoiser_is_named_in_the_error() -> None:
    with pytest.raises(UnknownFamilyError, match="PixArtTransformer2DModel.*UNet2DConditionModel"):
        family_of({"_class_name": "PixArtTransformer2DModel", "num_layers": 28})
    with pytest.raises(UnknownFamilyError, match="Linear"):
        family_of(torch.nn.Linear(2, 2))


def test_flow_matching_noises_linearly_and_targets_the_velocity() -> None:
    latents = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    timesteps = torch.tensor([0.0, 250.0, 1000.0])
    noisy, target = SD3.noise(scheduler, latents, noise, timesteps)
    assert torch.equal(noisy[0], latents[0])  # t = 0: clean
    assert torch.allclose(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
    assert torch.allclose(noisy[2], noise[2])  # t = 1000: pure noise
    assert torch.equal(target, noise - latents)


def test_unet_family_noises_as_ddpm() -> None:
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    noisy, target = UNET.noise(scheduler, latents, noise, t)
    assert torch.equal(noisy, scheduler.add_noise(latents, noise, t)) and torch.equal(target, noise)


def test_sd3_timesteps_are_logit_normal_then_shifted() -> None:
    config = {"shift": 3.0, "num_train_timesteps": 1000}
    t = SD3.sample_timestep(torch.Generator().manual_seed(5), config, (16, 8, 8))
    u = logit_normal(torch.Generator().manual_seed(5))
    assert t.shape == (1,) and math.isclose(float(t), 1000 * 3 * u / (1 + 2 * u), rel_tol=1e-6)
    draws = torch.cat([SD3.sample_timestep(torch.Generator().manual_seed(s), config, (16, 8, 8)) for s in range(400)])
    assert float(draws.min()) > 0 and float(draws.max()) < 1000
    # The shift of 3 moves the median from 500 (logit-normal's) to 1000 * 3 * 0.5 / 2 = 750.
    assert abs(float(draws.median()) - 750) < 60


def test_flux_shift_grows_with_the_image_token_count() -> None:
    config = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).config)
    assert math.isclose(dynamic_shift(0.5, config, 256), math.exp(0.5) / (math.exp(0.5) + 1))
    assert math.isclose(dynamic_shift(0.5, config, 4096), math.exp(1.15) / (math.exp(1.15) + 1))
    small = FLUX.shift(0.5, config, (16, 32, 32))  # 256 tokens
    large = FLUX.shift(0.5, config, (16, 128, 128))  # 4096 tokens
    assert small < large


def test_draw_noise_takes_a_family_timestep_density_and_stays_per_sample() -> None:
    config = {"shift": 3.0, "num_train_timesteps": 1000}
    draw = lambda g: SD3.sample_timestep(g, config, (16, 4, 4))  # noqa: E731
    t, noise, eps = draw_noise(7, 3, [0, 1, 2], (16, 4, 4), 1000, "cpu", draw)
    t1, noise1, _ = draw_noise(7, 3, [1], (16, 4, 4), 1000, "cpu", draw)
    assert t.dtype == torch.float32 and torch.equal(t[1:2], t1) and torch.equal(noise[1:2], noise1)
    assert len(set(t.tolist())) == 3 and eps.shape == (3, 16, 4, 4)


def test_flux_packing_round_trips_and_matches_the_pipeline() -> None:
    latents = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    tokens = pack(latents)
    assert tokens.shape == (2, 2 * 3, 64)
    assert torch.equal(unpack(tokens, 4, 6), latents)
    # Token 0 holds the top-left 2x2 patch of every channel, channel-major as the pipeline packs it.
    assert torch.equal(tokens[0, 0, :4], latents[0, 0, :2, :2].reshape(4))


@pytest.mark.parametrize("layout", ["sd3", "sd3.5", "flux", "flux-schnell"])
def test_the_family_call_and_prompt_encoding_fit_the_stock_denoiser(dit_pipes, layout) -> None:
    pipe = dit_pipes[layout]
    family = family_of(pipe.transformer)
    text, pooled = family.encode_prompt(pipe, ["a red circle", "a blue square"], "cpu")
    expected_text = {"sd3": (2, 77 + 32, 32), "flux": (2, 32, 32)}[family.name]  # the tiny T5 pads to 32 tokens
    assert tuple(text.shape) == expected_text and pooled.shape[0] == 2
    extra = family.conditioning(pooled, 128, "cpu", pipe.transformer.config)
    assert ("guidance" in extra) == (layout == "flux")
    noisy = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    out = family.call(pipe.transformer, noisy, torch.tensor([500.0, 20.0]), text, extra)
    assert out.shape == noisy.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_step_macs_scale_with_the_image_side(layout) -> None:
    family = SD3 if layout == "sd3" else FLUX
    config = tiny_dit_config(layout)
    small, large = family.step_macs(config, 128, 8), family.step_macs(config, 256, 8)
    assert 0 < small.conv_linear < large.conv_linear
