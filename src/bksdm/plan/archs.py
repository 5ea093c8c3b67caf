"""Exact configurations of the real Stable Diffusion architectures, buildable without a download.

Every config here carries the values of the public model repositories' ``config.json`` files
(``CompVis/stable-diffusion-v1-4``, ``stabilityai/stable-diffusion-2-1-base``,
``stabilityai/stable-diffusion-2-1``, ``stabilityai/stable-diffusion-xl-base-1.0``), so a model built from
them with random weights has exactly the published shapes and parameter counts. That lets the toolkit plan
block removal, count parameters and MACs, and test surgery on the real shapes with no network access and,
on the ``meta`` device, no memory.

:data:`ARCHS` holds the U-Net architectures; the diffusion transformers (SD3, SD3.5, FLUX.1) are in
:mod:`bksdm.plan.dit_archs`. :func:`get_arch` finds both (:data:`ALL_ARCHS`), and the builders take either kind;
the text encoders' configs are shared with the transformers from :mod:`bksdm.plan.text_archs`.

Parameter counts (measured by building each model from these configs, and checked by the tests):

===========================  =============
component                    parameters
===========================  =============
SD-v1.4 / v1.5 U-Net         859,520,964
SD-v2.1(-base) U-Net         865,910,724
SDXL-base U-Net              2,567,463,684
VAE decoder                  49,490,179   (``decoder`` alone; ``post_quant_conv`` adds 20)
===========================  =============

and the text encoders' in :mod:`bksdm.plan.text_archs` (CLIP ViT-L/14 123,060,480; OpenCLIP-H 340,387,840; bigG
694,659,840).

The configs are shared module-level objects: treat them as read-only and ``copy.deepcopy`` one before
editing it (the ``build_*`` functions never mutate them).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from bksdm.families import family_of
from bksdm.plan.dit_archs import TRANSFORMER_ARCHS, TransformerArch
from bksdm.plan.text_archs import CLIP_VIT_L_TEXT, OPENCLIP_BIGG_TEXT, OPENCLIP_H_TEXT

__all__ = [
    "ALL_ARCHS",
    "ARCHS",
    "AnyArch",
    "Arch",
    "TransformerArch",
    "build_denoiser",
    "build_scheduler",
    "build_text_encoders",
    "build_unet",
    "build_vae",
    "get_arch",
]


@dataclass(frozen=True)
class Arch:
    """One Stable Diffusion architecture: the configs of all its components.

    Attributes:
        name: Canonical name, e.g. ``"sd-v1.4"``.
        unet_config: ``UNet2DConditionModel`` config dict, as in the repo's ``unet/config.json``.
        text_encoder_configs: ``CLIPTextConfig`` keyword arguments per pipeline component name
            (``"text_encoder"``, and ``"text_encoder_2"`` for SDXL).
        text_encoder_classes: transformers class name per component name (``"CLIPTextModel"`` or
            ``"CLIPTextModelWithProjection"``).
        vae_config: ``AutoencoderKL`` config dict.
        scheduler_config: Scheduler config dict; its ``"_class_name"`` names the diffusers class.
        resolution: Native image resolution in pixels (square).
        is_sdxl: Whether the U-Net takes SDXL's extra ``text_time`` conditioning.
    """

    name: str
    unet_config: dict[str, Any]
    text_encoder_configs: dict[str, dict[str, Any]]
    text_encoder_classes: dict[str, str]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    resolution: int
    is_sdxl: bool = False

    @property
    def latent_size(self) -> int:
        """Side of the latent at the native resolution (the VAE downsamples by 8)."""
        return self.resolution // 8

    @property
    def denoiser_config(self) -> dict[str, Any]:
        """The denoiser's config (the U-Net's), under the name every architecture kind answers to."""
        return self.unet_config


AnyArch = Arch | TransformerArch
"""A U-Net or a diffusion-transformer architecture: both have ``denoiser_config``, ``text_encoder_configs``,
``text_encoder_classes``, ``vae_config``, ``scheduler_config``, ``resolution`` and ``latent_size``."""


# --- U-Nets -------------------------------------------------------------------------------------------

_SD_DOWN_BLOCKS = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

_SD_V1_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _SD_DOWN_BLOCKS,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _SD_UP_BLOCKS,
}

# SD-v2 differs from v1 in the text conditioning (OpenCLIP-H, 1024-d), in per-stage head *dims*
# ("attention_head_dim" here really is a head count, a historical diffusers misnomer: 5/10/20/20 heads of
# 64 channels) and in linear instead of 1x1-conv projections inside the transformers.
_SD_V2_BASE_UNET: dict[str, Any] = {
    **_SD_V1_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "use_linear_projection": True,
}

# The 768-px model: 96x96 latents, and attention computed in fp32 (it overflows in fp16 otherwise).
_SD_V2_UNET: dict[str, Any] = {**_SD_V2_BASE_UNET, "sample_size": 96, "upcast_attention": True}

_SDXL_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    # 1280 (pooled bigG text embedding) + 6 micro-conditioning numbers x 256 (addition_time_embed_dim).
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# --- VAEs ---------------------------------------------------------------------------------------------

_SD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    # Not in the v1/v2 config.json files: the diffusers default, which is the value SD was trained with.
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# SDXL's VAE has the same shapes but was retrained: a different latent scale, and it produces NaNs in fp16
# (force_upcast makes pipelines decode in fp32).
_SDXL_VAE: dict[str, Any] = {**_SD_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}

# --- Schedulers ---------------------------------------------------------------------------------------

_SD_SCHEDULER_COMMON: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

_PNDM_EPS = {"_class_name": "PNDMScheduler", **_SD_SCHEDULER_COMMON, "prediction_type": "epsilon"}
# stabilityai/stable-diffusion-2-1 ships a DDIM scheduler config; the 768-px model predicts velocity.
_DDIM_V = {"_class_name": "DDIMScheduler", **_SD_SCHEDULER_COMMON, "prediction_type": "v_prediction"}
_SDXL_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    **_SD_SCHEDULER_COMMON,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

# --- Registry -----------------------------------------------------------------------------------------

_SD_V1 = Arch(
    name="sd-v1.4",
    unet_config=_SD_V1_UNET,
    text_encoder_configs={"text_encoder": CLIP_VIT_L_TEXT},
    text_encoder_classes={"text_encoder": "CLIPTextModel"},
    vae_config=_SD_VAE,
    scheduler_config=_PNDM_EPS,
    resolution=512,
)

ARCHS: dict[str, Arch] = {
    "sd-v1.4": _SD_V1,
    # v1.5 is v1.4's architecture trained longer: identical configs.
    "sd-v1.5": dataclasses.replace(_SD_V1, name="sd-v1.5"),
    "sd-v2.1-base": Arch(
        name="sd-v2.1-base",
        unet_config=_SD_V2_BASE_UNET,
        text_encoder_configs={"text_encoder": OPENCLIP_H_TEXT},
        text_encoder_classes={"text_encoder": "CLIPTextModel"},
        vae_config={**_SD_VAE, "sample_size": 768},
        scheduler_config=_PNDM_EPS,
        resolution=512,
    ),
    "sd-v2.1": Arch(
        name="sd-v2.1",
        unet_config=_SD_V2_UNET,
        text_encoder_configs={"text_encoder": OPENCLIP_H_TEXT},
        text_encoder_classes={"text_encoder": "CLIPTextModel"},
        vae_config={**_SD_VAE, "sample_size": 768},
        scheduler_config=_DDIM_V,
        resolution=768,
    ),
    "sdxl-base": Arch(
        name="sdxl-base",
        unet_config=_SDXL_UNET,
        text_encoder_configs={"text_encoder": CLIP_VIT_L_TEXT, "text_encoder_2": OPENCLIP_BIGG_TEXT},
        text_encoder_classes={
            "text_encoder": "CLIPTextModel",
            "text_encoder_2": "CLIPTextModelWithProjection",
        },
        vae_config=_SDXL_VAE,
        scheduler_config=_SDXL_EULER,
        resolution=1024,
        is_sdxl=True,
    ),
}


ALL_ARCHS: dict[str, AnyArch] = {**ARCHS, **TRANSFORMER_ARCHS}
"""Every architecture :func:`get_arch` knows: the U-Nets of :data:`ARCHS`, then the diffusion transformers."""


def get_arch(name: str) -> AnyArch:
    """Look up an architecture by name.

    Args:
        name: One of the keys of :data:`ALL_ARCHS` (case-insensitive), e.g. ``"sd-v1.4"``, ``"sdxl-base"`` or
            ``"flux.1-dev"``.

    Returns:
        The architecture: an :class:`Arch` (U-Net) or a :class:`~bksdm.plan.dit_archs.TransformerArch`.

    Raises:
        ValueError: If the name is unknown; the message lists the known names.
    """
    arch = ALL_ARCHS.get(name.strip().lower())
    if arch is None:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ALL_ARCHS))}")
    return arch


def _as_arch(arch: AnyArch | str) -> AnyArch:
    return get_arch(arch) if isinstance(arch, str) else arch


def build_unet(
    arch_or_config: Arch | str | Mapping[str, Any],
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
) -> UNet2DConditionModel:
    """Build a U-Net with random weights from an architecture or a raw config.

    On the default ``meta`` device no memory is allocated, so even SDXL's 2.6B parameters can be counted
    (and its MACs traced) for free.

    Args:
        arch_or_config: An :class:`Arch`, an architecture name, or a ``UNet2DConditionModel`` config dict
            (e.g. a student config derived from a plan).
        device: Where to allocate the parameters.
        dtype: Parameter dtype; ``None`` keeps float32.

    Returns:
        The U-Net, in eval mode.

    Raises:
        ValueError: For a transformer architecture (build it with :func:`build_denoiser`).
    """
    if isinstance(arch_or_config, Mapping):
        config = dict(arch_or_config)
    else:
        arch = _as_arch(arch_or_config)
        if not isinstance(arch, Arch):
            raise ValueError(f"{arch.name} has a transformer, not a U-Net: build it with build_denoiser")
        config = arch.unet_config
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(copy.deepcopy(config))
    if dtype is not None:
        unet = unet.to(dtype)
    return unet.eval()


def build_denoiser(
    arch_or_config: AnyArch | str | Mapping[str, Any],
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build any architecture's denoiser (U-Net or transformer) with random weights, by its family.

    Args:
        arch_or_config: An architecture, its name, or a denoiser config (a U-Net's, or a transformer's with
            ``_class_name``), e.g. a student config derived from a plan.
        device: Where to allocate the parameters (``meta``: shapes only, nothing allocated).
        dtype: Parameter dtype; ``None`` keeps float32.

    Returns:
        The denoiser, in eval mode.

    Raises:
        UnknownFamilyError: A config of no family bksdm knows.
    """
    source = arch_or_config if isinstance(arch_or_config, Mapping) else _as_arch(arch_or_config).denoiser_config
    config = copy.deepcopy(dict(source))
    with torch.device(device):
        model = family_of(config).build(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build_text_encoders(
    arch: AnyArch | str, device: torch.device | str = "meta", dtype: torch.dtype | None = None
) -> dict[str, nn.Module]:
    """Build the architecture's text encoder(s) with random weights.

    Args:
        arch: An architecture or an architecture name.
        device: Where to allocate the parameters.
        dtype: Parameter dtype; ``None`` keeps float32.

    Returns:
        Modules keyed by pipeline component name (``"text_encoder"``, ``"text_encoder_2"``, SD3's
        ``"text_encoder_3"``), in eval mode.
    """
    arch = _as_arch(arch)
    encoders: dict[str, nn.Module] = {}
    for component, kwargs in arch.text_encoder_configs.items():
        model_cls = getattr(transformers, arch.text_encoder_classes[component])
        config = model_cls.config_class(**copy.deepcopy(kwargs))  # CLIPTextConfig or T5Config
        with torch.device(device):
            model = model_cls(config)
        if dtype is not None:
            model = model.to(dtype)
        encoders[component] = model.eval()
    return encoders


def build_vae(
    arch: AnyArch | str, device: torch.device | str = "meta", dtype: torch.dtype | None = None
) -> AutoencoderKL:
    """Build the architecture's VAE (encoder and decoder) with random weights.

    Args:
        arch: An :class:`Arch` or an architecture name.
        device: Where to allocate the parameters.
        dtype: Parameter dtype; ``None`` keeps float32.

    Returns:
        The ``AutoencoderKL``, in eval mode.
    """
    arch = _as_arch(arch)
    with torch.device(device):
        vae = AutoencoderKL.from_config(copy.deepcopy(arch.vae_config))
    if dtype is not None:
        vae = vae.to(dtype)
    return vae.eval()


def build_scheduler(arch: AnyArch | str) -> diffusers.SchedulerMixin:
    """Build the noise scheduler the architecture's public repository ships.

    Args:
        arch: An architecture or an architecture name.

    Returns:
        A diffusers scheduler (PNDM, DDIM, Euler or flow-matching Euler, per the repository) configured like the
        original.
    """
    arch = _as_arch(arch)
    config = copy.deepcopy(arch.scheduler_config)
    scheduler_cls = getattr(diffusers, config["_class_name"])
    return scheduler_cls.from_config(config)
