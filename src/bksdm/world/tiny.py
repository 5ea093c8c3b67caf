"""Tiny, randomly initialised pipelines with the exact block layout of Stable Diffusion.

Tests (and the embedded demo teacher) need a teacher whose *structure* is Stable Diffusion's -- the same
stages, the same `down_blocks.1.attentions.0` addresses, the same config fields -- but which builds in
milliseconds and never touches the network. Everything here keeps the real layouts and shrinks only the
widths, so a plan, a weight map or a feature hook that works on these works on the real models.

Layouts:

- ``"sd-v1"``: SD-v1.x (CLIP ViT-L text encoder, `quick_gelu`, one head count for every stage).
- ``"sd-v2"``: SD-v2.x base (linear projections in the transformers, a head count per stage with a
  constant head width, a wider `gelu` text encoder).
- ``"sd-v2-v"``: SD-v2.x 768-v: ``"sd-v2"`` with a v-prediction scheduler and upcast attention.
- ``"sdxl"``: SDXL base (3 stages, 1/2/3 transformer layers per stage, two text encoders whose hidden
  states are concatenated, `text_time` added conditioning).

The tiny VAE keeps SD's 4 stages so that it downsamples by 8 like the real one (image side = latent side
x 8); only its widths are small.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "LATENT_SIZE",
    "LAYOUTS",
    "VAE_SCALE_FACTOR",
    "WHOLE_WORDS",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "save_tiny_pipeline",
    "tiny_unet_config",
    "tiny_vae_config",
]

LAYOUTS: tuple[str, ...] = ("sd-v1", "sd-v2", "sd-v2-v", "sdxl")
"""The layouts the factories understand."""

LATENT_SIZE = 16
"""Latent side of every tiny U-Net: 16 -> 8 -> 4 -> 2 through SD's three downsamplers, so the deepest stage
is still wider than 1x1 (a 1x1 map would hide spatial bugs)."""

VAE_SCALE_FACTOR = 8
"""The tiny VAE has SD's 4 stages, so images are 8x the latent side (128x128 for a 16x16 latent)."""

# SD's widths are (320, 640, 1280, 1280): the last two stages share a width. Keeping that pattern means a
# bug that confuses stage 2 with stage 3 is not caught by a shape mismatch, exactly as on the real model.
_SD_CHANNELS = (32, 64, 96, 96)
_SDXL_CHANNELS = (32, 64, 96)  # SDXL: (320, 640, 1280)
# 8 groups leave 2+ channels per group at the narrowest width (the VAE's 16); every width used (and every
# skip concatenation in the U-Net's decoder, e.g. 96 + 64) is a multiple of 8.
_NORM_GROUPS = 8
_SDXL_TIME_EMBED_DIM = 8  # SDXL: 256
_SDXL_PROJECTION_DIM = 32  # SDXL text_encoder_2 (OpenCLIP bigG): 1280

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_MAX_LENGTH = 77  # CLIP's context length; SD pipelines pad/truncate every prompt to it

# Whole-word merges are learned for these so that typical toy prompts ("a red circle on the left") become
# one token per word, like real CLIP.
_WORD_LIST = """
a an the of on in at and with photo picture drawing image background
red green blue yellow orange purple pink cyan magenta white black gray grey brown
circle square triangle rectangle star cross ring diamond heart ellipse shape shapes
small large big tiny medium left right top bottom center centre middle upper lower corner
one two three
"""
WHOLE_WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
"""Words the tiny tokenizer encodes as one token each (others fall back to one token per character)."""

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------- U-Net


def tiny_unet_config(layout: str) -> dict[str, Any]:
    """Return the `UNet2DConditionModel` config of a tiny U-Net with a real SD block layout.

    Args:
        layout: One of :data:`LAYOUTS`.

    Returns:
        A dict accepted by ``UNet2DConditionModel(**config)`` / ``from_config``.

    Raises:
        ValueError: If ``layout`` is unknown.
    """
    _check_layout(layout)
    common: dict[str, Any] = {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": _NORM_GROUPS,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    if layout == "sdxl":
        return {
            **common,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": list(_SDXL_CHANNELS),
            # SDXL: [5, 10, 20] heads (diffusers' legacy name for a head count) = 64-wide heads; here 16.
            "attention_head_dim": [2, 4, 6],
            # SDXL: [1, 2, 10]; a different depth per stage is what the SDXL plans must get right.
            "transformer_layers_per_block": [1, 2, 3],
            "use_linear_projection": True,
            "cross_attention_dim": _text_width("sdxl") + _text_width("sdxl", second=True),
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
            # Six micro-conditioning numbers (original size, crop corner, target size) each embedded with
            # `addition_time_embed_dim`, concatenated with text_encoder_2's pooled projection (SDXL: 2816).
            "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_EMBED_DIM + _SDXL_PROJECTION_DIM,
            "upcast_attention": False,
        }
    config = {
        **common,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": list(_SD_CHANNELS),
        "cross_attention_dim": _text_width(layout),
    }
    if layout == "sd-v1":
        # SD-v1: 8 heads everywhere, so head width grows with the stage (40/80/160); here 8/16/24.
        config.update(attention_head_dim=4, use_linear_projection=False, upcast_attention=False)
    else:
        # SD-v2: [5, 10, 20, 20] heads = a constant 64-wide head; here a constant 16-wide head.
        # The 768-v checkpoint (v-prediction) also upcasts attention, a field students must carry over.
        config.update(
            attention_head_dim=[2, 4, 6, 6],
            use_linear_projection=True,
            upcast_attention=layout == "sd-v2-v",
        )
    return config


# ----------------------------------------------------------------------------------- text encoders


def _text_width(layout: str, second: bool = False) -> int:
    """Hidden size of a layout's (first or second) text encoder, i.e. its U-Net cross-attention width."""
    if layout == "sdxl":
        return 64 if second else 32  # SDXL: 1280 (bigG) and 768 (CLIP-L), concatenated to 2048
    # SD-v1 uses CLIP ViT-L (768), SD-v2 OpenCLIP ViT-H (1024): distinct widths catch hard-coded ones.
    return 32 if layout == "sd-v1" else 48


def _text_encoder_config(layout: str, vocab_size: int, token_ids: dict[str, int], second: bool) -> CLIPTextConfig:
    hidden = _text_width(layout, second)
    # CLIP ViT-L uses quick_gelu; the OpenCLIP encoders of SD-v2 and SDXL's second encoder use gelu.
    openclip = layout in ("sd-v2", "sd-v2-v") or second
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=_SDXL_PROJECTION_DIM,
        # Real ids, so the pooled output is read at the first end-of-text token, as CLIP does.
        bos_token_id=token_ids["<|startoftext|>"],
        eos_token_id=token_ids["<|endoftext|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )


# -------------------------------------------------------------------------------------- tokenizer


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn byte-pair merges until every word is a single symbol (plain BPE on a count-1 corpus).

    Merges are learned rather than hand-listed because BPE applies them by rank, not per word: a
    hand-written list easily lets one word's merge break another word apart.
    """
    segments = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for segment in segments for pair in zip(segment, segment[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # ties broken by text: deterministic
        merges.append(best)
        for i, segment in enumerate(segments):
            merged: list[str] = []
            j = 0
            while j < len(segment):
                if j + 1 < len(segment) and (segment[j], segment[j + 1]) == best:
                    merged.append(segment[j] + segment[j + 1])
                    j += 2
                else:
                    merged.append(segment[j])
                    j += 1
            segments[i] = merged


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build the vocabulary and merges of the tiny CLIP tokenizer.

    The order follows CLIP's own: the 256 byte-level characters, the same with the end-of-word suffix
    ``</w>``, the merge results, and the two special tokens last (so end-of-text has the largest id, which
    the legacy CLIP pooling relies on).
    """
    alphabet = sorted(ByteLevel.alphabet())  # all 256 bytes: no text can ever fall back to unknown
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges = _learn_merges(sorted(set(WHOLE_WORDS)))
    tokens += [left + right for left, right in merges]
    tokens += list(_SPECIAL_TOKENS)
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tiny_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """Write a tiny byte-level CLIP tokenizer to ``directory`` and load it back.

    The folder holds ``vocab.json`` and ``merges.txt`` (the format of ``openai/clip-vit-large-patch14``)
    plus what ``save_pretrained`` adds, so ``CLIPTokenizer.from_pretrained(directory)`` works offline. Like
    SD's tokenizer it truncates and pads to 77 tokens, padding with ``<|endoftext|>``.

    Args:
        directory: Folder to write into; created if missing.

    Returns:
        The loaded tokenizer.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(
        directory,
        model_max_length=_MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)  # records model_max_length and the special tokens for later loads
    return tokenizer


# -------------------------------------------------------------------------------------------- VAE


def tiny_vae_config(layout: str) -> dict[str, Any]:
    """Return the `AutoencoderKL` config of a tiny VAE with SD's 4 stages (downsampling by 8).

    Args:
        layout: One of :data:`LAYOUTS`; SDXL's VAE differs from SD's only in its latent scaling factor.

    Returns:
        A dict accepted by ``AutoencoderKL(**config)``.

    Raises:
        ValueError: If ``layout`` is unknown.
    """
    _check_layout(layout)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 64, 64],  # SD: (128, 256, 512, 512)
        "layers_per_block": 1,  # SD: 2; one resnet per stage is enough to keep its addresses
        "norm_num_groups": _NORM_GROUPS,
        "sample_size": LATENT_SIZE * VAE_SCALE_FACTOR,
        "scaling_factor": 0.13025 if layout == "sdxl" else 0.18215,
        "force_upcast": layout == "sdxl",
    }


# ------------------------------------------------------------------------------------- pipelines


def _scheduler(layout: str) -> SchedulerMixin:
    """The scheduler each real checkpoint ships with, on SD's training noise schedule."""
    schedule = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
    if layout == "sd-v1":
        return PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False)
    if layout == "sdxl":
        return EulerDiscreteScheduler(**schedule, timestep_spacing="leading")
    prediction_type = "v_prediction" if layout == "sd-v2-v" else "epsilon"
    return DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)


def _seeded(seed: int, factory: Callable[[], _T]) -> _T:
    """Call ``factory`` right after seeding the global RNG, which diffusers and transformers init from."""
    torch.manual_seed(seed)
    return factory()


def build_tiny_pipeline(layout: str = "sd-v1", seed: int = 0) -> DiffusionPipeline:
    """Build a tiny, randomly initialised Stable Diffusion pipeline with a real SD layout.

    Each component draws its weights from its own seed derived from ``seed``, so the U-Net of a given seed
    is the same whatever else is built, and the caller's global RNG state is left untouched.

    Args:
        layout: One of :data:`LAYOUTS`.
        seed: Seed of the random weights; the same seed gives identical weights.

    Returns:
        A `StableDiffusionPipeline` (a `StableDiffusionXLPipeline` for ``"sdxl"``) in eval mode on CPU,
        with no safety checker. Its default image side is ``LATENT_SIZE * VAE_SCALE_FACTOR`` (128).

    Raises:
        ValueError: If ``layout`` is unknown.
    """
    _check_layout(layout)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    vocab_size = len(tokenizer)
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}

    with torch.random.fork_rng(devices=[]):
        seeds = torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
        unet = _seeded(seeds[0], lambda: UNet2DConditionModel(**tiny_unet_config(layout)))
        vae = _seeded(seeds[1], lambda: AutoencoderKL(**tiny_vae_config(layout)))
        text_encoder = _seeded(
            seeds[2], lambda: CLIPTextModel(_text_encoder_config(layout, vocab_size, token_ids, second=False))
        )
        if layout == "sdxl":
            text_encoder_2 = _seeded(
                seeds[3],
                lambda: CLIPTextModelWithProjection(_text_encoder_config(layout, vocab_size, token_ids, second=True)),
            )

    scheduler = _scheduler(layout)
    if layout == "sdxl":
        pipe: DiffusionPipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            # One tokenizer for both encoders; SDXL's second one differs only in padding with "!".
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # Match what `from_pretrained` returns, so in-memory and reloaded pipelines behave the same.
    for module in (unet, vae, text_encoder, *([text_encoder_2] if layout == "sdxl" else [])):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path: str | Path, layout: str = "sd-v1", seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a standard diffusers folder with safetensors weights.

    Args:
        path: Output folder; created if missing.
        layout: One of :data:`LAYOUTS`.
        seed: Seed of the random weights.

    Returns:
        ``path`` as a `Path`, loadable with the stock ``StableDiffusionPipeline.from_pretrained`` (or
        ``StableDiffusionXLPipeline`` for ``"sdxl"``).

    Raises:
        ValueError: If ``layout`` is unknown.
    """
    path = Path(path)
    build_tiny_pipeline(layout, seed).save_pretrained(path, safe_serialization=True)
    return path


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
