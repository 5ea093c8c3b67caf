"""DreamBooth (Ruiz et al., CVPR 2023) on any SD-v1/v2 pipeline, bksdm students included: full or LoRA.

The BK-SDM paper personalises its compact models with DreamBooth (REFERENCE.md, "Downstream"): per subject
4-6 images bound to a rare identifier ("a sks dog"), prior preservation with 200 class images drawn by the
model itself (weight 1.0), the text encoder trained too, lr 1e-6, batch 1, 800 steps, 512 px; and a LoRA
variant of rank 16 at lr 1e-4. Those are the defaults here.

The objective is the model's own diffusion loss on the instance images with the instance prompt, plus
``prior.loss_weight`` times the same loss on class images with the class prompt (:func:`dreambooth_loss`).
Full fine-tuning writes a complete pipeline folder (``StableDiffusionPipeline.from_pretrained(OUT)``); LoRA
(peft, on the U-Net's attention projections and optionally the text encoder's) writes a small
``pytorch_lora_weights.safetensors`` in diffusers' format (``pipe.load_lora_weights(OUT)``).

As in ``bksdm distill`` (the shared runtime of :mod:`bksdm.train`): typed settings from YAML, overrides and flags
(:mod:`bksdm.use.dreambooth.config`), accelerate (1 to N devices, mixed precision), atomic rotated checkpoints
holding the resolved ``config.yaml``, ``--resume``, a SIGTERM stop with a checkpoint, ``logs/metrics.jsonl``, and
validation images on fixed prompts and seeds. Every random choice
of a training sample (which image, its flip, timestep and noise) is keyed by (seed, micro step, position in
the global batch), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

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
from bksdm.threads import governed_threads
from bksdm.train.checkpoints import find_checkpoint, trim_metrics, write_checkpoint
from bksdm.train.encoders import TextEncoders, encode_text, sample_latents
from bksdm.train.kd import diffusion_target, draw_noise
from bksdm.train.runtime import LossWindow, TrainingStopped, make_accelerator, peak_memory_mb, stop_on_sigterm
from bksdm.train.settings import save_settings
from bksdm.use.dreambooth.checks import check_config
from bksdm.use.dreambooth.config import (
    CONFIG_FILE,
    RUN_FILE,
    SCHEMA,
    DreamBoothConfig,
    DreamBoothError,
    flat_record,
)
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

LOSS_TERMS = ("loss", "loss_instance", "loss_prior")
"""The terms :func:`dreambooth_loss` returns, as logged."""


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
    """Runs DreamBooth and writes the result to ``cfg.train.output_dir``.

    SIGTERM (preemption, ``kill``) ends the run at the end of the optimizer step in progress (several processes: at
    the next log step, where they vote), with a checkpoint of that step: ``train.resume=latest`` then ends with
    exactly the weights of an uninterrupted run.

    Raises:
        DreamBoothError: Bad settings or images (before any model is loaded), or an unsupported pipeline.
        TrainingStopped: SIGTERM arrived; the checkpoint it names was written.
    """
    cfg = cfg.resolved()
    instance_paths = check_config(cfg)
    t, o = cfg.train, cfg.optim
    out = Path(t.output_dir)
    accelerator, mixed = make_accelerator(out, t.mixed_precision, t.gradient_accumulation_steps)
    main = accelerator.is_main_process
    set_seed(t.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    model_ref = teacher_or_default(cfg.model.pipeline)
    pipe = load_pipeline(model_ref, device=accelerator.device)
    if getattr(pipe, "text_encoder_2", None) is not None or not isinstance(pipe, StableDiffusionPipeline):
        raise DreamBoothError(
            f"{model_ref} is a {type(pipe).__name__}; bksdm dreambooth trains SD-v1/v2 pipelines "
            "(StableDiffusionPipeline). For SDXL use diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py"
        )
    pipe.set_progress_bar_config(disable=True)
    resolution = cfg.data.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sampling = sampling_settings(model_ref, t.validation_steps, t.validation_guidance)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    data = _training_data(cfg, pipe, accelerator, instance_paths, resolution, sampling, progress)
    frozen_states = (
        None if cfg.model.train_text_encoder else encode_text(data.prompts, data.text, accelerator.device)[0]
    )

    trained = set_up_training(cfg, pipe, weight_dtype)  # the U-Net (+ text encoder), adapters added for LoRA
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps, num_training_steps=t.max_steps
    )
    # the lr schedule is stepped by hand, once per optimizer step
    prepared = accelerator.prepare(*trained, optimizer)
    unet_t, optimizer = prepared[0], prepared[-1]
    text_t = prepared[1] if cfg.model.train_text_encoder else None
    for module in trained:
        module.train()

    step = 0
    checkpoint = find_checkpoint(out, t.resume)
    if checkpoint is not None:
        step = resume_weights(cfg, pipe, checkpoint, optimizer, lr_scheduler)
        logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    metrics_file = out / "logs" / "metrics.jsonl"
    if main:
        trim_metrics(metrics_file, step)  # records after the checkpoint are written again
        save_settings(SCHEMA, cfg, out / CONFIG_FILE)
        write_text(out / RUN_FILE, json.dumps({"config": flat_record(cfg), "model": model_ref}, indent=2))
        metrics_file.parent.mkdir(parents=True, exist_ok=True)

    def write_files(folder: Path) -> None:  # a checkpoint's weights and the settings that made them
        write_model_files(cfg, pipe, folder)
        save_settings(SCHEMA, cfg, folder / CONFIG_FILE)
        write_text(folder / RUN_FILE, json.dumps({"config": flat_record(cfg)}, indent=2))

    def save(step: int) -> Path:
        return write_checkpoint(
            accelerator,
            out,
            step,
            t.keep_checkpoints,
            recipe=RECIPE,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            write_files=write_files,
            fingerprints=fingerprints(cfg),
        )

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    bs, accum = t.batch_size, t.gradient_accumulation_steps
    global_batch = bs * accelerator.num_processes
    mine = [accelerator.process_index * bs + j for j in range(bs)]  # this process's positions in the global batch
    validation_seeds = list(range(t.seed, t.seed + len(t.validation_prompts)))
    grid_rows: list[ValidationRow] = []
    if main and t.validate_every and step == 0:
        before = sample_images(
            pipe, t.validation_prompts, validation_seeds, resolution, sampling, trained, weight_dtype
        )
        grid_rows.append(("before training", before))
    records: list[dict[str, float]] = []
    window, tick = LossWindow(accum), time.perf_counter()
    bar = tqdm(total=t.max_steps, initial=step, desc="dreambooth", disable=not (main and progress))

    with stop_on_sigterm() as stop, governed_threads(accelerator.device) as threads:
        while step < t.max_steps:
            for micro in range(accum):
                m = step * accum + micro  # the micro step: keys every random choice of its samples
                with accelerator.accumulate(*[x for x in (unet_t, text_t) if x is not None]):
                    latents, prompt_rows, timesteps, noise = _batch(
                        cfg, m, mine, global_batch, data, scheduler.config.num_train_timesteps, accelerator.device
                    )
                    # (B, 77, D): through the text encoder when it trains, else its frozen output
                    states = (
                        text_t(data.prompt_ids[prompt_rows])[0] if text_t is not None else frozen_states[prompt_rows]
                    )
                    losses = dreambooth_loss(
                        unet_t, scheduler, latents, states, timesteps, noise, bs, cfg.prior.loss_weight
                    )
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and o.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, o.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.add(losses)
            # ---- one optimizer step is complete ----
            lr_scheduler.step()
            step += 1
            window.step_done()
            if threads is not None:
                threads.tick()
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                steps = window.steps
                record = {"step": step, **window.flush(accelerator, stop)}  # the one synchronisation of the window
                record.update(
                    lr=lr_scheduler.get_last_lr()[0],
                    seconds_per_step=(time.perf_counter() - tick) / steps,
                    peak_memory_mb=peak_memory_mb(accelerator.device),
                )
                records.append(record)
                if main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    status = " ".join(f"{k.removeprefix('loss_')}={record[k]:.4f}" for k in LOSS_TERMS)
                    bar.set_postfix_str(status)
                    logger.info(f"step {step} {status}", main_process_only=True)
                tick = time.perf_counter()
            saved = None
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
                saved = save(step)
            if main and t.validate_every and (step % t.validate_every == 0 or step == t.max_steps):
                images = sample_images(
                    pipe, t.validation_prompts, validation_seeds, resolution, sampling, trained, weight_dtype
                )
                write_validation(out / "validation", step, images, grid_rows)
            if step < t.max_steps and stop.requested(accelerator):
                saved = saved or save(step)
                bar.close()
                accelerator.end_training()
                raise TrainingStopped(step, saved)

    bar.close()
    accelerator.wait_for_everyone()
    lora_file = None
    if main:
        lora_file = save_output(cfg, pipe, out)
        summary = {"config": flat_record(cfg), "model": model_ref, "steps": step, "resolution": resolution}
        if lora_file is not None:
            summary["lora_file_bytes"] = lora_file.stat().st_size
        summary["last_losses"] = records[-1] if records else None
        write_text(out / RUN_FILE, json.dumps(summary, indent=2))
        logger.info(f"written to {lora_file or out}", main_process_only=True)
    accelerator.end_training()
    return DreamBoothResult(out, lora_file, step, records)


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class TrainingData:
    """Every image of the run encoded once, and the prompts they train with."""

    instance: LatentBank
    """The subject's images."""
    classes: LatentBank | None
    """The class images (prior preservation), else None."""
    prompts: list[str]
    """Row 0 the instance prompt, then each distinct class prompt."""
    class_rows: list[int]
    """The prompt row of each class image."""
    prompt_ids: torch.Tensor
    """The prompts' token ids (P, 77), on the device."""
    text: TextEncoders
    """The pipeline's text encoder."""
    scaling_factor: float
    """The VAE's latent scaling factor."""


def _training_data(
    cfg: DreamBoothConfig,
    pipe,
    accelerator,
    instance_paths: list[Path],
    resolution: int,
    sampling: dict,
    progress: bool,
) -> TrainingData:
    """Class images (drawn by the untouched model, missing ones only), then every image encoded once."""
    p, seed = cfg.prior, cfg.train.seed
    classes: list[tuple[Path, str]] = []  # (image, its prompt)
    if p.enabled:
        if accelerator.is_main_process:
            ensure_class_images(
                pipe,
                p.class_dir,
                p.class_prompts,
                p.num_class_images,
                seed=seed,
                resolution=resolution,
                batch_size=p.sample_batch_size,
                progress=progress,
                **sampling,
            )
        accelerator.wait_for_everyone()
        classes = class_images(p.class_dir, p.class_prompts[0], p.num_class_images)
    flip = cfg.data.random_flip
    instance_bank = encode_bank(pipe.vae, load_pixels(instance_paths, resolution), flip)
    class_bank = encode_bank(pipe.vae, load_pixels([c[0] for c in classes], resolution), flip) if classes else None
    prompts = [cfg.data.instance_prompt] + sorted({c[1] for c in classes})
    prompt_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(accelerator.device)  # (P, 77)
    return TrainingData(
        instance=instance_bank,
        classes=class_bank,
        prompts=prompts,
        class_rows=[prompts.index(c[1]) for c in classes],
        prompt_ids=prompt_ids,
        text=TextEncoders.from_pipeline(pipe),
        scaling_factor=pipe.vae.config.scaling_factor,
    )


def _batch(
    cfg: DreamBoothConfig,
    micro_step: int,
    positions: Sequence[int],
    global_batch: int,
    data: TrainingData,
    num_timesteps: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro batch of this process: latents, prompt rows (0 instance, ``data.class_rows[i]`` class image i),
    timesteps and noise.

    Class samples take the positions after the instance samples' (``global_batch + p``), so their flips and
    noise come from generators of their own.
    """
    seed = cfg.train.seed
    groups = [(data.instance, list(positions), 0)]
    if data.classes is not None:
        groups.append((data.classes, [global_batch + p for p in positions], 1))
    latents, rows, timesteps, noise = [], [], [], []
    for bank, where, stream in groups:
        indices = [pick(seed, stream, len(bank), micro_step, p % global_batch, global_batch) for p in where]
        flips = [cfg.data.random_flip and flip_of(seed, micro_step, p) for p in where]
        mean, std = bank.take(indices, flips)  # (b, 4, h, w) each
        t, n, eps = draw_noise(seed, micro_step, where, tuple(mean.shape[1:]), num_timesteps, "cpu")
        latents.append(sample_latents(mean, std, eps, data.scaling_factor))
        rows += [0] * len(where) if stream == 0 else [data.class_rows[i] for i in indices]
        timesteps.append(t)
        noise.append(n)
    return (
        torch.cat(latents).to(device),  # (B, 4, h, w)
        torch.tensor(rows, device=device),  # (B,)
        torch.cat(timesteps).to(device),  # (B,)
        torch.cat(noise).to(device),  # (B, 4, h, w)
    )
