"""Run a trailing stretch of identical text tokens as one weighted token: the same function, far fewer tokens.

SD3's pipeline appends T5's states (256 tokens) to CLIP's (77). Where T5 is left out (``text_encoder_3=None``, the
stock way to save its 4.7 B parameters, and the bundled SD3-shaped teacher's zero-output T5) those 256 tokens are all
zeros. An SD3 transformer gives text tokens no position (its ``context_embedder`` is a linear map, its joint blocks
act per token except in attention), so identical input tokens stay identical through every block, and in every
softmax ``count`` identical keys weigh exactly as one key with ``log(count)`` added to its logit. Running them as one
token (:class:`RepeatedTokenAttnProcessor`) computes the same outputs to float rounding, with the text stream's
per-token work (projections, feed-forward) cut from 333 tokens to 78, and on the bundled teacher (16 + 256 tokens)
the whole step about 5x cheaper on a CPU.

Training only: saved models keep the stock processors and pipelines run the stock token count. Pure: no files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RepeatedTokenAttnProcessor",
    "attn_processors",
    "fold_tail",
    "folded",
    "trailing_repeats",
    "unfold_streams",
    "unfold_tail",
]


def trailing_repeats(text: Tensor) -> int:
    """How many tokens at the end of ``text`` (B, L, D) equal its last token, in every sample (at least 1)."""
    if text.shape[1] < 2:
        return text.shape[1]
    same = (text == text[:, -1:]).all(dim=2).all(dim=0)  # (L,): token i equals the last one in every sample
    differing = torch.nonzero(~same)
    return text.shape[1] if len(differing) == 0 else text.shape[1] - 1 - int(differing[-1])


def fold_tail(text: Tensor, count: int) -> Tensor:
    """``text`` (B, L, D) with its last ``count`` (identical) tokens kept once: (B, L - count + 1, D)."""
    return text[:, : text.shape[1] - count + 1]


def unfold_tail(states: Tensor, count: int) -> Tensor:
    """The inverse of :func:`fold_tail` on a text stream's states: the last token repeated ``count`` times."""
    if count == 1:
        return states
    return torch.cat([states[:, :-1], states[:, -1:].expand(-1, count, -1)], dim=1)


class RepeatedTokenAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` for a text stream whose *last* token stands for ``count`` identical
    tokens: ``log(count)`` is added to that key's logit, which is exactly what ``count`` copies of it contribute to
    every softmax. Follows the stock processor step for step (query/key norms, the context projections,
    ``context_pre_only``); an image-only attention (SD3.5's second attention, ``encoder_hidden_states`` None) runs
    as stock."""

    def __init__(self, count: int) -> None:
        self.bias = math.log(count)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: Tensor) -> Tensor:  # (B, N, H*D) -> (B, H, N, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask = None
        if encoder_hidden_states is not None:
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
            mask = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)  # (1, keys), broadcast
            mask[:, -1] = self.bias  # keys are [image tokens, text tokens]; the last text token stands for count
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3]).to(query.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :image_tokens]))
        if encoder_hidden_states is None:
            return image
        text = out[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


@contextmanager
def attn_processors(model: nn.Module, processor) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` uses ``processor``; its own come back on exit."""
    before = model.attn_processors
    model.set_attn_processor(processor)
    try:
        yield
    finally:
        model.set_attn_processor(before)  # a dict: diffusers pops each layer's entry from it


def folded(model: nn.Module, repeats: int) -> AbstractContextManager:
    """Within the block, ``model``'s (unwrapped) attention runs its last text token as ``repeats`` tokens; for
    ``repeats`` 1 nothing changes."""
    return nullcontext() if repeats == 1 else attn_processors(model, RepeatedTokenAttnProcessor(repeats))


def unfold_streams(features: Sequence[Tensor], streams: Sequence[str], repeats: int) -> list[Tensor]:
    """Recorded block outputs in float32, the text-stream ones (``streams[i] == "text"``) at full length."""
    return [
        unfold_tail(f, repeats).float() if stream == "text" else f.float()
        for f, stream in zip(features, streams, strict=True)
    ]
