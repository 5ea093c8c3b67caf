"""Exact configs of the text encoders the Stable Diffusion families run, buildable without a download.

Shared by the U-Net architectures (:mod:`bksdm.plan.archs`) and the transformer ones (:mod:`bksdm.plan.dit_archs`):
CLIP ViT-L/14's text tower (SD-v1.x; the first encoder of SDXL, SD3 and FLUX.1), OpenCLIP ViT-H/14's (SD-v2.x),
OpenCLIP ViT-bigG/14's (SDXL, SD3) and T5-XXL v1.1's encoder (SD3, FLUX.1). Each dict holds the keyword arguments of
the transformers config class of the model that reads it (``CLIPTextConfig`` or ``T5Config``), with the values of
the public repositories' ``config.json`` files.

Parameter counts (measured by building each on the meta device; tested):

===================================================  =============
text encoder                                         parameters
===================================================  =============
CLIP ViT-L/14 text (``CLIPTextModel``)               123,060,480
CLIP ViT-L/14 text with its 768x768 projection        123,650,304
OpenCLIP ViT-H/14 text (SD-v2, 23 layers)            340,387,840
OpenCLIP ViT-bigG/14 text with its projection        694,659,840
T5-XXL v1.1 encoder (``T5EncoderModel``)             4,762,310,656
===================================================  =============

Module-level dicts: treat them as read-only (the builders deep-copy them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLIP_VIT_L_TEXT", "OPENCLIP_BIGG_TEXT", "OPENCLIP_H_TEXT", "T5_XXL_ENCODER"]

_CLIP_TEXT_COMMON: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    # eos_token_id 2 makes transformers pool at the argmax token id (the legacy behaviour these
    # checkpoints were trained with), not at the first id equal to the eos id.
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "pad_token_id": 1,
    "vocab_size": 49408,
}

CLIP_VIT_L_TEXT: dict[str, Any] = {
    **_CLIP_TEXT_COMMON,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
"""openai/clip-vit-large-patch14, text tower: SD-v1.x, and the first encoder of SDXL, SD3 and FLUX.1."""

OPENCLIP_H_TEXT: dict[str, Any] = {
    **_CLIP_TEXT_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
"""OpenCLIP ViT-H/14 text tower as shipped with SD-v2: the last of its 24 layers is dropped (SD-v2 uses the
penultimate layer's output), hence 23."""

OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    **_CLIP_TEXT_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
"""OpenCLIP ViT-bigG/14 text tower (SDXL's and SD3's ``text_encoder_2``), with its projection for the pooled
embedding."""

T5_XXL_ENCODER: dict[str, Any] = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    # T5 v1.1: a gated GELU feed-forward (wi_0, wi_1, wo); transformers sets dense_act_fn gelu_new from this.
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
"""google/t5-v1_1-xxl's encoder (SD3's ``text_encoder_3``, FLUX.1's ``text_encoder_2``): 4096 wide, 24 layers of 64
heads; relative position buckets, so no fixed prompt length."""
