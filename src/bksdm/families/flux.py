"""The FLUX.1 family: ``FluxTransformer2DModel`` teachers (FLUX.1-dev, FLUX.1-schnell).

Two stacks: ``transformer_blocks`` (double-stream blocks) and ``single_transformer_blocks``; both return
``(text states, image states)`` in diffusers. Latents are packed 2x2 into tokens (B, h/2 * w/2, 4C) with rotary
position ids; FLUX.1-dev is guidance-distilled, so its denoiser takes a guidance value, which training passes as a
constant (:data:`TRAIN_GUIDANCE`, diffusers' FLUX DreamBooth default). The schedule's shift depends on the image's
token count (``use_dynamic_shifting``), as in the FLUX pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from bksdm.families.base import FlowMatching, dynamic_shift
from bksdm.plan.spec import Plan
from bksdm.plan.stacks import StackSpec, resolve_stacks

T5_TOKENS = {True: 512, False: 256}
"""T5 prompt length of the FLUX pipelines: 512 for FLUX.1-dev (guidance-distilled), 256 for schnell."""
TRAIN_GUIDANCE = 3.5
"""The guidance value a guidance-distilled FLUX student is trained with (its teacher is called with the same)."""


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) → (B, h/2 * w/2, 4C): FLUX's 2x2 patch tokens (the pipeline's ``_pack_latents``)."""
    from diffusers import FluxPipeline  # importing a pipeline loads transformers' image processors: only when used

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack` for latents of side (h, w)."""
    b, _, d = tokens.shape
    tokens = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, d // 4, h, w)


class FluxFamily(FlowMatching):
    """``FluxTransformer2DModel`` teachers in a ``FluxPipeline``."""

    name = "flux"
    model_class = FluxTransformer2DModel
    class_names = ("FluxTransformer2DModel",)
    stacks = (
        StackSpec("transformer_blocks", "num_layers"),
        StackSpec("single_transformer_blocks", "num_single_layers"),
    )

    def matches(self, config: Mapping[str, Any]) -> bool:
        return super().matches(config) or "num_single_layers" in config

    # ---- plans ------------------------------------------------------------------------------------------
    def resolve(self, plan: Plan, config: Mapping[str, Any]):
        return resolve_stacks(plan, config, self, self.name)

    def check(self, kept: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> list[str]:
        return []

    def config_updates(self, kept: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def streams(self, stack: str, teacher_index: int, config: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
        return (("image", 1), ("text", 0))

    def feature_width(self, config: Mapping[str, Any]) -> int:
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])

    # ---- training ---------------------------------------------------------------------------------------
    def shift(self, u: float, scheduler_config: Mapping[str, Any], latent_shape) -> float:
        if not scheduler_config.get("use_dynamic_shifting", False):
            return super().shift(u, scheduler_config, latent_shape)
        _, h, w = latent_shape
        return dynamic_shift(u, scheduler_config, (h // 2) * (w // 2))

    def call(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, text: Tensor, extra: Mapping | None) -> Tensor:
        from diffusers import FluxPipeline

        extra = dict(extra or {})
        b, _, h, w = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = extra.get("guidance")
        tokens = model(
            hidden_states=pack(noisy),  # (B, h/2 * w/2, 64)
            timestep=timesteps / 1000,  # the pipeline passes sigma; the model scales it by 1000 itself
            guidance=guidance,
            pooled_projections=extra["pooled_projections"],  # (B, 768): CLIP-L's pooled output
            encoder_hidden_states=text,  # (B, 512, 4096): T5's states
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return unpack(tokens, h, w)  # (B, 16, h, w)

    @torch.no_grad()
    def encode_prompt(self, pipe, captions: list[str], device, model_config=None) -> tuple[Tensor, Tensor | None]:
        guided = bool((model_config or pipe.transformer.config).get("guidance_embeds"))
        length = min(T5_TOKENS[guided], pipe.tokenizer_2.model_max_length)
        states, pooled, _ = pipe.encode_prompt(
            prompt=list(captions), prompt_2=None, device=torch.device(device), num_images_per_prompt=1,
            max_sequence_length=length,
        )  # fmt: skip
        return states.float(), pooled.float()

    def conditioning(self, pooled: Tensor | None, resolution: int, device, model_config: Mapping[str, Any]):
        extra = {"pooled_projections": pooled.to(device)}
        if model_config.get("guidance_embeds"):
            extra["guidance"] = torch.full((pooled.shape[0],), TRAIN_GUIDANCE, device=device)
        return extra

    def text_tokens(self, config: Mapping[str, Any], lengths: Mapping[str, int] | None = None) -> int:
        """T5's prompt length (512 for FLUX.1-dev, 256 for schnell): FLUX's text stream is T5 alone."""
        return (lengths or {}).get("text_encoder_2", T5_TOKENS[bool(config.get("guidance_embeds"))])

    def mac_inputs(
        self, config: Mapping[str, Any], resolution: int, device, vae_scale: int, text_tokens: int | None = None
    ) -> dict[str, Any]:
        side = resolution // vae_scale // 2
        guided = bool(config.get("guidance_embeds"))
        tokens = text_tokens or self.text_tokens(config)
        inputs = {
            "hidden_states": torch.zeros(1, side * side, config["in_channels"], device=device),
            "timestep": torch.ones(1, device=device),
            "encoder_hidden_states": torch.zeros(1, tokens, config["joint_attention_dim"], device=device),
            "pooled_projections": torch.zeros(1, config["pooled_projection_dim"], device=device),
            "txt_ids": torch.zeros(tokens, 3, device=device),
            "img_ids": torch.zeros(side * side, 3, device=device),
        }
        if guided:
            inputs["guidance"] = torch.ones(1, device=device)
        return inputs


FLUX = FluxFamily()
