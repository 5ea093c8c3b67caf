"""Tiny, randomly initialised diffusion-transformer pipelines with the real SD3, SD3.5 and FLUX.1 layouts.

The transformer counterpart of :mod:`bksdm.world.tiny`: stock ``StableDiffusion3Pipeline`` / ``FluxPipeline``
folders whose denoisers have the real block structure (SD3's joint blocks with a pre-only last block, SD3.5's
dual-attention blocks and q/k RMS norms, FLUX's double and single stacks, packed latents, rotary ids and guidance
embedding), every text encoder the real pipeline runs (two CLIPs and a T5 for SD3, CLIP + T5 for FLUX) and a
16-channel VAE with a shift factor, but widths small enough to build in well under a second and run on a CPU.

Layouts:

- ``"sd3"``: SD3-medium (24 joint blocks; here 6).
- ``"sd3.5"``: SD3.5-medium (dual attention in the first 13 of 24 blocks, RMS q/k norms; here 3 of 6).
- ``"flux"``: FLUX.1-dev (19 double + 38 single blocks, guidance embedding; here 3 + 6).
- ``"flux-schnell"``: FLUX.1-schnell (no guidance embedding).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from bksdm.world.tiny import LATENT_SIZE, WHOLE_WORDS, build_tiny_tokenizer

__all__ = ["DIT_LAYOUTS", "T5_LENGTH", "build_tiny_dit_pipeline", "build_tiny_t5_tokenizer", "save_tiny_dit_pipeline"]

DIT_LAYOUTS: tuple[str, ...] = ("sd3", "sd3.5", "flux", "flux-schnell")
"""The layouts :func:`build_tiny_dit_pipeline` understands."""

T5_LENGTH = 32
"""Token length of the tiny T5 tokenizer (SD3 pads T5 to 256 tokens, FLUX.1-dev to 512)."""

_T5_WIDTH = 32  # T5-XXL: 4096; the joint attention width of both families
_CLIP_WIDTHS = (8, 16)  # SD3's CLIP-L (768) and CLIP-G (1280); concatenated and zero-padded to the T5 width
_PROJECTION = 16  # each CLIP's pooled projection (768 / 1280 in SD3, concatenated to 2048)
_HEAD_DIM, _HEADS = 8, 2  # SD3-medium: 64 x 24; FLUX.1: 128 x 24


def build_tiny_t5_tokenizer(directory: str | Path) -> T5TokenizerFast:
    """A tiny Unigram T5 tokenizer (whole words of the shapes world, letters otherwise), written and loaded back.

    Like T5's it lower-cases nothing it does not have to, appends ``</s>`` and pads with ``<pad>`` (id 0).
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(WHOLE_WORDS)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=T5_LENGTH,
    )
    directory = Path(directory)
    fast.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


def _clip(vocab: int, width: int, ids: dict[str, int], projection: bool) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if width == _CLIP_WIDTHS[0] else "gelu",
        projection_dim=_PROJECTION,
        bos_token_id=ids["<|startoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(vocab: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=_T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",  # T5 v1.1 (T5-XXL), as both families use
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def tiny_dit_vae_config(layout: str) -> dict[str, Any]:
    """A 16-channel ``AutoencoderKL`` config with SD3's (or FLUX's) latent scale and shift, downsampling by 8."""
    flux = layout.startswith("flux")
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": LATENT_SIZE * 8,
        "scaling_factor": 0.3611 if flux else 1.5305,
        "shift_factor": 0.1159 if flux else 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    }


def tiny_dit_config(layout: str) -> dict[str, Any]:
    """The denoiser config of a layout: ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` keyword arguments."""
    if layout not in DIT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(DIT_LAYOUTS)}")
    if layout.startswith("flux"):
        return {
            "patch_size": 1,
            "in_channels": 64,  # 16 latent channels packed 2x2
            "num_layers": 3,
            "num_single_layers": 6,
            "attention_head_dim": _HEAD_DIM,
            "num_attention_heads": _HEADS,
            "joint_attention_dim": _T5_WIDTH,
            "pooled_projection_dim": _CLIP_WIDTHS[1],  # CLIP-L's pooled output (768)
            "guidance_embeds": layout == "flux",
            "axes_dims_rope": [2, 2, 4],  # FLUX.1: (16, 56, 56), summing to the head width
        }
    return {
        "sample_size": LATENT_SIZE,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 6,
        "attention_head_dim": _HEAD_DIM,
        "num_attention_heads": _HEADS,
        "joint_attention_dim": _T5_WIDTH,
        "caption_projection_dim": _HEAD_DIM * _HEADS,
        "pooled_projection_dim": 2 * _PROJECTION,
        "out_channels": 16,
        "pos_embed_max_size": 16,
        "dual_attention_layers": [0, 1, 2] if layout == "sd3.5" else [],
        "qk_norm": "rms_norm" if layout == "sd3.5" else None,
    }


def build_tiny_dit_pipeline(layout: str = "sd3", seed: int = 0) -> DiffusionPipeline:
    """A tiny stock ``StableDiffusion3Pipeline`` or ``FluxPipeline`` with random weights (same seed, same weights).

    Images are 128 px (16x16 latents); FLUX's pipeline needs ``height=width=128`` passed, as its default is 1024.
    """
    config = tiny_dit_config(layout)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = build_tiny_tokenizer(Path(tmp) / "clip")
        t5_tokenizer = build_tiny_t5_tokenizer(Path(tmp) / "t5")
    ids = {t: clip_tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftext|>", "<|endoftext|>")}
    vocab = len(clip_tokenizer)
    with torch.random.fork_rng(devices=[]):
        seeds = torch.randint(0, 2**62, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        torch.manual_seed(seeds[0])
        vae = AutoencoderKL(**tiny_dit_vae_config(layout))
        torch.manual_seed(seeds[1])
        t5 = _t5(len(t5_tokenizer))
        if layout.startswith("flux"):
            torch.manual_seed(seeds[2])
            clip = _clip(vocab, _CLIP_WIDTHS[1], ids, projection=False)
            torch.manual_seed(seeds[3])
            transformer = FluxTransformer2DModel(**config)
            scheduler = FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
            )
            pipe: DiffusionPipeline = FluxPipeline(
                scheduler=scheduler,
                vae=vae,
                text_encoder=clip,
                tokenizer=clip_tokenizer,
                text_encoder_2=t5,
                tokenizer_2=t5_tokenizer,
                transformer=transformer,
            )
        else:
            torch.manual_seed(seeds[2])
            clip_l = _clip(vocab, _CLIP_WIDTHS[0], ids, projection=True)
            torch.manual_seed(seeds[3])
            clip_g = _clip(vocab, _CLIP_WIDTHS[1], ids, projection=True)
            torch.manual_seed(seeds[4])
            transformer = SD3Transformer2DModel(**config)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=vae,
                text_encoder=clip_l,
                tokenizer=clip_tokenizer,
                text_encoder_2=clip_g,
                tokenizer_2=clip_tokenizer,
                text_encoder_3=t5,
                tokenizer_3=t5_tokenizer,
            )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_dit_pipeline(path: str | Path, layout: str = "sd3", seed: int = 0) -> Path:
    """Builds a tiny transformer pipeline and saves it as a stock diffusers folder (safetensors)."""
    path = Path(path)
    build_tiny_dit_pipeline(layout, seed).save_pretrained(path, safe_serialization=True)
    return path
