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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from bksdm.artifacts import write_text
from bksdm.loading import load_pipeline, teacher_or_default
from bksdm.train.checkpoints import find_checkpoint, write_checkpoint
from bksdm.train.encoders import TextEncoders, encode_text, sample_latents
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
)
from bksdm.use.dreambooth.validation import ValidationRow, sample_images, sampling_settings, write_validation
from bksdm.use.dreambooth.weights import (
    RECIPE,
    fingerprints,
    make_optimizer,
    resume_weights,
    save_output,
    set_up_training,
    write_model_files,
)
from bksdm.use.lora import LORA_FILE

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
    sampling = sampling_settings(model_ref, cfg.sample_steps, cfg.guidance_scale)
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

    trained = set_up_training(cfg, pipe, weight_dtype)  # the U-Net (+ text encoder), adapters added for LoRA
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
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
        step = resume_weights(cfg, pipe, checkpoint, optimizer, lr_scheduler)
        logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    if main:
        write_text(out / RUN_FILE, json.dumps({"config": dataclasses.asdict(cfg), "model": model_ref}, indent=2))

    def write_files(folder: Path) -> None:  # a checkpoint's weights and the settings that made them
        write_model_files(cfg, pipe, folder)
        write_text(folder / RUN_FILE, json.dumps({"config": dataclasses.asdict(cfg)}, indent=2))

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    bs, accum, world = cfg.batch_size, cfg.gradient_accumulation_steps, accelerator.num_processes
    global_batch = bs * world
    mine = [accelerator.process_index * bs + j for j in range(bs)]  # this process's positions in the global batch
    num_timesteps = scheduler.config.num_train_timesteps
    scaling = vae.config.scaling_factor
    validation_seeds = list(range(cfg.seed, cfg.seed + len(cfg.validation_prompts)))
    grid_rows: list[ValidationRow] = []
    if main and cfg.validate_every and step == 0:
        before = sample_images(
            pipe, cfg.validation_prompts, validation_seeds, resolution, sampling, trained, weight_dtype
        )
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
            write_checkpoint(
                accelerator,
                out,
                step,
                cfg.keep_checkpoints,
                recipe=RECIPE,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                write_files=write_files,
                fingerprints=fingerprints(cfg),
            )
        if main and cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.max_steps):
            images = sample_images(
                pipe, cfg.validation_prompts, validation_seeds, resolution, sampling, trained, weight_dtype
            )
            write_validation(out / "validation", step, images, grid_rows)

    bar.close()
    accelerator.wait_for_everyone()
    lora_file = None
    if main:
        lora_file = save_output(cfg, pipe, out)
        summary = {"config": dataclasses.asdict(cfg), "model": model_ref, "steps": step, "resolution": resolution}
        if lora_file is not None:
            summary["lora_file_bytes"] = lora_file.stat().st_size
        summary["last_losses"] = records[-1] if records else None
        write_text(out / RUN_FILE, json.dumps(summary, indent=2))
        logger.info(f"written to {lora_file or out}", main_process_only=True)
    accelerator.end_training()
    return DreamBoothResult(out, lora_file, step, records)


# ------------------------------------------------------------------------------------------------ helpers


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
