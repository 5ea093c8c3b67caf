"""The embedded SD3-shaped teacher: a tiny ``StableDiffusion3Pipeline`` trained on shapes with flow matching.

The transformer counterpart of :mod:`bksdm.world.teacher`: what a newcomer without a GPU prunes and distils a
diffusion transformer from, so it must *be* SD3 in every structural respect and *draw* what it is asked for:

- an ``SD3Transformer2DModel`` of :data:`NUM_BLOCKS` joint (MM-DiT) blocks, the last one ``context_pre_only`` as
  in SD3-medium, with 2x2 patches, adaLN timestep + pooled-text conditioning and a caption projection; deep enough
  that keeping half, a third or a chosen subset of the blocks are all real choices;
- SD3's two CLIP text encoders (``CLIPTextModelWithProjection``: a narrower "CLIP-L" and a wider "CLIP-G"), whose
  penultimate-layer states are concatenated and zero-padded to ``joint_attention_dim`` and whose projections are
  concatenated into the pooled vector, trained from scratch (no pretrained CLIP knows this world). Both share the
  world's tiny CLIP tokenizer (every shapes word one token), set to :data:`CLIP_LENGTH` tokens rather than 77: the
  captions are 10 tokens, and every text token runs through every joint block;
- **no T5 of its own**: T5's part of the text states is zeros, which is what SD3's pipeline feeds the transformer
  when it has no T5 (``text_encoder_3=None``: 256 zero tokens at its default ``max_sequence_length``). The world's
  captions are fully told by the CLIP states (SD3's paper drops T5 at inference with small loss on simple
  prompts), and a trained T5 would run 256 distinct tokens through every joint block in training, 5x the cost of a
  step on a CPU (measured). The folder still carries a ``text_encoder_3``: a one-layer ``T5EncoderModel`` whose
  final layer norm has weight 0, so its output is exactly those zeros, with the world's tiny T5 tokenizer
  (:func:`bksdm.world.tiny_dit.build_tiny_t5_tokenizer`, ``model_max_length`` 256 so every reader pads to the
  pipeline's 256). Why carry it: diffusers' ``from_pretrained`` refuses a folder saved with ``text_encoder_3=None``
  unless the caller passes ``text_encoder_3=None, tokenizer_3=None`` again, and the teacher must load as a plain
  stock folder (``StableDiffusion3Pipeline.from_pretrained(path)``, every bksdm command) and keep T5's place in the
  pipeline for the tools that handle it;
- the U-Net teacher's shapes VAE (:data:`bksdm.world.teacher.TEACHER_DIR` ``/vae``, 4 latent channels, x4), reused
  as trained: flat shapes need no 16-channel VAE, and a 16x16 latent with 2x2 patches gives 64 image tokens. Only
  its config changes: ``shift_factor`` (SD3's pipeline decodes ``latents / scaling_factor + shift_factor``) and
  ``scaling_factor`` are set by training so that the scaled latents of real shapes have mean 0 and standard
  deviation 1, SD3's convention (its 1.5305 / 0.0609). The U-Net teacher had to scale to 0.35 because SD's DDPM
  schedule never reaches pure noise (the layout leaked through at t=999); rectified flow's x_1 *is* pure noise, so
  unit variance leaks nothing at the first sampling step (see :mod:`bksdm.world.train_dit_teacher`);
- SD3's ``FlowMatchEulerDiscreteScheduler`` with its shift of 3.0.

The trained weights live in :data:`BUNDLED_SD3_TEACHER` as a plain diffusers folder (``StableDiffusion3Pipeline
.from_pretrained`` loads it with no custom code), next to ``bksdm_toy.json`` (sampling settings, command, time,
machine, measured prompt accuracy). :mod:`bksdm.world.train_dit_teacher` re-creates it. This module only builds
and loads: no training, no writing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from bksdm.loading import BUNDLED_SD3_TEACHER  # the shipped, trained folder ("bundled-sd3" in every command)
from bksdm.world.teacher import LATENT_SIZE, TEACHER_DIR
from bksdm.world.tiny import build_tiny_tokenizer
from bksdm.world.tiny_dit import build_tiny_t5_tokenizer

__all__ = [
    "BUNDLED_SD3_TEACHER",
    "CLIP_LENGTH",
    "NUM_BLOCKS",
    "T5_ZERO_TOKENS",
    "build_untrained_dit_teacher",
    "dit_teacher_configs",
    "load_dit_teacher",
    "zero_t5",
]

NUM_BLOCKS = 12
"""Joint blocks (SD3-medium: 24): halves to 6, thirds to 4, and a searched subset has room to differ from both."""

CLIP_LENGTH = 16
"""Tokens per CLIP prompt (the tokenizer's ``model_max_length``; SD3: 77). A caption is 10 tokens with its start
and end; the pipeline pads to this length and truncates longer prompts."""

SHIFT = 3.0
"""SD3's scheduler shift: sampling, and training with bksdm's density, spend most steps at high noise."""

T5_ZERO_TOKENS = 256
"""T5's tokens in the text states (the pipeline's default ``max_sequence_length``): all zeros, see :func:`zero_t5`."""

_HEAD_DIM, _HEADS = 32, 2  # SD3-medium: 64 x 24 = 1536 wide
_CLIP_WIDTHS = (32, 48)  # SD3: CLIP-L 768, CLIP-G 1280, concatenated (2048) and zero-padded to T5's 4096
_JOINT_WIDTH = 96  # joint_attention_dim: the padded width of the text states (SD3: 4096, T5-XXL's)


def dit_teacher_configs(
    num_blocks: int = NUM_BLOCKS, heads: int = _HEADS, shift: float = SHIFT
) -> dict[str, dict[str, Any]]:
    """Return the config of every model component built from scratch.

    Args:
        num_blocks: Joint blocks of the transformer.
        heads: Attention heads of :data:`_HEAD_DIM` channels each (the transformer's width is their product).
        shift: The scheduler's timestep shift (sampling, and the training density bksdm draws from it).

    Returns:
        ``{"transformer": ..., "text_encoder": ..., "text_encoder_2": ..., "scheduler": ...}``: keyword arguments
        of ``SD3Transformer2DModel``, ``CLIPTextConfig`` (without the token ids, which come from the tokenizer) and
        ``FlowMatchEulerDiscreteScheduler``. The VAE is the U-Net teacher's (:data:`TEACHER_DIR` ``/vae``).
    """
    transformer = {
        "sample_size": LATENT_SIZE,  # 16: the pipeline's default image side is 16 x the VAE's 4 = 64 px
        "patch_size": 2,
        "in_channels": 4,  # the shapes VAE's latent channels (SD3's VAE: 16)
        "out_channels": 4,
        "num_layers": num_blocks,
        "attention_head_dim": _HEAD_DIM,
        "num_attention_heads": heads,
        "joint_attention_dim": _JOINT_WIDTH,
        "caption_projection_dim": _HEAD_DIM * heads,  # SD3: the transformer's width
        "pooled_projection_dim": sum(_CLIP_WIDTHS),  # both CLIPs' projections, concatenated (SD3: 2048)
        "pos_embed_max_size": LATENT_SIZE // 2,  # an 8x8 grid of patches (SD3-medium: 192, cropped to the image)
        "dual_attention_layers": [],  # SD3, not SD3.5
        "qk_norm": None,
    }
    text_encoders = {
        name: {
            "hidden_size": width,
            "intermediate_size": 4 * width,
            # 3 layers: SD3 reads the *penultimate* layer's states (hidden_states[-2]), the last one only feeds the
            # pooled projection.
            "num_hidden_layers": 3,
            "num_attention_heads": width // 16,
            "max_position_embeddings": CLIP_LENGTH,
            "hidden_act": "quick_gelu" if name == "text_encoder" else "gelu",  # CLIP-L's and OpenCLIP-G's
            "projection_dim": width,
        }
        for name, width in zip(("text_encoder", "text_encoder_2"), _CLIP_WIDTHS, strict=True)
    }
    scheduler = {"num_train_timesteps": 1000, "shift": shift}
    return {"transformer": transformer, **text_encoders, "scheduler": scheduler}


def _tokenizer(directory: Path) -> CLIPTokenizer:
    tokenizer = build_tiny_tokenizer(directory)
    tokenizer.model_max_length = CLIP_LENGTH  # saved with the pipeline: stock loading pads to this length
    return tokenizer


def _clip(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|startoftext|>", "<|endoftext|>")}
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            **config,
            vocab_size=len(tokenizer),
            # Real ids, so the pooled output is read at the first end-of-text token as CLIP does.
            bos_token_id=ids["<|startoftext|>"],
            eos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
        )
    )


def zero_t5(vocab: int, width: int = _JOINT_WIDTH) -> T5EncoderModel:
    """A one-layer T5 encoder (T5 v1.1's gated-GELU layout) whose output is exactly 0 for every input: its final
    layer norm's weight is 0. It stands where SD3's pipeline would put zeros without a T5 (see the module's notes).
    """
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=width,  # the pipeline pads the CLIP states to T5's width: joint_attention_dim
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()
    return t5.eval().requires_grad_(False)


def build_untrained_dit_teacher(
    seed: int = 0,
    vae_from: str | Path = TEACHER_DIR,
    num_blocks: int = NUM_BLOCKS,
    heads: int = _HEADS,
    shift: float = SHIFT,
) -> StableDiffusion3Pipeline:
    """Build the SD3-shaped teacher with fresh transformer and text encoders and the trained shapes VAE.

    Args:
        seed: Seed of the initial weights; the caller's global RNG state is left untouched.
        vae_from: A pipeline folder whose ``vae`` is reused (the U-Net teacher's). Its ``shift_factor`` is set to 0
            (SD3's pipeline needs one) and its ``scaling_factor`` kept, until training measures both.
        num_blocks, heads, shift: See :func:`dit_teacher_configs`.

    Returns:
        A ``StableDiffusion3Pipeline`` on CPU in eval mode (T5: :func:`zero_t5`), progress bar off.

    Raises:
        FileNotFoundError: If ``vae_from`` holds no VAE.
    """
    vae_dir = Path(vae_from) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"no VAE in {vae_dir}: the SD3-shaped teacher reuses the shapes teacher's VAE")
    configs = dit_teacher_configs(num_blocks, heads, shift)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    vae.register_to_config(shift_factor=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp) / "clip")
        t5_tokenizer = build_tiny_t5_tokenizer(Path(tmp) / "t5")
    t5_tokenizer.model_max_length = T5_ZERO_TOKENS  # saved: bksdm's prompt encoding pads T5 to this (<= 256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**configs["transformer"])
        clip_l = _clip(configs["text_encoder"], tokenizer)
        clip_g = _clip(configs["text_encoder_2"], tokenizer)
        t5 = zero_t5(len(t5_tokenizer))  # drawn last: the other weights are the same with or without it
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]),
        vae=vae,
        text_encoder=clip_l.eval(),
        tokenizer=tokenizer,
        text_encoder_2=clip_g.eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_dit_teacher(device: str | torch.device = "cpu", path: str | Path | None = None) -> StableDiffusion3Pipeline:
    """Load the shipped SD3-shaped teacher (or another folder written by :mod:`bksdm.world.train_dit_teacher`).

    Args:
        device: Where to put the models.
        path: A teacher folder; defaults to :data:`BUNDLED_SD3_TEACHER`.

    Returns:
        The stock ``StableDiffusion3Pipeline``, progress bar off.

    Raises:
        FileNotFoundError: If the folder holds no pipeline.
    """
    path = Path(path) if path is not None else BUNDLED_SD3_TEACHER
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no SD3-shaped teacher in {path}; train one with `python -m bksdm.world.train_dit_teacher --out {path}`"
        )
    pipe = StableDiffusion3Pipeline.from_pretrained(path).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
