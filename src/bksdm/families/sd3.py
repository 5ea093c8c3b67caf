"""The SD3 family: ``SD3Transformer2DModel`` teachers (SD3-medium, SD3.5-medium, SD3.5-large).

One stack, ``transformer_blocks``, of joint (MM-DiT) blocks that each return ``(text states, image states)``; the
last block is ``context_pre_only`` (it updates only the image stream and returns no text states), so a student must
keep it. SD3.5's blocks listed in ``dual_attention_layers`` carry a second, image-only attention; the student's list
is remapped to its own indices. Prompts are encoded by the stock pipeline (CLIP-L and CLIP-G states concatenated and
zero-padded to T5's width, then T5's states appended; pooled = both CLIPs' projections).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from bksdm.families.base import FlowMatching
from bksdm.plan.spec import Plan
from bksdm.plan.stacks import StackSpec, resolve_stacks

CLIP_TOKENS = 77
T5_TOKENS = 256
"""SD3's pipeline pads T5 prompts to 256 tokens (``max_sequence_length``), after CLIP's 77."""


class SD3Family(FlowMatching):
    """``SD3Transformer2DModel`` teachers in a ``StableDiffusion3Pipeline``."""

    name = "sd3"
    model_class = SD3Transformer2DModel
    class_names = ("SD3Transformer2DModel",)
    stacks = (StackSpec("transformer_blocks", "num_layers"),)
    folds_text = True  # no text positions, joint attention: T5's zero states (T5 left out) train as one token

    def matches(self, config: Mapping[str, Any]) -> bool:
        return super().matches(config) or ("caption_projection_dim" in config and "num_single_layers" not in config)

    # ---- plans ------------------------------------------------------------------------------------------
    def resolve(self, plan: Plan, config: Mapping[str, Any]):
        return resolve_stacks(plan, config, self, self.name)

    def check(self, kept: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> list[str]:
        depth = int(config["num_layers"])
        chosen = kept["transformer_blocks"]
        if chosen and chosen[-1] != depth - 1:
            return [
                f"blocks.transformer_blocks drops block {depth - 1}, SD3's last block: it is the only one built with "
                "context_pre_only (it updates the image stream and ends the text stream), and diffusers builds the "
                f"student's last block that way, so the plan must keep transformer_blocks.{depth - 1}"
            ]
        return []

    def config_updates(self, kept: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> dict[str, Any]:
        dual = set(config.get("dual_attention_layers") or ())
        if not dual:
            return {}
        return {"dual_attention_layers": [j for j, i in enumerate(kept["transformer_blocks"]) if i in dual]}

    def streams(self, stack: str, teacher_index: int, config: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
        if teacher_index == int(config["num_layers"]) - 1:
            return (("image", 1),)  # context_pre_only: (None, image states)
        return (("image", 1), ("text", 0))

    def feature_width(self, config: Mapping[str, Any]) -> int:
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])

    # ---- training ---------------------------------------------------------------------------------------
    def call(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, text: Tensor, extra: Mapping | None) -> Tensor:
        pooled = (extra or {})["pooled_projections"]
        return model(
            hidden_states=noisy,  # (B, 16, h, w)
            timestep=timesteps,  # (B,) in [0, 1000]: sigma * 1000, as the pipeline passes
            encoder_hidden_states=text,  # (B, 77 + 256, 4096)
            pooled_projections=pooled,  # (B, 2048)
            return_dict=False,
        )[0]

    @torch.no_grad()
    def encode_prompt(self, pipe, captions: list[str], device, model_config=None) -> tuple[Tensor, Tensor | None]:
        length = T5_TOKENS
        if getattr(pipe, "tokenizer_3", None) is not None:
            length = min(T5_TOKENS, pipe.tokenizer_3.model_max_length)
        states, _, pooled, _ = pipe.encode_prompt(
            prompt=list(captions),
            prompt_2=None,
            prompt_3=None,
            device=torch.device(device),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
        )
        return states.float(), pooled.float()

    def conditioning(self, pooled: Tensor | None, resolution: int, device, model_config: Mapping[str, Any]):
        return {"pooled_projections": pooled.to(device)}

    def text_tokens(self, config: Mapping[str, Any], lengths: Mapping[str, int] | None = None) -> int:
        """CLIP's prompt length (both CLIPs share it) then T5's 256 (zeros where the pipeline has no T5)."""
        lengths = lengths or {}
        clip = max(
            (lengths[name] for name in ("text_encoder", "text_encoder_2") if name in lengths), default=CLIP_TOKENS
        )
        return clip + lengths.get("text_encoder_3", T5_TOKENS)

    def mac_inputs(
        self, config: Mapping[str, Any], resolution: int, device, vae_scale: int, text_tokens: int | None = None
    ) -> dict[str, Any]:
        side = resolution // vae_scale
        tokens = text_tokens or self.text_tokens(config)
        return {
            "hidden_states": torch.zeros(1, config["in_channels"], side, side, device=device),
            "timestep": torch.full((1,), 999.0, device=device),
            "encoder_hidden_states": torch.zeros(1, tokens, config["joint_attention_dim"], device=device),
            "pooled_projections": torch.zeros(1, config["pooled_projection_dim"], device=device),
        }


SD3 = SD3Family()
