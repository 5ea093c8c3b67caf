"""How much memory a sampling call needs above its weights, and how much the device has (estimates).

:func:`bksdm.sampling.check_memory` compares the two before a command starts. Measured on the SD-v1.4
architecture (fp32, 2-core CPU, torch 2.13, diffusers 0.42; peak RSS above the loaded weights):

=========================================  ==========  ===================================
call                                       measured    :func:`generation_bytes`'s term
=========================================  ==========  ===================================
VAE decode, 1 x 256 px                     331 MiB     9 x 128 x 256^2 x 4 B = 288 MiB
VAE decode, 4 x 256 px                     915 MiB     1152 MiB
VAE decode, 1 x 512 px                     1046 MiB    1152 MiB
U-Net step, 512 px, batch 2 (guidance)     407 MiB     48 x 320 x 64^2 x 2 x 4 B = 480 MiB
=========================================  ==========  ===================================

The VAE decoder's full-resolution activations dominate; the attention maps (batch x heads x (h*w/64)^2) are
never materialised by PyTorch's ``scaled_dot_product_attention``, which diffusers uses by default (measured:
a 2 x 8 x 4096^2 fp32 map is 1 GiB, the SDPA call peaked 15 MiB above its inputs), so they count only when the
U-Net runs an attention processor that builds them.

Transformers (SD3, FLUX.1) hold a few (tokens x width) tensors and one MLP's 4x-wide hidden state at a time,
whatever their depth. Measured on real widths with 2 (SD3-medium: 1536) or 1 + 2 (FLUX.1: 3072) blocks, one call
under ``no_grad`` (fp32, CPU, same versions), in units of tokens x width x batch x 4 B (text tokens included):
SD3 512 px batch 2: 309 MiB (19.5); SD3 1024 px: 453 MiB (17.4); FLUX 512 px: 452 MiB (25.1); FLUX 1024 px:
956 MiB (17.7). :data:`TRANSFORMER_TENSORS_PER_WIDTH` takes 28, with :data:`TEXT_TOKENS` for every family.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "available_memory",
    "generation_bytes",
    "gib",
    "pipeline_bytes",
    "transformer_activation_bytes",
    "unet_activation_bytes",
    "vae_activation_bytes",
]

UNET_TENSORS_PER_CHANNEL = 48
"""U-Net activations alive at once, in units of (first-stage channels x latent pixels x batch): 39 measured."""
VAE_TENSORS_PER_CHANNEL = 9
"""VAE decoder/encoder activations alive at once, in units of (first-stage channels x pixels x batch): 8 measured."""
TRANSFORMER_TENSORS_PER_WIDTH = 28
"""Transformer activations alive at once, in units of (tokens x attention width x batch): 25 measured at most."""
TEXT_TOKENS = 77 + 512
"""Text tokens a transformer step reads, at most: CLIP's 77 and FLUX.1-dev's 512 T5 tokens (SD3: 77 + 256)."""


def unet_activation_bytes(
    unet_config: Any, latent_pixels: int, batch: int, dtype_bytes: int = 4, *, attention_maps: bool = False
) -> int:
    """Bytes of activations one U-Net call holds at its peak (estimate; see the module's table).

    Args:
        unet_config: The U-Net's config (a mapping or a diffusers config object).
        latent_pixels: Latent height x width.
        batch: The U-Net's batch (twice the images under classifier-free guidance).
        dtype_bytes: Bytes per element.
        attention_maps: Whether attention materialises its (batch, heads, tokens, tokens) maps.
    """
    unet = dict(unet_config)
    channels = list(unet["block_out_channels"])
    total = UNET_TENSORS_PER_CHANNEL * channels[0] * latent_pixels * batch * dtype_bytes
    if attention_maps:
        heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
        stages = [i for i, kind in enumerate(unet["down_block_types"]) if "Attn" in kind]
        # scores and their softmax, per stage; the stages run one after the other
        total += max((2 * batch * heads[i] * (latent_pixels / 4**i) ** 2 * dtype_bytes for i in stages), default=0)
    return int(total)


def transformer_activation_bytes(config: Any, latent_pixels: int, batch: int, dtype_bytes: int = 4) -> int:
    """Bytes of activations one SD3 / FLUX.1 transformer call holds at its peak (estimate; see the module's table).

    Args:
        config: The transformer's config (a mapping or a diffusers config object).
        latent_pixels: Latent height x width; both families make a token of each 2x2 latent patch (SD3's
            ``patch_size`` 2, FLUX's packing).
        batch: The transformer's batch (twice the images under classifier-free guidance).
        dtype_bytes: Bytes per element.
    """
    config = dict(config)
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    tokens = latent_pixels // 4 + TEXT_TOKENS
    return int(TRANSFORMER_TENSORS_PER_WIDTH * tokens * width * batch * dtype_bytes)


def vae_activation_bytes(vae_config: Any, height: int, width: int, batch: int, dtype_bytes: int = 4) -> int:
    """Bytes of activations one VAE decode (or encode) of ``batch`` images holds at its peak (estimate)."""
    channels = dict(vae_config)["block_out_channels"][0]
    return int(VAE_TENSORS_PER_CHANNEL * channels * height * width * batch * dtype_bytes)


def generation_bytes(
    unet_config: Any,
    vae_config: Any,
    height: int,
    width: int,
    batch: int,
    *,
    guidance: bool,
    unet_dtype_bytes: int = 4,
    vae_dtype_bytes: int = 4,
    attention_maps: bool = False,
) -> int:
    """Bytes of activations one pipeline call needs above its weights (estimate; see the module's table).

    The denoiser steps and the VAE decode (or encode, for img2img) run one after the other, so the peak is the
    larger of the two, plus the decoded images.

    Args:
        unet_config, vae_config: The pipeline's denoiser (a U-Net, or an SD3 / FLUX.1 transformer) and VAE configs
            (mappings or diffusers config objects).
        height, width: Image size in pixels.
        batch: Images per call.
        guidance: Whether classifier-free guidance runs (it doubles the denoiser's batch).
        unet_dtype_bytes, vae_dtype_bytes: Bytes per element of each network's activations.
        attention_maps: Whether the U-Net's attention materialises its maps (not with PyTorch's SDPA).

    Returns:
        The estimate in bytes.
    """
    factor = 2 ** (len(dict(vae_config)["block_out_channels"]) - 1)
    latent_pixels = (height // factor) * (width // factor)
    calls = batch * (2 if guidance else 1)
    if "block_out_channels" in dict(unet_config):
        denoiser = unet_activation_bytes(
            unet_config, latent_pixels, calls, unet_dtype_bytes, attention_maps=attention_maps
        )
    else:
        denoiser = transformer_activation_bytes(unet_config, latent_pixels, calls, unet_dtype_bytes)
    vae = vae_activation_bytes(vae_config, height, width, batch, vae_dtype_bytes)
    images = 3 * height * width * batch * (4 + 4 + 1)  # the decoded float tensor, its numpy copy, 8-bit pixels
    return max(denoiser, vae) + images


def available_memory(device: torch.device | str) -> tuple[int, str]:
    """Bytes a computation on ``device`` can still allocate, and where that figure comes from.

    CUDA: the driver's free memory plus what PyTorch holds cached but unused. CPU: the kernel's
    ``MemAvailable`` (free memory plus what the page cache can give back), lowered to a cgroup's remaining
    limit inside a container that has one.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + cached), f"free on cuda:{index}"
    available, source = _mem_available()
    limit = _cgroup_room()
    if limit is not None and limit < available:
        return limit, "left under this container's memory limit"
    return available, source


def _mem_available() -> tuple[int, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available on this machine"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free on this machine"
    except (ValueError, OSError, AttributeError):
        return 2**62, "unknown (not checked)"


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit, or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    try:
        return max(int(limit) - used, 0)
    except ValueError:
        return None


def _attention_maps(unet) -> bool:
    """Whether some attention processor of a U-Net builds its maps (every one but PyTorch's SDPA / xFormers).

    The transformers' processors (``JointAttnProcessor2_0``, ``FluxAttnProcessor``) all call SDPA."""
    if "block_out_channels" not in unet.config:
        return False
    processors = getattr(unet, "attn_processors", {}) or {}
    return any(not (type(p).__name__.endswith("2_0") or "XFormers" in type(p).__name__) for p in processors.values())


def _dtype_bytes(module) -> int:
    try:
        return next(module.parameters()).element_size()
    except (StopIteration, AttributeError):
        return 4


def pipeline_bytes(pipe, height: int, width: int, batch: int, guidance: bool) -> int:
    """:func:`generation_bytes` for a loaded diffusers pipeline (its configs, dtypes and attention processors).

    The VAE counts in fp32 when its config asks for an upcast (``force_upcast``) and the pipeline runs in fp16.
    ``guidance``: whether the denoiser's batch is doubled (:func:`bksdm.sampling.classifier_free`).
    """
    from bksdm.families import denoiser_of

    denoiser = denoiser_of(pipe)
    vae_bytes = _dtype_bytes(pipe.vae)
    if vae_bytes == 2 and getattr(pipe.vae.config, "force_upcast", False):
        vae_bytes = 4
    return generation_bytes(
        denoiser.config,
        pipe.vae.config,
        height,
        width,
        batch,
        guidance=guidance,
        unet_dtype_bytes=_dtype_bytes(denoiser),
        vae_dtype_bytes=vae_bytes,
        attention_maps=_attention_maps(denoiser),
    )


def gib(n: float) -> str:
    """Bytes as "1.5 GiB" (or "300 MiB" below a GiB), for messages."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"
