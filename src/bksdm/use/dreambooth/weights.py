"""What a DreamBooth run trains and how its weights are stored: the trainable modules (all weights, or LoRA
adapters), the optimizer, the weight files of a checkpoint, resuming them, and the final output.

Full fine-tuning stores the U-Net (and text encoder) as stock diffusers folders; LoRA stores only the adapters, in
diffusers' ``pytorch_lora_weights.safetensors`` (:mod:`bksdm.use.lora`), never a copy of the frozen model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from bksdm.artifacts import partial_path
from bksdm.train.checkpoints import load_module, read_checkpoint, read_weights, restore_training_state
from bksdm.train.encoders import vae_dtype
from bksdm.use.dreambooth.config import DreamBoothConfig
from bksdm.use.lora import LORA_FILE, TEXT_LORA_TARGETS, UNET_LORA_TARGETS, load_lora, lora_config, save_lora

__all__ = [
    "RECIPE",
    "fingerprints",
    "make_optimizer",
    "resume_weights",
    "save_output",
    "set_up_training",
    "write_model_files",
]

RECIPE = "dreambooth"
"""The recipe name in a checkpoint's state: a distill checkpoint is not resumed by DreamBooth, nor the reverse."""


def fingerprints(cfg: DreamBoothConfig) -> dict[str, Any]:
    """What a checkpoint's weights depend on: a LoRA checkpoint does not resume full fine-tuning, nor the reverse."""
    return {"lora": cfg.lora.enabled, "train_text_encoder": cfg.model.train_text_encoder}


def set_up_training(cfg: DreamBoothConfig, pipe, weight_dtype: torch.dtype) -> list[torch.nn.Module]:
    """Freezes what does not train, adds the LoRA adapters, and returns the modules that train.

    Frozen weights run in ``weight_dtype`` (the mixed-precision dtype); trainable ones stay in fp32.
    """
    unet, text_encoder = pipe.unet, pipe.text_encoder
    pipe.vae.requires_grad_(False)
    pipe.vae.to(dtype=vae_dtype(pipe.vae, weight_dtype))  # fp32 where fp16 would overflow
    unet.requires_grad_(not cfg.lora.enabled)
    text_encoder.requires_grad_(cfg.model.train_text_encoder and not cfg.lora.enabled)
    if cfg.lora.enabled:
        unet.to(dtype=weight_dtype)
        unet.add_adapter(lora_config(cfg.lora.rank, cfg.lora.alpha, UNET_LORA_TARGETS))
        if cfg.model.train_text_encoder:
            text_encoder.to(dtype=weight_dtype)
            text_encoder.add_adapter(lora_config(cfg.lora.rank, cfg.lora.alpha, TEXT_LORA_TARGETS))
    if not cfg.model.train_text_encoder:
        text_encoder.to(dtype=weight_dtype)
    trained = [unet] + ([text_encoder] if cfg.model.train_text_encoder else [])
    for module in trained:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.model.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    return trained


def make_optimizer(cfg: DreamBoothConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit one when asked) over the trainable parameters."""
    adam = torch.optim.AdamW
    if cfg.optim.use_8bit_adam:
        import bitsandbytes as bnb  # optional: pip install bitsandbytes

        adam = bnb.optim.AdamW8bit
    o = cfg.optim
    return adam(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon)


def write_model_files(cfg: DreamBoothConfig, pipe, folder: Path) -> None:
    """The weights a checkpoint holds besides the training state, in diffusers' format."""
    if cfg.lora.enabled:
        save_lora(folder, pipe.unet, pipe.text_encoder if cfg.model.train_text_encoder else None)
    else:
        pipe.unet.save_pretrained(folder / "unet")
        if cfg.model.train_text_encoder:
            pipe.text_encoder.save_pretrained(folder / "text_encoder")


def resume_weights(cfg: DreamBoothConfig, pipe, checkpoint: Path, optimizer, lr_scheduler) -> int:
    """Loads a checkpoint written by this recipe (weights, optimizer, schedule); returns its step.

    Raises:
        CheckpointError: Not a DreamBooth checkpoint, or one of another mode (LoRA vs full, text encoder or not).
    """
    state = read_checkpoint(checkpoint, RECIPE, fingerprints(cfg))
    if cfg.lora.enabled:
        load_lora(checkpoint / LORA_FILE, pipe.unet, pipe.text_encoder if cfg.model.train_text_encoder else None)
    else:
        load_module(pipe.unet, read_weights(checkpoint / "unet", "diffusion_pytorch_model"), "U-Net")
        if cfg.model.train_text_encoder:
            load_module(pipe.text_encoder, read_weights(checkpoint / "text_encoder", "model"), "text encoder")
    restore_training_state(checkpoint, state, optimizer, lr_scheduler)
    return int(state["step"])


def save_output(cfg: DreamBoothConfig, pipe, out: Path) -> Path | None:
    """The final result, written so that a crash never leaves something that looks complete.

    The output folder also holds the run's checkpoints and logs, so it cannot be replaced as a whole. LoRA: the
    adapter file is written aside and moved into place. Full: the pipeline is saved aside in fp32,
    ``model_index.json`` is removed first and moved in last, so ``from_pretrained(out)`` only ever sees a
    complete pipeline.

    Returns:
        The adapter file (LoRA), else None.
    """
    partial = partial_path(out / "output")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    if cfg.lora.enabled:
        file = save_lora(partial, pipe.unet, pipe.text_encoder if cfg.model.train_text_encoder else None)
        file.replace(out / LORA_FILE)
        shutil.rmtree(partial)
        return out / LORA_FILE
    pipe.to(torch.float32)
    pipe.save_pretrained(partial, safe_serialization=True)
    (out / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(partial.iterdir()):
        if entry.name == "model_index.json":
            continue
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    (partial / "model_index.json").replace(out / "model_index.json")
    shutil.rmtree(partial)
    return None
