"""DreamBooth (Ruiz et al., CVPR 2023) on any SD-v1/v2 pipeline, bksdm students included: full or LoRA.

The BK-SDM paper personalises its compact models with DreamBooth (REFERENCE.md, "Downstream"): per subject
4-6 images bound to a rare identifier ("a sks dog"), prior preservation with 200 class images drawn by the
model itself (weight 1.0), the text encoder trained too, lr 1e-6, batch 1, 800 steps, 512 px; and a LoRA
variant of rank 16 at lr 1e-4. Those are the defaults here.

The objective is the model's own diffusion loss on the instance images with the instance prompt, plus
``prior_loss_weight`` times the same loss on class images with the class prompt (:func:`dreambooth_loss`).
Full fine-tuning writes a complete pipeline folder (``StableDiffusionPipeline.from_pretrained(OUT)``); LoRA
(peft, on the U-Net's attention projections and optionally the text encoder's) writes a small
``pytorch_lora_weights.safetensors`` in diffusers' format (``pipe.load_lora_weights(OUT)``).

As in ``bksdm distill``: accelerate (1 to N devices, mixed precision), atomic rotated checkpoints with
``--resume``, ``logs/metrics.jsonl``, and validation images on fixed prompts and seeds. Every random choice
of a training sample (which image, its flip, timestep and noise) is keyed by (seed, micro step, position in
the global batch), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from bksdm.loading import load_pipeline, teacher_or_default
from bksdm.train.checkpoints import find_checkpoint, load_module, read_checkpoint, read_weights, restore_training_state
from bksdm.train.checkpoints import write_checkpoint as write_training_checkpoint
from bksdm.train.encoders import TextEncoders, encode_text, sample_latents, vae_dtype
from bksdm.train.kd import diffusion_target, draw_noise
from bksdm.train.runtime import make_accelerator, peak_memory_mb
from bksdm.use.dreambooth.config import RUN_FILE, DreamBoothConfig, DreamBoothError, check_config
from bksdm.use.dreambooth.data import (
    LatentBank,
    class_images,
    encode_bank,
    ensure_class_images,
    flip_of,
    load_pixels,
    pick,
    save_image_atomic,
)
from bksdm.use.lora import (
    LORA_FILE,
    TEXT_LORA_TARGETS,
    UNET_LORA_TARGETS,
    load_lora,
    lora_config,
    save_lora,
)

__all__ = [
    "LORA_FILE",
    "DreamBoothConfig",
    "DreamBoothError",
    "DreamBoothResult",
    "dreambooth_loss",
    "run_dreambooth",
]

logger = get_logger(__name__)


@dataclass
class DreamBoothResult:
    """What a run produced."""

    output_dir: Path
    """The pipeline folder (full) or the folder holding the adapter (LoRA)."""
    lora_file: Path | None
    """The adapter file (LoRA), else None."""
    steps: int
    """Optimizer steps done."""
    losses: list[dict[str, float]]
    """The logged records (step, loss, loss_instance, loss_prior, lr)."""


def dreambooth_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float,
) -> dict[str, torch.Tensor]:
    """DreamBooth's loss on one batch: instance samples first, then class samples.

    Args:
        unet: The U-Net being trained (wrapped or not).
        scheduler: The training noise schedule.
        latents: Clean latents (B, 4, h, w): ``num_instance`` instance latents, then class latents.
        text_states: Text encoder states (B, 77, D) in the same order.
        timesteps: (B,) long.
        noise: (B, 4, h, w).
        num_instance: How many leading samples are instance samples.
        prior_loss_weight: Weight of the class-sample (prior preservation) term.

    Returns:
        ``loss`` (to backpropagate) = ``loss_instance + prior_loss_weight * loss_prior``, all float32 MSEs
        (``loss_prior`` is 0 when the batch has no class samples).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps).float()  # (B, 4, h, w)
    pred = unet(noisy, timesteps, text_states).sample.float()
    loss_instance = F.mse_loss(pred[:num_instance], target[:num_instance])
    if latents.shape[0] > num_instance:
        loss_prior = F.mse_loss(pred[num_instance:], target[num_instance:])
    else:
        loss_prior = torch.zeros((), device=pred.device)
    loss = loss_instance + prior_loss_weight * loss_prior
    return {"loss": loss, "loss_instance": loss_instance, "loss_prior": loss_prior}


def run_dreambooth(cfg: DreamBoothConfig, progress: bool = True) -> DreamBoothResult:
    """Runs DreamBooth and writes the result to ``cfg.output_dir``.

    Raises:
        DreamBoothError: Bad options or images (before any model is loaded), or an unsupported pipeline.
    """
    from bksdm.train.validation import image_grid

    cfg = cfg.resolved()
    instance_paths = check_config(cfg)
    out = Path(cfg.output_dir)
    accelerator, mixed = make_accelerator(out, cfg.mixed_precision, cfg.gradient_accumulation_steps)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    model_ref = teacher_or_default(cfg.model)
    pipe = load_pipeline(model_ref, device=accelerator.device)
    if getattr(pipe, "text_encoder_2", None) is not None or not isinstance(pipe, StableDiffusionPipeline):
        raise DreamBoothError(
            f"{model_ref} is a {type(pipe).__name__}; bksdm dreambooth trains SD-v1/v2 pipelines "
            "(StableDiffusionPipeline). For SDXL use diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py"
        )
    pipe.set_progress_bar_config(disable=True)
    resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sampling = _sampling_settings(model_ref, cfg)
    vae = pipe.vae
    if main:
        out.mkdir(parents=True, exist_ok=True)

    # ---- data: class images (drawn by the untouched model), then every image encoded once ----
    classes: list[tuple[Path, str]] = []  # (image, its prompt)
    if cfg.prior_preservation:
        if main:
            ensure_class_images(
                pipe,
                cfg.class_dir,
                cfg.class_prompts,
                cfg.num_class_images,
                seed=cfg.seed,
                resolution=resolution,
                batch_size=cfg.sample_batch_size,
                progress=progress,
                **sampling,
            )
        accelerator.wait_for_everyone()
        classes = class_images(cfg.class_dir, cfg.class_prompts[0], cfg.num_class_images)
    instance_bank = encode_bank(vae, load_pixels(instance_paths, resolution), cfg.random_flip)
    class_bank = (
        encode_bank(vae, load_pixels([c[0] for c in classes], resolution), cfg.random_flip) if classes else None
    )
    # Prompt rows: 0 the instance prompt, then each distinct class prompt; class image i trains with row class_rows[i].
    prompts = [cfg.instance_prompt] + sorted({c[1] for c in classes})
    class_rows = [prompts.index(c[1]) for c in classes]
    prompt_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(accelerator.device)  # (P, 77)
    text = TextEncoders.from_pipeline(pipe)
    frozen_states = None if cfg.train_text_encoder else encode_text(prompts, text, accelerator.device)[0]

    trained = _set_up_training(cfg, pipe, weight_dtype)  # the U-Net (+ text encoder), adapters added for LoRA
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    # the lr schedule is stepped by hand, once per optimizer step
    prepared = accelerator.prepare(*trained, optimizer)
    unet_t, optimizer = prepared[0], prepared[-1]
    text_t = prepared[1] if cfg.train_text_encoder else None
    for module in trained:
        module.train()

    step = 0
    checkpoint = find_checkpoint(out, cfg.resume)
    if checkpoint is not None:
        step = _resume(cfg, pipe, checkpoint, optimizer, lr_scheduler)
        logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    if main:
        (out / RUN_FILE).write_text(json.dumps({"config": dataclasses.asdict(cfg), "model": model_ref}, indent=2))

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    bs, accum, world = cfg.batch_size, cfg.gradient_accumulation_steps, accelerator.num_processes
    global_batch = bs * world
    mine = [accelerator.process_index * bs + j for j in range(bs)]  # this process's positions in the global batch
    num_timesteps = scheduler.config.num_train_timesteps
    scaling = vae.config.scaling_factor
    validation_seeds = list(range(cfg.seed, cfg.seed + len(cfg.validation_prompts)))
    grid_rows: list[tuple[str, list]] = []
    if main and cfg.validate_every and step == 0:
        before = _sample(pipe, cfg.validation_prompts, validation_seeds, resolution, sampling, trained, weight_dtype)
        grid_rows.append(("before training", before))
    metrics_file = out / "logs" / "metrics.jsonl"
    if main:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, float]] = []
    window: dict[str, float] = {}
    window_steps, tick = 0, time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="dreambooth", disable=not (main and progress))

    while step < cfg.max_steps:
        for micro in range(accum):
            m = step * accum + micro  # the micro step: keys every random choice of its samples
            with accelerator.accumulate(*[x for x in (unet_t, text_t) if x is not None]):
                latents, prompt_rows, timesteps, noise = _batch(
                    cfg,
                    m,
                    mine,
                    global_batch,
                    instance_bank,
                    class_bank,
                    class_rows,
                    num_timesteps,
                    scaling,
                    accelerator.device,
                )
                # (B, 77, D): through the text encoder when it trains, else its frozen output
                states = text_t(prompt_ids[prompt_rows])[0] if text_t is not None else frozen_states[prompt_rows]
                losses = dreambooth_loss(
                    unet_t, scheduler, latents, states, timesteps, noise, bs, cfg.prior_loss_weight
                )
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in losses.items():
                window[key] = window.get(key, 0.0) + accelerator.reduce(value.detach(), "mean").item() / accum
        lr_scheduler.step()
        step += 1
        window_steps += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = {"step": step, **{k: v / window_steps for k, v in window.items()}}
            record.update(
                lr=lr_scheduler.get_last_lr()[0],
                seconds_per_step=(time.perf_counter() - tick) / window_steps,
                peak_memory_mb=peak_memory_mb(accelerator.device),
            )
            records.append(record)
            if main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                status = (
                    f"loss={record['loss']:.4f} instance={record['loss_instance']:.4f} prior={record['loss_prior']:.4f}"
                )
                bar.set_postfix_str(status)
                logger.info(f"step {step} {status}", main_process_only=True)
            window, window_steps, tick = {}, 0, time.perf_counter()
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            write_training_checkpoint(
                accelerator,
                out,
                step,
                cfg.keep_checkpoints,
                recipe="dreambooth",
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                write_files=lambda folder: _write_model_files(cfg, pipe, folder),
                fingerprints=_fingerprints(cfg),
            )
        if main and cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.max_steps):
            images = _sample(
                pipe, cfg.validation_prompts, validation_seeds, resolution, sampling, trained, weight_dtype
            )
            shown = [*grid_rows, (f"step {step}", images)]
            (out / "validation").mkdir(exist_ok=True)
            image_grid([r[1] for r in shown], [r[0] for r in shown]).save(out / "validation" / f"step-{step:07d}.png")
            for i, image in enumerate(images):
                save_image_atomic(image, out / "validation" / f"step-{step:07d}-{i}.png")

    bar.close()
    accelerator.wait_for_everyone()
    lora_file = None
    if main:
        lora_file = _save_output(cfg, pipe, out)
        summary = {"config": dataclasses.asdict(cfg), "model": model_ref, "steps": step, "resolution": resolution}
        if lora_file is not None:
            summary["lora_file_bytes"] = lora_file.stat().st_size
        summary["last_losses"] = records[-1] if records else None
        (out / RUN_FILE).write_text(json.dumps(summary, indent=2))
        logger.info(f"written to {lora_file or out}", main_process_only=True)
    accelerator.end_training()
    return DreamBoothResult(out, lora_file, step, records)


# ------------------------------------------------------------------------------------------------ helpers


def _fingerprints(cfg: DreamBoothConfig) -> dict[str, Any]:
    """What a checkpoint's weights depend on: a LoRA checkpoint does not resume full fine-tuning, nor the reverse."""
    return {"lora": cfg.lora, "train_text_encoder": cfg.train_text_encoder}


def _resume(cfg: DreamBoothConfig, pipe, checkpoint: Path, optimizer, lr_scheduler) -> int:
    """Loads a checkpoint written by this recipe (weights, optimizer, schedule); returns its step."""
    state = read_checkpoint(checkpoint, "dreambooth", _fingerprints(cfg))
    if cfg.lora:
        load_lora(checkpoint / LORA_FILE, pipe.unet, pipe.text_encoder if cfg.train_text_encoder else None)
    else:
        load_module(pipe.unet, read_weights(checkpoint / "unet", "diffusion_pytorch_model"), "U-Net")
        if cfg.train_text_encoder:
            load_module(pipe.text_encoder, read_weights(checkpoint / "text_encoder", "model"), "text encoder")
    restore_training_state(checkpoint, state, optimizer, lr_scheduler)
    return int(state["step"])


def _sampling_settings(model_ref: str, cfg: DreamBoothConfig) -> dict[str, Any]:
    """Steps and guidance for class and validation images: the options, else the model's recommendation."""
    from bksdm.world.teacher import SETTINGS_FILE, recommended_settings

    steps, guidance = 25, 7.5
    if (Path(model_ref) / SETTINGS_FILE).is_file():  # the bundled shapes teacher records what it was validated with
        recommended = recommended_settings(model_ref)
        steps, guidance = recommended["num_inference_steps"], recommended["guidance_scale"]
    return {
        "steps": cfg.sample_steps if cfg.sample_steps is not None else steps,
        "guidance_scale": cfg.guidance_scale if cfg.guidance_scale is not None else guidance,
    }


def _set_up_training(cfg: DreamBoothConfig, pipe, weight_dtype: torch.dtype) -> list[torch.nn.Module]:
    """Freezes what does not train, adds the LoRA adapters, and returns the modules that train.

    Frozen weights run in ``weight_dtype`` (the mixed-precision dtype); trainable ones stay in fp32.
    """
    unet, text_encoder = pipe.unet, pipe.text_encoder
    pipe.vae.requires_grad_(False)
    pipe.vae.to(dtype=vae_dtype(pipe.vae, weight_dtype))  # fp32 where fp16 would overflow
    unet.requires_grad_(not cfg.lora)
    text_encoder.requires_grad_(cfg.train_text_encoder and not cfg.lora)
    if cfg.lora:
        unet.to(dtype=weight_dtype)
        unet.add_adapter(lora_config(cfg.rank, cfg.lora_alpha, UNET_LORA_TARGETS))
        if cfg.train_text_encoder:
            text_encoder.to(dtype=weight_dtype)
            text_encoder.add_adapter(lora_config(cfg.rank, cfg.lora_alpha, TEXT_LORA_TARGETS))
    if not cfg.train_text_encoder:
        text_encoder.to(dtype=weight_dtype)
    trained = [unet] + ([text_encoder] if cfg.train_text_encoder else [])
    for module in trained:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    return trained


def _optimizer(cfg: DreamBoothConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    adam = torch.optim.AdamW
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb  # optional: pip install bitsandbytes

        adam = bnb.optim.AdamW8bit
    return adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.adam_weight_decay, eps=1e-8)


def _batch(
    cfg: DreamBoothConfig,
    micro_step: int,
    positions: Sequence[int],
    global_batch: int,
    instance: LatentBank,
    classes: LatentBank | None,
    class_rows: Sequence[int],
    num_timesteps: int,
    scaling_factor: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro batch of this process: latents, prompt rows (0 instance, ``class_rows[i]`` class image i),
    timesteps and noise.

    Class samples take the positions after the instance samples' (``global_batch + p``), so their flips and
    noise come from generators of their own.
    """
    groups = [(instance, list(positions), 0)]
    if classes is not None:
        groups.append((classes, [global_batch + p for p in positions], 1))
    latents, rows, timesteps, noise = [], [], [], []
    for bank, where, stream in groups:
        indices = [pick(cfg.seed, stream, len(bank), micro_step, p % global_batch, global_batch) for p in where]
        flips = [cfg.random_flip and flip_of(cfg.seed, micro_step, p) for p in where]
        mean, std = bank.take(indices, flips)  # (b, 4, h, w) each
        t, n, eps = draw_noise(cfg.seed, micro_step, where, tuple(mean.shape[1:]), num_timesteps, "cpu")
        latents.append(sample_latents(mean, std, eps, scaling_factor))
        rows += [0] * len(where) if stream == 0 else [class_rows[i] for i in indices]
        timesteps.append(t)
        noise.append(n)
    return (
        torch.cat(latents).to(device),  # (B, 4, h, w)
        torch.tensor(rows, device=device),  # (B,)
        torch.cat(timesteps).to(device),  # (B,)
        torch.cat(noise).to(device),  # (B, 4, h, w)
    )


@torch.no_grad()
def _sample(
    pipe, prompts, seeds, resolution: int, sampling: dict[str, Any], trained: Sequence, dtype: torch.dtype
) -> list:
    """Validation images with the current weights (modules in eval mode meanwhile).

    Under mixed precision the frozen parts are in ``dtype`` and the trained ones in fp32: autocast lets them meet.
    """
    from bksdm.eval.generate import generate_images

    modes = [m.training for m in trained]
    for module in trained:
        module.eval()
    try:
        with torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return generate_images(pipe, prompts, seeds, height=resolution, width=resolution, **sampling)
    finally:
        for module, mode in zip(trained, modes, strict=True):
            module.train(mode)


def _write_model_files(cfg: DreamBoothConfig, pipe, folder: Path) -> None:
    """What a checkpoint holds besides accelerate's state: the weights in diffusers format and the settings."""
    if cfg.lora:
        save_lora(folder, pipe.unet, pipe.text_encoder if cfg.train_text_encoder else None)
    else:
        pipe.unet.save_pretrained(folder / "unet")
        if cfg.train_text_encoder:
            pipe.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / RUN_FILE).write_text(json.dumps({"config": dataclasses.asdict(cfg)}, indent=2))


def _save_output(cfg: DreamBoothConfig, pipe, out: Path) -> Path | None:
    """The final result, written so that a crash never leaves something that looks complete.

    LoRA: the adapter file is written aside and moved into place. Full: the pipeline is saved aside in fp32,
    ``model_index.json`` is removed first and moved in last, so ``from_pretrained(out)`` only ever sees a
    complete pipeline.
    """
    partial = out / ".output.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    if cfg.lora:
        file = save_lora(partial, pipe.unet, pipe.text_encoder if cfg.train_text_encoder else None)
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
