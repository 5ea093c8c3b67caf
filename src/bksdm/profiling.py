"""Parameters, MACs, latency and peak memory: pure measuring functions, no printing, no files.

MACs are counted the way the BK-SDM paper counts them: forward hooks on every convolution and linear layer
of one forward pass (batch 1, one U-Net step, no classifier-free guidance), ``output elements x
(in_channels / groups x kernel area)`` for a convolution and ``output elements x in_features`` for a linear
layer, biases not counted. The attention matrix products (``QK^T`` and ``AV``), which the paper leaves out,
are counted separately so a report can show both.

Measured here against the paper (512 px, batch 1): SD-v1.4 U-Net 338.61G (published 338.7G), SD-v2.1-base
339.10G (339.2G), CLIP ViT-L text 6.54G (6.5G), VAE decoder 1240.08G (1240.1G). The paper's figures come
from thop, which also charges 4 ops per element of every ``nn.LayerNorm`` (not ``GroupNorm``); adding that
reproduces all four published figures to the last digit (338.75G, 339.24G, 6.55G, 1240.08G), so the small
gap is normalisation, not a missing convolution or linear layer.

Attention products are counted for diffusers' ``Attention`` (U-Nets, VAEs, SD3's joint blocks, where image and
text tokens attend together), FLUX's ``FluxAttention`` (not an ``Attention`` subclass: joint over text + image in the
double blocks, plain over the concatenated sequence in the single blocks), CLIP's and T5's encoder attention.

Counting works on ``meta``-device models, where only shapes flow through the forward pass: the MACs of
SDXL's 2.6B-parameter U-Net or FLUX.1's 12B transformer are traced without allocating their weights.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn
from transformers.models.clip.modeling_clip import CLIPAttention
from transformers.models.t5.modeling_t5 import T5Attention

__all__ = [
    "LatencyStat",
    "MacCount",
    "count_macs",
    "count_params",
    "cpu_has_native_bf16",
    "cpu_model",
    "device_name",
    "measure_latency",
    "peak_memory",
    "text_encoder_inputs",
    "unet_inputs",
    "vae_decoder_inputs",
]

# Stable Diffusion's VAE maps 8x8 pixels to one latent, and its tokenizers pad prompts to 77 tokens.
VAE_SCALE = 8
TEXT_LENGTH = 77
# SDXL's micro-conditioning: original size (2), crop top-left (2), target size (2).
SDXL_TIME_IDS = 6

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulate operations of one forward pass.

    Attributes:
        conv_linear: MACs of all convolution and linear calls: the paper's figure.
        attention: MACs of the attention matrix products (``QK^T`` and ``AV``), not in the paper's figure.
        per_module: ``conv_linear`` split by module address truncated to ``group_depth`` components (e.g.
            ``"down_blocks.1"`` at depth 2, ``"down_blocks.1.attentions.0"`` at depth 4); sums to
            ``conv_linear``. A layer that is the counted model itself is keyed ``"(root)"``.
        attention_per_module: ``attention`` split the same way; sums to ``attention``.
        total: ``conv_linear + attention``.
    """

    conv_linear: int
    attention: int
    per_module: dict[str, int]
    attention_per_module: dict[str, int] = field(default_factory=dict)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.conv_linear + self.attention)


@dataclass(frozen=True)
class LatencyStat:
    """Wall-clock timings of repeated calls.

    Attributes:
        times: Seconds taken by each timed call, in order.
        median: Median of ``times`` (robust to one slow outlier).
        min: Fastest call (the least disturbed by other load).
    """

    times: tuple[float, ...]
    median: float = field(init=False)
    min: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.times:
            raise ValueError("LatencyStat needs at least one timing")
        object.__setattr__(self, "median", statistics.median(self.times))
        object.__setattr__(self, "min", min(self.times))


def count_params(module: nn.Module) -> int:
    """Count the parameters of a module (shared tensors once), on any device including ``meta``.

    Args:
        module: The model.

    Returns:
        The number of scalar parameters.
    """
    return sum(p.numel() for p in module.parameters())


def _group(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth]) if name else "(root)"


def _conv_linear_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    # Each output element is a dot product over one group's input channels and the kernel window.
    kernel_area = math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * kernel_area


def _diffusers_attention_macs(module: Attention | FluxAttention, args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    if hidden.ndim == 4:  # (B, C, H, W) from the VAE's mid-block attention: H*W query tokens
        batch, query_len = hidden.shape[0], hidden.shape[2] * hidden.shape[3]
    else:  # (B, L, C)
        batch, query_len = hidden.shape[0], hidden.shape[1]
    key_len = query_len if context is None else context.shape[1]
    added_kv = module.added_kv_proj_dim is not None and not getattr(module, "only_cross_attention", False)
    if context is not None and added_kv:
        # Added-KV attention attends to the context tokens and the image tokens together.
        key_len = context.shape[1] + query_len
        if getattr(module, "add_q_proj", None) is not None:
            # Joint attention (SD3's and FLUX's double blocks): the text tokens are queries too.
            query_len = key_len
    head_dim = module.inner_dim // module.heads
    # QK^T and AV each cost batch x heads x query_len x key_len x head_dim.
    return 2 * batch * module.heads * query_len * key_len * head_dim


def _clip_attention_macs(module: CLIPAttention, args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, L, C), self-attention only
    batch, length = hidden.shape[0], hidden.shape[1]
    return 2 * batch * module.num_heads * length * length * module.head_dim


def _t5_attention_macs(module: T5Attention, args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, L, d_model)
    context = args[2] if len(args) > 2 else kwargs.get("key_value_states")  # None in the encoder
    key_len = hidden.shape[1] if context is None else context.shape[1]
    return 2 * hidden.shape[0] * module.n_heads * hidden.shape[1] * key_len * module.key_value_proj_dim


_ATTENTIONS: tuple[tuple[type[nn.Module], Callable[[Any, tuple, dict], int]], ...] = (
    (Attention, _diffusers_attention_macs),
    (FluxAttention, _diffusers_attention_macs),
    (CLIPAttention, _clip_attention_macs),
    (T5Attention, _t5_attention_macs),
)


def count_macs(
    module: nn.Module,
    *args: Any,
    group_depth: int = 2,
    method: str = "forward",
    **kwargs: Any,
) -> MacCount:
    """Count the MACs of one forward pass with hooks, the way the BK-SDM paper does.

    Runs ``module(*args, **kwargs)`` (or ``module.<method>(*args, **kwargs)``) once under ``torch.no_grad()``.
    Convolutions (1-, 2- and 3-D) and linear layers are counted by their output shape; the attention calls of
    diffusers (``Attention``, ``FluxAttention``) and transformers (``CLIPAttention``, ``T5Attention``) add their
    matrix products to ``attention``. Each call is counted, so a module used twice counts twice. The hooks are
    removed afterwards, also when the forward raises.

    Args:
        module: The model; may live on the ``meta`` device.
        *args: Positional inputs of the call.
        group_depth: Number of address components kept for ``per_module`` (keyword only).
        method: Name of the method to call instead of ``forward``, e.g. ``"decode"`` for a VAE decoder
            (which then counts ``post_quant_conv`` and ``decoder``) (keyword only).
        **kwargs: Keyword inputs of the call.

    Returns:
        The counts.

    Raises:
        ValueError: If ``group_depth`` is less than 1.
    """
    if group_depth < 1:
        raise ValueError(f"group_depth must be >= 1, got {group_depth}")
    per_module: dict[str, int] = defaultdict(int)
    attention_per_module: dict[str, int] = defaultdict(int)

    def conv_linear_hook(group: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            per_module[group] += _conv_linear_macs(mod, output)

        return hook

    def attention_hook(group: str, macs_fn: Callable[[Any, tuple, dict], int]) -> Callable[..., None]:
        # A pre-hook with kwargs: diffusers passes encoder_hidden_states by keyword, and only the inputs
        # carry the key length (the output has the query's shape).
        def hook(mod: nn.Module, hook_args: tuple, hook_kwargs: dict) -> None:
            attention_per_module[group] += macs_fn(mod, hook_args, hook_kwargs)

        return hook

    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, sub in module.named_modules():
            group = _group(name, group_depth)
            if isinstance(sub, (nn.Linear, *_CONVS)):
                handles.append(sub.register_forward_hook(conv_linear_hook(group)))
            for kind, macs_fn in _ATTENTIONS:
                if isinstance(sub, kind):
                    hook = attention_hook(group, macs_fn)
                    handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
        call = module if method == "forward" else getattr(module, method)
        with torch.no_grad():
            call(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return MacCount(
        conv_linear=sum(per_module.values()),
        attention=sum(attention_per_module.values()),
        per_module=dict(per_module),
        attention_per_module=dict(attention_per_module),
    )


def unet_inputs(
    unet_config: Mapping[str, Any],
    resolution: int,
    batch: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_scale: int = VAE_SCALE,
    text_tokens: int = TEXT_LENGTH,
) -> dict[str, Any]:
    """Make the standard inputs of one U-Net step, as keyword arguments of its forward.

    Args:
        unet_config: The U-Net's config (a dict or ``unet.config``).
        resolution: Image side in pixels; the latent side is ``resolution // vae_scale``.
        batch: Batch size (1 for the paper's figures).
        device: Device of the tensors (``"meta"`` for shape-only counting).
        dtype: Dtype of the floating-point tensors.
        vae_scale: The VAE's downsampling factor (8 for Stable Diffusion; the shapes world's VAE has 4).
        text_tokens: Prompt tokens the cross-attention reads (77 for Stable Diffusion's CLIP).

    Returns:
        ``sample`` (B, C_in, res/8, res/8), ``timestep`` (B,), ``encoder_hidden_states``
        (B, text_tokens, cross_attention_dim), and for SDXL-style configs (``addition_embed_type == "text_time"``)
        ``added_cond_kwargs`` with ``text_embeds`` (B, pooled dim) and ``time_ids`` (B, 6).
    """
    side = resolution // vae_scale
    float_kw = {"device": device, "dtype": dtype}
    context_dim = unet_config["cross_attention_dim"]
    inputs: dict[str, Any] = {
        "sample": torch.zeros(batch, unet_config.get("in_channels", 4), side, side, **float_kw),
        # Timestep 999 (the last training step); its value does not affect the cost.
        "timestep": torch.full((batch,), 999, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.zeros(batch, text_tokens, context_dim, **float_kw),
    }
    if unet_config.get("addition_embed_type") == "text_time":
        # The add-embedding sees [pooled text, Fourier features of the 6 time ids]; the pooled width is
        # what remains after the time features (SDXL: 2816 - 6 * 256 = 1280).
        time_dim = unet_config["addition_time_embed_dim"]
        text_dim = unet_config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * time_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, text_dim, **float_kw),
            "time_ids": torch.zeros(batch, SDXL_TIME_IDS, **float_kw),
        }
    return inputs


def text_encoder_inputs(batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """Make token ids for a text encoder: (B, 77) ``int64``, padded like the SD tokenizers pad.

    Args:
        batch: Batch size.
        device: Device of the tensor.

    Returns:
        Input ids of shape (B, 77).
    """
    return torch.zeros(batch, TEXT_LENGTH, device=device, dtype=torch.long)


def vae_decoder_inputs(
    resolution: int,
    batch: int = 1,
    latent_channels: int = 4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Make latents for ``vae.decode``: (B, 4, res/8, res/8).

    Count the decoder as ``count_macs(vae, latents, method="decode")``, which covers ``post_quant_conv``
    and ``decoder`` (the path a pipeline runs once per image).

    Args:
        resolution: Image side in pixels.
        batch: Batch size.
        latent_channels: Latent channels of the VAE.
        device: Device of the tensor.
        dtype: Dtype of the tensor.

    Returns:
        Latents of shape (B, latent_channels, res/8, res/8).
    """
    side = resolution // VAE_SCALE
    return torch.zeros(batch, latent_channels, side, side, device=device, dtype=dtype)


def _synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    fn: Callable[[], Any],
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str | None = None,
) -> LatencyStat:
    """Time ``fn()`` with a wall clock, after warm-up calls.

    On CUDA the device is synchronised before and after each call, since kernels run asynchronously and
    the clock would otherwise measure only the launch.

    Args:
        fn: The work to time, called with no arguments (wrap it in ``torch.no_grad()`` yourself if needed).
        warmup: Untimed calls first (allocator, cuDNN autotuning, lazy initialisation).
        repeats: Timed calls.
        device: The device ``fn`` runs on; CUDA devices are synchronised.

    Returns:
        The timings in seconds.

    Raises:
        ValueError: If ``repeats`` is less than 1 or ``warmup`` is negative.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return LatencyStat(times=tuple(times))


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Run ``fn()`` once and return the peak memory it needed, in bytes.

    On CUDA this is the peak of memory allocated by tensors during the call (the statistics are reset
    first), which is what decides whether a model fits a card. On CPU it is the *process's* peak resident
    set size (``getrusage`` high-water mark) after the call: it includes everything the process ever held,
    cannot be reset, and only grows, so measure one configuration per process to compare them.

    Args:
        fn: The work to measure, called with no arguments.
        device: The device ``fn`` runs on; ``None`` or a non-CUDA device means CPU.

    Returns:
        Peak memory in bytes.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    import resource  # Unix only, hence imported here

    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kibibytes on Linux but in bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024


# ------------------------------------------------------------------------------------- the device, in words


def device_name(device: torch.device | str) -> str:
    """The device in words, e.g. ``"cpu (2 threads)"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``.

    CPU timings scale with the threads torch may use, so the count is part of the name.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        bf16 = ", native bf16" if cpu_has_native_bf16() else ""
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads{bf16})"
    if device.type == "meta":
        return "none (counted on meta-device shapes; nothing ran)"
    return str(device)


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    entries = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        entries[key.strip()] = value.strip()
    return entries


def cpu_model() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC"``; CPU timings mean little without it."""
    import platform

    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX), which makes bf16 mixed
    precision faster than fp32 there; on other CPUs bf16 is emulated and slower."""
    flags = set(_cpuinfo().get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})
