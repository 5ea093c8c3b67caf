"""Exact configurations of the published diffusion-transformer pipelines, buildable without a download.

The transformer counterpart of :mod:`bksdm.plan.archs` (whose :func:`~bksdm.plan.archs.get_arch` and builders find
these too). Every config carries the values of the public repositories' ``transformer/config.json``,
``text_encoder*/config.json``, ``vae/config.json`` and ``scheduler/scheduler_config.json``:

- ``sd3-medium``: stabilityai/stable-diffusion-3-medium-diffusers (24 joint blocks, 1536 wide);
- ``sd3.5-medium``: stabilityai/stable-diffusion-3.5-medium (24 blocks, the first 13 with a second, image-only
  attention; RMS q/k norms);
- ``sd3.5-large``: stabilityai/stable-diffusion-3.5-large (38 blocks, 2432 wide, RMS q/k norms);
- ``flux.1-dev``: black-forest-labs/FLUX.1-dev (19 double + 38 single blocks, 3072 wide, guidance embedding);
- ``flux.1-schnell``: black-forest-labs/FLUX.1-schnell (the same without the guidance embedding).

So a model built from them on the ``meta`` device has exactly the published shapes and parameter counts: plans,
parameters and MACs of a 12B teacher cost no download and no memory.

Parameter counts (measured by building each from these configs; tested):

==============  ==============  ======================================================  ===========  ==============
arch            transformer     text encoders                                           VAE decoder  whole
==============  ==============  ======================================================  ===========  ==============
sd3-medium      2,028,328,000   CLIP-L 123,650,304 + bigG 694,659,840 + T5 4,762,310,656  49,545,475   7,658,494,275
sd3.5-medium    2,243,171,520   (as sd3-medium)                                          49,545,475   7,873,337,795
sd3.5-large     8,056,627,520   (as sd3-medium)                                          49,545,475  13,686,793,795
flux.1-dev      11,901,408,320  CLIP-L 123,060,480 + T5 4,762,310,656                    49,545,475  16,836,324,931
flux.1-schnell  11,891,178,560  (as flux.1-dev)                                          49,545,475  16,826,095,171
==============  ==============  ======================================================  ===========  ==============

FLUX.1-dev and schnell differ only by the guidance embedder (10,229,760 parameters). The VAE (16 latent channels,
no quant convs) is the same network in both families; only its ``scaling_factor`` and ``shift_factor`` differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bksdm.plan.text_archs import CLIP_VIT_L_TEXT, OPENCLIP_BIGG_TEXT, T5_XXL_ENCODER

__all__ = ["TRANSFORMER_ARCHS", "TransformerArch"]


@dataclass(frozen=True)
class TransformerArch:
    """One published diffusion-transformer pipeline: the configs of all its components.

    Attributes:
        name: Canonical name, e.g. ``"flux.1-dev"``.
        repo: The hub repository the configs come from.
        pipeline: The diffusers pipeline class name (``"StableDiffusion3Pipeline"`` or ``"FluxPipeline"``).
        denoiser_config: ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` config, with ``_class_name``.
        text_encoder_configs: Config keyword arguments per pipeline component name (``"text_encoder"``, ...).
        text_encoder_classes: transformers class name per component name (``"CLIPTextModelWithProjection"``,
            ``"CLIPTextModel"`` or ``"T5EncoderModel"``).
        vae_config: ``AutoencoderKL`` config dict.
        scheduler_config: Scheduler config dict; its ``"_class_name"`` names the diffusers class.
        resolution: Native image resolution in pixels (square).
    """

    name: str
    repo: str
    pipeline: str
    denoiser_config: dict[str, Any]
    text_encoder_configs: dict[str, dict[str, Any]]
    text_encoder_classes: dict[str, str]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    resolution: int = 1024

    @property
    def latent_size(self) -> int:
        """Side of the latent at the native resolution (the VAE downsamples by 8)."""
        return self.resolution // 8


# --- transformers -------------------------------------------------------------------------------------

_SD3_MEDIUM: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

_SD35_MEDIUM: dict[str, Any] = {
    **_SD3_MEDIUM,
    # MMDiT-X: blocks 0-12 add a second attention over the image tokens alone.
    "dual_attention_layers": list(range(13)),
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
}

_SD35_LARGE: dict[str, Any] = {
    **_SD3_MEDIUM,
    "caption_projection_dim": 2432,
    "num_attention_heads": 38,
    "num_layers": 38,
    "qk_norm": "rms_norm",
}

_FLUX_DEV: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "out_channels": None,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

_FLUX_SCHNELL: dict[str, Any] = {**_FLUX_DEV, "guidance_embeds": False}

# --- VAEs ---------------------------------------------------------------------------------------------

_VAE_16CH: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    # No 1x1 quant / post-quant convolutions (SD-v1/v2/XL have both).
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# Latents go into the transformer as (z - shift_factor) * scaling_factor.
_SD3_VAE: dict[str, Any] = {**_VAE_16CH, "scaling_factor": 1.5305, "shift_factor": 0.0609}
_FLUX_VAE: dict[str, Any] = {**_VAE_16CH, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# --- schedulers ---------------------------------------------------------------------------------------

_SD3_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
# FLUX.1-dev shifts by the image's token count (mu from 0.5 at 256 tokens to 1.15 at 4096); schnell does not shift.
_FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
_FLUX_SCHNELL_SCHEDULER: dict[str, Any] = {**_FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

# --- registry -----------------------------------------------------------------------------------------

_SD3_TEXT = {"text_encoder": CLIP_VIT_L_TEXT, "text_encoder_2": OPENCLIP_BIGG_TEXT, "text_encoder_3": T5_XXL_ENCODER}
_SD3_TEXT_CLASSES = {
    "text_encoder": "CLIPTextModelWithProjection",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "text_encoder_3": "T5EncoderModel",
}
_FLUX_TEXT = {"text_encoder": CLIP_VIT_L_TEXT, "text_encoder_2": T5_XXL_ENCODER}
_FLUX_TEXT_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}


def _sd3(name: str, repo: str, config: dict[str, Any]) -> TransformerArch:
    return TransformerArch(
        name, repo, "StableDiffusion3Pipeline", config, _SD3_TEXT, _SD3_TEXT_CLASSES, _SD3_VAE, _SD3_SCHEDULER
    )


def _flux(name: str, repo: str, config: dict[str, Any], scheduler: dict[str, Any]) -> TransformerArch:
    return TransformerArch(name, repo, "FluxPipeline", config, _FLUX_TEXT, _FLUX_TEXT_CLASSES, _FLUX_VAE, scheduler)


TRANSFORMER_ARCHS: dict[str, TransformerArch] = {
    "sd3-medium": _sd3("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", _SD3_MEDIUM),
    "sd3.5-medium": _sd3("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", _SD35_MEDIUM),
    "sd3.5-large": _sd3("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", _SD35_LARGE),
    "flux.1-dev": _flux("flux.1-dev", "black-forest-labs/FLUX.1-dev", _FLUX_DEV, _FLUX_DEV_SCHEDULER),
    "flux.1-schnell": _flux(
        "flux.1-schnell", "black-forest-labs/FLUX.1-schnell", _FLUX_SCHNELL, _FLUX_SCHNELL_SCHEDULER
    ),
}
"""The diffusion-transformer architectures, by name (all at 1024 px natively)."""
