"""LoRA through peft for Stable Diffusion pipelines, written in diffusers' format.

Adapters go on the U-Net's attention projections (and optionally the CLIP text encoder's), the modules
diffusers' own DreamBooth-LoRA recipe adapts. The result is saved with diffusers' ``save_lora_weights``, so
``pipe.load_lora_weights(folder)`` loads it in any diffusers program. Checkpoints keep only the adapters, in
that same file (read back exactly by :func:`load_lora`), not the frozen base weights.

Keys are written in peft's format (``<module>.lora_A.weight``), which ``load_lora_weights`` reads for every kind of
adapted module. (diffusers' older format renames the attention projections only: with targets beyond attention, a
file converted to it mixes the two formats, and ``load_lora_weights`` then skipped every attention adapter, measured
on the shapes U-Net with LCM-LoRA's targets: 298 of 554 tensors loaded.)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

__all__ = [
    "LORA_FILE",
    "TEXT_LORA_TARGETS",
    "UNET_LORA_TARGETS",
    "lora_config",
    "lora_layers",
    "load_lora",
    "save_lora",
    "text_encoder_lora_problem",
    "write_lora",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' file name for LoRA weights: ``pipe.load_lora_weights(folder)`` finds it."""
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""U-Net modules LoRA adapts: the attention projections (diffusers' DreamBooth-LoRA recipe)."""
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP text encoder modules LoRA adapts when the text encoder is trained."""


def lora_config(rank: int, alpha: float, targets: Sequence[str]):
    """A peft ``LoraConfig``: A drawn from a Gaussian, B zero, so a new adapter starts as the identity."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))


def lora_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-adapted module, in peft's key format (``<module>.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module)


def write_lora(
    folder: Path,
    pipeline_class: type,
    layers: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, Mapping[str, Any] | None],
) -> Path:
    """Writes ``folder/pytorch_lora_weights.safetensors`` with the pipeline class's own ``save_lora_weights``.

    Args:
        folder: Where the file goes (created if missing).
        pipeline_class: The diffusers pipeline class that will load it (``StableDiffusionPipeline``,
            ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, ...).
        layers: Component (``unet``, ``transformer``, ``text_encoder``, ...) → its adapters, keys in peft's format
            without the component prefix. Empty components are left out.
        configs: Component → its ``LoraConfig`` as a dict (rank, alpha, targets), stored as the file's metadata so
            that ``load_lora_weights`` rebuilds the adapters exactly as trained.

    Raises:
        ValueError: The class cannot save LoRA weights for one of the components.
    """
    parameters = inspect.signature(pipeline_class.save_lora_weights).parameters
    kwargs: dict[str, Any] = {}
    for component, weights in layers.items():
        if not weights:
            continue
        if f"{component}_lora_layers" not in parameters:
            raise ValueError(f"{pipeline_class.__name__} cannot save LoRA weights for its {component}")
        kwargs[f"{component}_lora_layers"] = dict(weights)
        kwargs[f"{component}_lora_adapter_metadata"] = dict(configs[component]) if configs.get(component) else None
    pipeline_class.save_lora_weights(folder, **kwargs, safe_serialization=True)
    return folder / LORA_FILE


def save_lora(folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Writes ``folder/pytorch_lora_weights.safetensors`` with diffusers' own ``save_lora_weights``.

    The adapters' peft configs go in as metadata, so rank and alpha load back as trained.
    """
    modules = {"unet": unet, "text_encoder": text_encoder}
    modules = {name: module for name, module in modules.items() if module is not None}
    return write_lora(
        folder,
        StableDiffusionPipeline,
        {name: lora_layers(module) for name, module in modules.items()},
        {name: module.peft_config["default"].to_dict() for name, module in modules.items()},
    )


def load_lora(file: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> None:
    """Sets the adapters of peft-adapted ``unet`` (and ``text_encoder``) to the weights of a :func:`save_lora` file.

    The values round-trip exactly (diffusers' format only renames the keys). A checkpoint resumes from this
    file, so it holds the adapters once.

    Raises:
        ValueError: the file does not hold exactly these adapters.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from bksdm.train.checkpoints import read_weights

    stored = read_weights(file.parent, file.name.removesuffix(".safetensors"))
    parts = [("unet", unet, convert_unet_state_dict_to_peft)]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder, _text_encoder_to_peft))
    for prefix, module, convert in parts:
        state = convert({k[len(prefix) + 1 :]: v for k, v in stored.items() if k.startswith(prefix + ".")})
        expected = get_peft_model_state_dict(module)
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"{file} does not hold this run's {prefix} adapter (another rank or target modules)")
        set_peft_model_state_dict(module, state)
    unknown = {k.split(".", 1)[0] for k in stored} - {prefix for prefix, _, _ in parts}
    if unknown:
        raise ValueError(f"{file} holds adapters of {sorted(unknown)}, which this run does not train")


def _text_encoder_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's adapters in peft's keys: files of this module have them; older ones diffusers' keys."""
    from diffusers.utils import convert_state_dict_to_peft

    return state if all(".lora_A." in k or ".lora_B." in k for k in state) else convert_state_dict_to_peft(state)


def text_encoder_lora_problem() -> str | None:
    """Why LoRA on the text encoder cannot work with the installed peft and transformers, or None.

    transformers 5 adds and loads adapters on its models (diffusers' ``load_lora_weights`` calls its
    ``load_adapter`` for the text encoder part) only with a recent peft; refusing up front beats writing an
    adapter that stock diffusers cannot load.
    """
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # older transformers: no such pin
        return None
    installed = version("peft")
    if Version(installed) >= Version(MIN_PEFT_VERSION):
        return None
    return (
        f"--lora --train-text-encoder needs peft >= {MIN_PEFT_VERSION} with transformers {version('transformers')} "
        f"(installed: peft {installed}), both to train the text encoder's adapter and for diffusers' "
        "load_lora_weights to load it: `pip install -U peft`, or train the U-Net's LoRA only (--no-train-text-encoder)"
    )
