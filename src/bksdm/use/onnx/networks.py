"""The networks ``bksdm export onnx`` writes: each wrapped as a module with plain tensor inputs and outputs.

For each network (:data:`bksdm.use.onnx.export.COMPONENTS`) a :class:`NetworkSpec` says how it is traced and
checked: the wrapped module, a maker of seeded random inputs at a given batch and side (or sequence length), its
input and output names, its dynamic axes (optimum's and diffusers' names), the shape it is traced at and a
second shape the parity check also runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bksdm.use.onnx.runtime import ExportError

__all__ = ["NetworkSpec", "network_specs", "side_multiple"]

_EXAMPLE_BATCH = 2  # traced with batch 2 (a guided step), one timestep per image
_SECOND_BATCH = 3  # also checked at batch 3 with one timestep for the batch, as diffusers' ONNX pipeline feeds it


class _UNet(nn.Module):
    """``unet(sample, timestep, encoder_hidden_states) -> noise prediction``, as one tensor."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _TextEncoder(nn.Module):
    """``text_encoder(input_ids) -> (last_hidden_state, pooler_output)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.encoder(input_ids, return_dict=False)
        return out[0], out[1]


class _VaeDecoder(nn.Module):
    """``vae.decode(latent_sample)``: post-quantisation convolution and decoder (the latent is unscaled)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    """``vae.encode(sample).latent_dist.mode()``: the mean, so the graph holds no random node."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor):
        return self.vae.encode(sample, return_dict=False)[0].mode()


@dataclass
class NetworkSpec:
    """How one network is exported and checked."""

    name: str
    module: nn.Module
    inputs: Callable[[int, int, torch.Generator], dict[str, torch.Tensor]]  # (batch, side or length, generator)
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]
    example: tuple[int, int]  # (batch, side or sequence length) traced with
    second: tuple[int, int]  # (batch, side or sequence length) also checked
    save_config: Callable[[Path], None]  # writes the network's config.json into a folder


def side_multiple(unet_config: Any) -> int:
    """Latent sides must be multiples of this: each U-Net downsampler halves the side."""
    return 2 ** (len(unet_config.block_out_channels) - 1)


def network_specs(pipe, names: Sequence[str]) -> list[NetworkSpec]:
    """The specs of the networks ``names`` of ``pipe``, in the order given.

    Args:
        pipe: A diffusers SD-v1/v2 pipeline (fp32, on the CPU).
        names: Network names from :data:`bksdm.use.onnx.export.COMPONENTS`.

    Raises:
        ExportError: ``text_encoder`` is asked for and the pipeline has none.
    """
    unet, vae = pipe.unet, pipe.vae
    native = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    multiple = side_multiple(unet.config)
    second_side = max(multiple, native - multiple)  # a second latent size the dynamic axes must handle
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    specs: list[NetworkSpec] = []
    if "unet" in names:
        width, channels = unet.config.cross_attention_dim, unet.config.in_channels

        def unet_inputs(batch: int, side: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
            return {
                "sample": torch.randn(batch, channels, side, side, generator=gen),
                # One timestep per image at the example shape; one for the batch (diffusers' ONNX pipeline) else.
                "timestep": torch.randint(0, 1000, (batch if batch == _EXAMPLE_BATCH else 1,), generator=gen).float(),
                "encoder_hidden_states": torch.randn(batch, 77, width, generator=gen),
            }

        specs.append(
            NetworkSpec(
                "unet",
                _UNet(unet),
                unet_inputs,
                ("out_sample",),
                {
                    "sample": {0: "batch", 2: "height", 3: "width"},
                    "timestep": {0: "steps"},
                    "encoder_hidden_states": {0: "batch", 1: "sequence"},
                },
                (_EXAMPLE_BATCH, native),
                (_SECOND_BATCH, second_side),
                unet.save_config,
            )
        )
    if "text_encoder" in names:
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None:
            raise ExportError("the pipeline has no text_encoder; leave it out of --components")
        config = encoder.config
        vocab, bos, eos = config.vocab_size, config.bos_token_id, config.eos_token_id

        def text_inputs(batch: int, length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, vocab, (batch, length), generator=gen)
            ids[:, 0] = bos
            ends = torch.randint(1, length, (batch,), generator=gen)
            for row, end in enumerate(ends.tolist()):  # a prompt of random length, then end-of-text padding
                ids[row, end:] = eos
            return {"input_ids": ids.to(torch.int32)}

        specs.append(
            NetworkSpec(
                "text_encoder",
                _TextEncoder(encoder),
                text_inputs,
                ("last_hidden_state", "pooler_output"),
                {"input_ids": {0: "batch", 1: "sequence"}},
                (_EXAMPLE_BATCH, min(77, config.max_position_embeddings)),
                (_SECOND_BATCH, min(16, config.max_position_embeddings)),
                config.save_pretrained,
            )
        )
    latent_channels = vae.config.latent_channels
    if "vae_decoder" in names:
        specs.append(
            NetworkSpec(
                "vae_decoder",
                _VaeDecoder(vae),
                lambda batch, side, gen: {
                    "latent_sample": torch.randn(batch, latent_channels, side, side, generator=gen)
                },
                ("sample",),
                {"latent_sample": {0: "batch", 2: "height", 3: "width"}},
                (_EXAMPLE_BATCH, native),
                (_SECOND_BATCH, second_side),
                vae.save_config,
            )
        )
    if "vae_encoder" in names:
        specs.append(
            NetworkSpec(
                "vae_encoder",
                _VaeEncoder(vae),
                lambda batch, side, gen: {
                    "sample": torch.rand(batch, 3, side * scale, side * scale, generator=gen) * 2 - 1
                },
                ("latent_sample",),
                {"sample": {0: "batch", 2: "height", 3: "width"}},
                (_EXAMPLE_BATCH, native),
                (_SECOND_BATCH, second_side),
                vae.save_config,
            )
        )
    return specs
