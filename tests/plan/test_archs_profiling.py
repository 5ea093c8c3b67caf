"""Tests for bksdm.plan.archs (exact real configs) and bksdm.profiling (params, MACs, latency, memory).

The real models are built on the meta device: shapes only, no memory, so even SDXL is counted in a second.
"""

from __future__ import annotations

import time

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from bksdm.plan.archs import (
    ARCHS,
    build_scheduler,
    build_text_encoders,
    build_unet,
    build_vae,
    get_arch,
)
from bksdm.profiling import (
    LatencyStat,
    MacCount,
    count_macs,
    count_params,
    measure_latency,
    peak_memory,
    text_encoder_inputs,
    unet_inputs,
    vae_decoder_inputs,
)

META = "meta"


def _rel(measured: float, published: float) -> float:
    return abs(measured - published) / published


def _hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def _attention_macs(stages: list[tuple[int, int, int]], context_len: int = 77) -> int:
    """QK^T + AV of transformer blocks with one self- and one cross-attention each.

    Args:
        stages: (tokens, channels, number of transformer blocks) per resolution.
        context_len: Text tokens seen by cross-attention.
    """
    return sum(n * 2 * tokens * (tokens + context_len) * channels for tokens, channels, n in stages)


# --- archs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sd-v1.4", 859_520_964),
        ("sd-v1.5", 859_520_964),
        ("sd-v2.1-base", 865_910_724),
        ("sd-v2.1", 865_910_724),
        ("sdxl-base", 2_567_463_684),
    ],
)
def test_unet_param_counts_match_published(name: str, expected: int) -> None:
    unet = build_unet(name)
    assert next(unet.parameters()).device.type == "meta"
    assert count_params(unet) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sd-v1.4", {"text_encoder": 123_060_480}),
        ("sd-v2.1-base", {"text_encoder": 340_387_840}),
        ("sdxl-base", {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
    ],
)
def test_text_encoder_param_counts_match_published(name: str, expected: dict[str, int]) -> None:
    encoders = build_text_encoders(name)
    assert {k: count_params(m) for k, m in encoders.items()} == expected


def test_sdxl_text_encoder_classes() -> None:
    encoders = build_text_encoders("sdxl-base")
    assert type(encoders["text_encoder"]).__name__ == "CLIPTextModel"
    assert type(encoders["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert encoders["text_encoder_2"].text_projection.weight.shape == (1280, 1280)


@pytest.mark.parametrize("name", ["sd-v1.4", "sdxl-base"])
def test_vae_decoder_params_exclude_post_quant_conv(name: str) -> None:
    vae = build_vae(name)
    # The published 49,490,179 is `vae.decoder` alone; post_quant_conv (a 4->4 1x1 conv) adds 20.
    assert count_params(vae.decoder) == 49_490_179
    assert count_params(vae.post_quant_conv) == 20


def test_arch_details() -> None:
    assert set(ARCHS) == {"sd-v1.4", "sd-v1.5", "sd-v2.1-base", "sd-v2.1", "sdxl-base"}
    for arch in ARCHS.values():
        assert set(arch.text_encoder_configs) == set(arch.text_encoder_classes)
        assert arch.is_sdxl == (arch.unet_config.get("addition_embed_type") == "text_time")
    assert get_arch("SD-v1.5").unet_config == get_arch("sd-v1.4").unet_config
    v2 = get_arch("sd-v2.1")
    assert (v2.resolution, v2.unet_config["sample_size"]) == (768, 96)
    assert v2.unet_config["upcast_attention"] is True
    assert build_scheduler(v2).config.prediction_type == "v_prediction"
    assert build_scheduler("sd-v2.1-base").config.prediction_type == "epsilon"
    assert type(build_scheduler("sd-v1.4")).__name__ == "PNDMScheduler"
    assert type(build_scheduler("sdxl-base")).__name__ == "EulerDiscreteScheduler"
    xl_vae = build_vae("sdxl-base")
    assert xl_vae.config.scaling_factor == 0.13025 and xl_vae.config.force_upcast
    assert build_vae("sd-v1.4").config.scaling_factor == 0.18215
    assert get_arch("sdxl-base").resolution == 1024


def test_get_arch_unknown_lists_known_names() -> None:
    with pytest.raises(ValueError, match="sd-v1.4.*sdxl-base"):
        get_arch("sd-v3")


def test_build_unet_from_config_on_cpu() -> None:
    config = {**get_arch("sd-v1.4").unet_config, "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8}
    unet = build_unet(config, device="cpu", dtype=torch.float64)
    assert next(unet.parameters()).dtype == torch.float64
    assert not unet.training
    # The registry's dict must not have been touched.
    assert get_arch("sd-v1.4").unet_config["block_out_channels"] == [320, 640, 1280, 1280]


# --- MACs of the real models ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "published_g"), [("sd-v1.4", 338.7), ("sd-v2.1-base", 339.2)])
def test_unet_macs_match_paper(name: str, published_g: float) -> None:
    arch = get_arch(name)
    macs = count_macs(build_unet(arch), **unet_inputs(arch.unet_config, 512, device=META), group_depth=4)
    assert _rel(macs.conv_linear, published_g * 1e9) < 0.005
    assert sum(macs.per_module.values()) == macs.conv_linear
    assert "down_blocks.1.attentions.0" in macs.per_module
    # Four resolutions (64, 32, 16, 8 latents at 512 px): 5 transformer blocks at each of the first three
    # (2 down + 3 up), 1 in the mid block; channels 320/640/1280/1280.
    expected_attention = _attention_macs([(4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1)])
    assert macs.attention == expected_attention
    assert macs.total == macs.conv_linear + macs.attention


def test_sdxl_unet_macs_and_inputs() -> None:
    arch = get_arch("sdxl-base")
    inputs = unet_inputs(arch.unet_config, arch.resolution, device=META)
    assert inputs["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)
    assert inputs["added_cond_kwargs"]["time_ids"].shape == (1, 6)
    assert inputs["encoder_hidden_states"].shape == (1, 77, 2048)
    macs = count_macs(build_unet(arch), **inputs)
    # 64x64 latents (640 ch): 5 attention blocks x 2 layers; 32x32 (1280 ch): 5 x 10 layers + mid 10.
    assert macs.attention == _attention_macs([(4096, 640, 10), (1024, 1280, 60)])
    assert 2.9e12 < macs.conv_linear < 3.1e12  # measured here: 2988.7G at 1024 px


@pytest.mark.parametrize("name", ["sd-v1.4", "sdxl-base"])
def test_text_encoder_macs(name: str) -> None:
    encoder = build_text_encoders(name)["text_encoder"]
    macs = count_macs(encoder, text_encoder_inputs(device=META))
    assert _rel(macs.conv_linear, 6.5e9) < 0.02
    # 12 layers of 77-token self-attention, 768 channels.
    assert macs.attention == 12 * 2 * 77 * 77 * 768


def test_vae_decoder_macs_match_paper() -> None:
    vae = build_vae("sd-v1.4")
    macs = count_macs(vae, vae_decoder_inputs(512, device=META), method="decode")
    assert _rel(macs.conv_linear, 1240.1e9) < 0.005
    assert macs.per_module["post_quant_conv"] == 64 * 64 * 4 * 4
    # One single-head attention over the 64x64 latent (a 4-D input), 512 channels.
    assert macs.attention == 2 * 4096 * 4096 * 512


# --- MACs, by hand ------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)  # (B, 25, 6)
        return self.fc(h) + self.fc(h)  # the same layer twice: counted twice


@pytest.mark.parametrize("device", ["cpu", META])
def test_tiny_model_exact_macs(device: str) -> None:
    with torch.device(device):
        model = _Tiny()
    macs = count_macs(model, torch.zeros(2, 4, 5, 5, device=device))
    conv = 2 * 6 * 5 * 5 * (4 // 2 * 3 * 3)  # output elements x (in/groups x kernel area) = 5400
    fc = 2 * 25 * 3 * 6  # output elements x in_features = 900
    assert macs == MacCount(conv_linear=conv + 2 * fc, attention=0, per_module={"conv": conv, "fc": 2 * fc})
    assert macs.total == 7200
    assert count_macs(nn.Linear(6, 3), torch.zeros(5, 6)).per_module == {"(root)": 90}


def test_diffusers_attention_kwargs_and_positional() -> None:
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8)
    x, ctx = torch.zeros(2, 10, 32), torch.zeros(2, 7, 16)
    by_kwarg = count_macs(attn, x, encoder_hidden_states=ctx)
    by_position = count_macs(attn, x, ctx)
    projections = 2 * 10 * 32 * 32 + 2 * 2 * 7 * 32 * 16 + 2 * 10 * 32 * 32  # to_q, to_k + to_v, to_out
    assert by_kwarg.attention == by_position.attention == 2 * 2 * 4 * 10 * 7 * 8
    assert by_kwarg.conv_linear == projections
    assert count_macs(Attention(query_dim=32, heads=4, dim_head=8), x).attention == 2 * 2 * 4 * 10 * 10 * 8


def test_clip_attention_counted_on_real_weights() -> None:
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100
    )
    model = CLIPTextModel(config).eval()
    real = count_macs(model, text_encoder_inputs(batch=2))
    assert real.attention == 2 * 2 * 2 * 77 * 77 * 32  # layers x (QK^T + AV) x batch x L x L x width
    per_layer_linear = 77 * (4 * 32 * 32 + 2 * 32 * 64)
    assert real.conv_linear == 2 * 2 * per_layer_linear
    with torch.device(META):
        meta_model = CLIPTextModel(config).eval()
    assert count_macs(meta_model, text_encoder_inputs(batch=2, device=META)) == real


def test_tiny_unet_meta_equals_real() -> None:
    config = {
        **get_arch("sd-v1.4").unet_config,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 16,
        "norm_num_groups": 8,
        "layers_per_block": 1,
    }
    real = count_macs(build_unet(config, device="cpu"), **unet_inputs(config, 64), group_depth=4)
    meta = count_macs(build_unet(config), **unet_inputs(config, 64, device=META), group_depth=4)
    assert real == meta
    assert real.conv_linear > 0 and real.attention > 0
    assert set(real.attention_per_module) <= set(real.per_module)


def test_hooks_removed_also_on_error() -> None:
    unet = build_unet("sd-v1.4")
    count_macs(unet, **unet_inputs(unet.config, 256, device=META))
    assert _hooks_left(unet) == 0
    bad = unet_inputs(unet.config, 256, device=META)
    bad["encoder_hidden_states"] = torch.zeros(1, 77, 5, device=META)  # wrong width: forward raises
    with pytest.raises(RuntimeError):
        count_macs(unet, **bad)
    assert _hooks_left(unet) == 0
    with pytest.raises(ValueError):
        count_macs(unet, group_depth=0)


# --- latency and memory -------------------------------------------------------------------------------


def test_measure_latency_returns_repeats_timings() -> None:
    calls = []

    def work() -> None:
        calls.append(1)
        time.sleep(0.01)

    stat = measure_latency(work, warmup=2, repeats=4)
    assert isinstance(stat, LatencyStat)
    assert len(calls) == 6 and len(stat.times) == 4
    assert 0.01 <= stat.min <= stat.median <= max(stat.times)
    with pytest.raises(ValueError):
        measure_latency(work, repeats=0)


def test_peak_memory_cpu_covers_allocation() -> None:
    size = 128 * 2**20

    def allocate() -> None:
        torch.ones(size // 4, dtype=torch.float32)  # touched pages, so they count in the RSS

    peak = peak_memory(allocate)
    assert isinstance(peak, int) and peak >= size
