"""The tiny pipelines: stock diffusers loads and runs them, seeds reproduce, and layouts are SD's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from bksdm.world.tiny import (
    LATENT_SIZE,
    LAYOUTS,
    VAE_SCALE_FACTOR,
    WHOLE_WORDS,
    build_tiny_pipeline,
    build_tiny_tokenizer,
    tiny_unet_config,
    tiny_vae_config,
)

IMAGE_SIZE = LATENT_SIZE * VAE_SCALE_FACTOR


def _generate(pipe: Any, **kwargs: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def _module_shapes(unet: UNet2DConditionModel) -> dict[str, int]:
    """Parameter name -> number of dimensions: the layout, independent of widths."""
    return {name: param.ndim for name, param in unet.named_parameters()}


def _real_unet(**config: Any) -> UNet2DConditionModel:
    # On the meta device a full-size U-Net costs no memory and builds in milliseconds.
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


# ------------------------------------------------------------------------------ stock loading


@pytest.mark.parametrize(
    ("fixture", "pipeline_cls"),
    [
        ("tiny_sd_dir", StableDiffusionPipeline),
        ("tiny_sd2_dir", StableDiffusionPipeline),
        ("tiny_sdxl_dir", StableDiffusionXLPipeline),
    ],
)
def test_saved_pipeline_loads_with_stock_diffusers_and_generates(
    fixture: str, pipeline_cls: type, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(fixture)
    assert sorted(p.name for p in path.rglob("*.safetensors"))  # weights are safetensors, not pickles
    assert not list(path.rglob("*.bin"))
    pipe = pipeline_cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR

    image = _generate(pipe)

    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.01  # a random VAE still decodes something, not a constant grey


def test_saved_pipeline_reproduces_the_in_memory_one(tiny_sd_dir: Path, tiny_sd_pipe: StableDiffusionPipeline) -> None:
    reloaded = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(reloaded), _generate(tiny_sd_pipe))
    assert reloaded.safety_checker is None
    assert reloaded.config.requires_safety_checker is False


# ------------------------------------------------------------------------------------ seeds


def _state(pipe: Any) -> dict[str, torch.Tensor]:
    modules = {name: module for name, module in pipe.components.items() if hasattr(module, "state_dict")}
    return {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}


@pytest.mark.parametrize("layout", ["sd-v1", "sdxl"])
def test_same_seed_gives_identical_weights_and_another_seed_does_not(layout: str) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first, second, other = (_state(build_tiny_pipeline(layout, seed)) for seed in (0, 0, 1))
    assert torch.equal(torch.rand(3), before)  # the caller's global RNG is untouched

    assert first.keys() == second.keys() == other.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    random_keys = [k for k in first if first[k].numel() > 1 and first[k].std() > 0]
    assert random_keys
    assert not any(torch.equal(first[k], other[k]) for k in random_keys)


def test_components_draw_from_distinct_streams(tiny_sd_pipe: StableDiffusionPipeline) -> None:
    # Per-component seeds: two components of one pipeline never start from the same random numbers.
    unet_first = tiny_sd_pipe.unet.conv_in.weight.flatten()[:8]
    vae_first = tiny_sd_pipe.vae.encoder.conv_in.weight.flatten()[:8]
    assert not torch.allclose(unet_first / unet_first.norm(), vae_first / vae_first.norm())


# ------------------------------------------------------------------------------- layouts


def test_sd_v1_unet_has_exactly_the_sd_v1_block_structure(tiny_sd_pipe: StableDiffusionPipeline) -> None:
    unet = tiny_sd_pipe.unet
    names = {name for name, _ in unet.named_modules()}

    assert len(unet.down_blocks) == 4 and len(unet.up_blocks) == 4
    for i in range(3):
        assert len(unet.down_blocks[i].resnets) == 2
        assert len(unet.down_blocks[i].attentions) == 2
        assert unet.down_blocks[i].downsamplers is not None
    assert len(unet.down_blocks[3].resnets) == 2
    assert unet.down_blocks[3].downsamplers is None
    assert "down_blocks.3.attentions" not in names
    assert "up_blocks.0.attentions" not in names
    for i in range(4):
        assert len(unet.up_blocks[i].resnets) == 3
    for i in (1, 2, 3):
        assert len(unet.up_blocks[i].attentions) == 3
    assert len(unet.mid_block.resnets) == 2 and len(unet.mid_block.attentions) == 1
    assert "up_blocks.3.upsamplers" not in names and "up_blocks.2.upsamplers.0" in names

    # The strongest check: every parameter of the real SD-v1 U-Net exists here, with the same rank.
    real = _real_unet(cross_attention_dim=768, sample_size=64)  # diffusers' defaults are SD-v1's
    assert sum(p.numel() for p in real.parameters()) == 859_520_964  # SD-v1's published U-Net size
    assert _module_shapes(unet) == _module_shapes(real)


def test_sd_v2_unet_matches_the_sd_v2_layout() -> None:
    config = tiny_unet_config("sd-v2")
    real = _real_unet(
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
        cross_attention_dim=1024,
        sample_size=96,
    )
    unet = UNet2DConditionModel(**config)
    # Linear (2-D) rather than 1x1-conv (4-D) transformer projections, as in SD-v2.
    assert unet.down_blocks[0].attentions[0].proj_in.weight.ndim == 2
    assert _module_shapes(unet) == _module_shapes(real)

    head_widths = {c // h for c, h in zip(config["block_out_channels"], config["attention_head_dim"], strict=True)}
    assert head_widths == {16}  # a constant head width per stage, like SD-v2's 64
    assert config["cross_attention_dim"] != tiny_unet_config("sd-v1")["cross_attention_dim"]
    assert tiny_unet_config("sd-v2-v")["upcast_attention"] is True


def test_block_widths_repeat_like_sd() -> None:
    channels = tiny_unet_config("sd-v1")["block_out_channels"]
    assert channels[2] == channels[3] and len(set(channels[:3])) == 3  # like (320, 640, 1280, 1280)


def test_v_prediction_layout_differs_only_in_its_scheduler() -> None:
    eps, v = build_tiny_pipeline("sd-v2"), build_tiny_pipeline("sd-v2-v")
    assert eps.scheduler.config.prediction_type == "epsilon"
    assert v.scheduler.config.prediction_type == "v_prediction"
    for pipe in (eps, v):
        config = pipe.scheduler.config
        assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
        assert config.num_train_timesteps == 1000
    assert eps.text_encoder.config.hidden_size == eps.unet.config.cross_attention_dim


def test_sdxl_unet_has_nested_transformer_depths_and_text_time_conditioning(
    tiny_sdxl_dir: Path,
) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    unet = pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", *["CrossAttnDownBlock2D"] * 2]
    assert [type(b).__name__ for b in unet.up_blocks] == [*["CrossAttnUpBlock2D"] * 2, "UpBlock2D"]
    assert len(unet.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(unet.down_blocks[2].attentions[0].transformer_blocks) == 3
    assert len(unet.up_blocks[0].attentions[0].transformer_blocks) == 3
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 3

    # The U-Net reads the two encoders' hidden states concatenated, and the second one's pooled projection.
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.config.cross_attention_dim == hidden
    pooled = pipe.text_encoder_2.config.projection_dim
    assert unet.add_embedding.linear_1.in_features == 6 * unet.config.addition_time_embed_dim + pooled

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    context = torch.randn(2, 77, hidden, generator=generator)
    text_embeds = torch.randn(2, pooled, generator=generator)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(2, 1)
    with torch.no_grad():
        out = unet(sample, 10, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        cropped = unet(sample, 10, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids + 16})
    assert out.sample.shape == sample.shape
    assert torch.isfinite(out.sample).all()
    assert not torch.allclose(out.sample, cropped.sample)  # the micro-conditioning reaches the output


def test_sdxl_unet_config_matches_the_sdxl_layout() -> None:
    tiny = UNet2DConditionModel(**tiny_unet_config("sdxl"))
    real = _real_unet(
        sample_size=128,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1280],
        attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 3],  # SDXL's is [1, 2, 10]; depth aside, the layout is SDXL's
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    assert _module_shapes(tiny) == _module_shapes(real)


def test_vae_downsamples_by_eight(tiny_sd_pipe: StableDiffusionPipeline) -> None:
    assert tiny_sd_pipe.vae_scale_factor == VAE_SCALE_FACTOR == 8
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        latent = tiny_sd_pipe.vae.encode(image).latent_dist.mean
    assert latent.shape == (1, 4, LATENT_SIZE, LATENT_SIZE)
    assert tiny_vae_config("sdxl")["scaling_factor"] != tiny_vae_config("sd-v1")["scaling_factor"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_builds_a_consistent_pipeline(layout: str) -> None:
    pipe = build_tiny_pipeline(layout)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert not pipe.unet.training
    assert pipe.unet.config.sample_size == LATENT_SIZE


def test_unknown_layout_is_rejected() -> None:
    with pytest.raises(ValueError, match="sd-v1"):
        tiny_unet_config("sd-v3")
    with pytest.raises(ValueError, match="unknown layout"):
        build_tiny_pipeline("sdxl-turbo")


# ------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_offline_and_encodes_words_whole(tmp_path: Path) -> None:
    build_tiny_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)  # a fresh load, from the files alone
    assert tokenizer.model_max_length == 77

    ids = tokenizer("a red circle", padding="max_length", truncation=True).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert len(ids) == 77
    assert tokenizer.convert_ids_to_tokens(ids[:5]) == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "circle</w>",
        "<|endoftext|>",
    ]
    assert ids[0] == bos and ids[4:] == [eos] * 73  # SD-v1 pads with end-of-text
    assert tokenizer.pad_token_id == eos
    assert eos == len(tokenizer) - 1  # the largest id, as in CLIP (legacy argmax pooling relies on it)

    for word in WHOLE_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Anything else still encodes (byte fallback, never the unknown token) and decodes back.
    text = "Zebra 42% ünïcode!"
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded) == "zebra 4 2 % ünïcode !"
    assert len(tokenizer("word " * 100, truncation=True).input_ids) == 77


def test_text_encoder_pools_at_the_end_of_text_token(tiny_sd_pipe: StableDiffusionPipeline) -> None:
    tokens = tiny_sd_pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt")
    with torch.no_grad():
        out = tiny_sd_pipe.text_encoder(tokens.input_ids)
    eos_position = 4
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, eos_position])
