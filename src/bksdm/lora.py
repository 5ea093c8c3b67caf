"""LoRA through peft for Stable Diffusion pipelines, written in diffusers' format.

Adapters go on the U-Net's attention projections (and optionally the CLIP text encoder's), the modules
diffusers' own DreamBooth-LoRA recipe adapts. The result is saved with diffusers' ``save_lora_weights``, so
``pipe.load_lora_weights(folder)`` loads it in any diffusers program. Checkpoints keep only the adapters, in
peft's format (exact round trip), instead of the frozen base weights accelerate would otherwise save.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

__all__ = [
    "LORA_FILE",
    "TEXT_LORA_TARGETS",
    "UNET_LORA_TARGETS",
    "lora_config",
    "lora_layers",
    "register_lora_checkpoint_hooks",
    "save_lora",
    "text_encoder_lora_problem",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' file name for LoRA weights: ``pipe.load_lora_weights(folder)`` finds it."""
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""U-Net modules LoRA adapts: the attention projections (diffusers' DreamBooth-LoRA recipe)."""
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP text encoder modules LoRA adapts when the text encoder is trained."""
_CHECKPOINT_STATE = "lora_{}.safetensors"  # peft-format adapter state inside a checkpoint


def lora_config(rank: int, alpha: float, targets: Sequence[str]):
    """A peft ``LoraConfig``: A drawn from a Gaussian, B zero, so a new adapter starts as the identity."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))


def lora_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-adapted module, in diffusers' LoRA key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def save_lora(folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Writes ``folder/pytorch_lora_weights.safetensors`` with diffusers' own ``save_lora_weights``.

    The adapters' peft configs go in as metadata, so rank and alpha load back as trained.
    """
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=lora_layers(unet),
        text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=(
            text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None
        ),
        safe_serialization=True,
    )
    return folder / LORA_FILE


def register_lora_checkpoint_hooks(accelerator) -> None:
    """Makes ``accelerator.save_state`` / ``load_state`` keep only the adapters of the prepared models."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def name(model) -> str:
        return "unet" if isinstance(accelerator.unwrap_model(model), UNet2DConditionModel) else "text_encoder"

    def save_hook(models, weights, output_dir) -> None:
        for model in models:
            state = get_peft_model_state_dict(accelerator.unwrap_model(model))
            file = Path(output_dir) / _CHECKPOINT_STATE.format(name(model))
            save_file({k: v.contiguous() for k, v in state.items()}, file)
        weights.clear()  # nothing else of the models is saved

    def load_hook(models, input_dir) -> None:
        while models:  # popped models are not loaded again by accelerate
            model = models.pop()
            state = load_file(Path(input_dir) / _CHECKPOINT_STATE.format(name(model)))
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint {input_dir} does not match the adapter: {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


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
