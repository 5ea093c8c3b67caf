"""The frozen encoders of a Stable Diffusion pipeline, as the trainer and the cache both call them.

``bksdm cache`` stores what these functions (and a family's ``encode_prompt``, :mod:`bksdm.families`) return and
``bksdm distill`` either reads it back or calls them again, so the two paths give the same training inputs (bit for
bit when the cache is stored in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bksdm.train.cpu_kernels import cpu_kernels


@dataclass
class TextEncoders:
    """The tokenizer(s) and text encoder(s) of a pipeline: one pair for SD-v1/v2, two for SDXL."""

    tokenizers: list
    encoders: list[torch.nn.Module]

    @property
    def is_sdxl(self) -> bool:
        return len(self.encoders) == 2

    @classmethod
    def from_pipeline(cls, pipe) -> TextEncoders:
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        return cls([t for t in tokenizers if t is not None], [e for e in encoders if e is not None])


TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline attributes of text encoders: one (SD-v1/v2), two (SDXL's CLIPs; FLUX's CLIP-L and T5) or three (SD3)."""


def text_encoder_modules(pipe) -> list[torch.nn.Module]:
    """Every text encoder a pipeline holds, in attribute order (the frozen parts besides its VAE and denoiser)."""
    modules = (getattr(pipe, name, None) for name in TEXT_ENCODER_ATTRS)
    return [m for m in modules if isinstance(m, torch.nn.Module)]


def freeze(*modules: torch.nn.Module | None) -> None:
    """Frozen encoders (and teacher): no gradients, eval mode (dropout off)."""
    for module in modules:
        if module is not None:
            module.requires_grad_(False)
            module.eval()


def freeze_teacher_parts(pipe, teacher: torch.nn.Module, device, weight_dtype: torch.dtype) -> None:
    """The frozen side of a distillation recipe: the teacher, the VAE and every text encoder frozen (:func:`freeze`) on
    ``device`` in ``weight_dtype``, the VAE in fp32 where fp16 would overflow (:func:`vae_dtype`)."""
    for module in [teacher, pipe.vae, *text_encoder_modules(pipe)]:
        freeze(module)
        module.to(device=device, dtype=weight_dtype)
    pipe.vae.to(vae_dtype(pipe.vae, weight_dtype))


@torch.no_grad()
def encode_text(
    captions: Sequence[str], text: TextEncoders, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encodes captions the way the pipelines do.

    SD-v1/v2: the last hidden state of the text encoder. SDXL: the penultimate hidden states of both
    encoders, concatenated, plus the second encoder's pooled projection.

    Returns:
        ``(encoder_hidden_states (B, 77, D), pooled (B, P) or None)`` in float32.
    """
    states, pooled = [], None
    for tokenizer, encoder in zip(text.tokenizers, text.encoders, strict=True):
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        if not text.is_sdxl:
            with cpu_kernels(ids.device):
                states.append(encoder(ids)[0])
            continue
        with cpu_kernels(ids.device):
            out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, P)
            pooled = out[0]
    hidden = torch.cat(states, dim=-1).float()
    return hidden, pooled.float() if pooled is not None else None


def vae_dtype(vae: torch.nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a frozen VAE in when the other frozen models use ``weight_dtype``.

    ``force_upcast`` (True in diffusers' default config, so for every SD VAE whose config.json lacks it)
    means the VAE may overflow in fp16: it then runs in fp32, as diffusers' pipelines do. bf16 has fp32's
    range, so it never overflows there and the VAE stays in bf16 (upcasting it made uncached bf16 training
    about 1.8x slower in the encoder on a CPU with native bf16).
    """
    if weight_dtype == torch.float16 and vae.config.get("force_upcast", True):
        return torch.float32
    return weight_dtype


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution of images in [-1, 1]: ``(mean, std)``, each (B, 4, H/8, W/8), float32.

    Under ``no_grad`` whatever the VAE's ``requires_grad``: the encoder is frozen wherever it is called, and a
    graph kept alive through the returned tensors cost ``bksdm cache`` all 24 GB of a CPU machine at SD size.
    """
    with cpu_kernels(vae.device):  # oneDNN kernels, convolution weights packed once (see bksdm.train.cpu_kernels)
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: torch.Tensor,
    scaling_factor: float,
    *,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """A normalised latent drawn from the VAE distribution with given standard-normal ``eps`` (B, C, h, w).

    ``(mean + std * eps - shift_factor) * scaling_factor``, as the pipelines invert it when decoding: SD3's and FLUX's
    VAEs have a ``shift_factor`` in their config (0.0609 and 0.1159), SD-v1/v2/SDXL's have none (None or 0: no shift,
    the latent is exactly ``(mean + std * eps) * scaling_factor`` as before).
    """
    latents = mean + std * eps.to(mean.device)
    if shift_factor:
        latents = latents - shift_factor
    return latents * scaling_factor


def sdxl_time_ids(batch: int, resolution: int, device: torch.device | str) -> torch.Tensor:
    """SDXL's micro-conditioning for center-cropped square training images: (orig h, w, crop top, left, h, w)."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32, device=device)
    return row.expand(batch, 6).clone()
