"""``bksdm lcm``: latent consistency distillation of a U-Net pipeline into a few-step student (LCM, arXiv 2310.04378).

All side effects live here: loading, accelerate, files, logging; the objective is
:func:`bksdm.train.lcm_step.lcm_step`. The runtime is ``bksdm distill``'s (:mod:`bksdm.train.runtime`,
:mod:`bksdm.train.checkpoints`, :mod:`bksdm.train.batches`): accelerate, safetensors checkpoints without pickles,
``train.resume=latest``, SIGTERM stop with a checkpoint, the data stream or a ``bksdm cache`` folder,
``logs/metrics.jsonl``. Micro step ``m`` always draws the same solver steps, noise and guidance scales for the same
samples (:mod:`bksdm.seeding`), so a resumed run takes the steps of an uninterrupted one.

The pipeline's own U-Net is the frozen ODE-solver teacher and the student's start. ``model.mode``:

- ``full``: the student is the teacher's U-Net with a guidance embedding (``time_cond_proj_dim``; its new
  projection starts at zero, so the untrained student equals the teacher); ``student/`` is a whole pipeline with
  ``LCMScheduler`` that stock ``StableDiffusionPipeline`` loads and samples in 1-8 steps;
- ``lora``: the student is the teacher's U-Net with LoRA adapters (peft); ``student/`` is the unchanged pipeline
  with ``LCMScheduler`` plus ``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights`` takes.

The target network is an EMA of the student's trained weights (``lcm.ema_decay``), evaluated on the student's own
module (:func:`torch.func.functional_call`), so it costs one copy of the trained weights and no second model. The
final weights are the target's, as consistency models are sampled.

What is distilled and how the student starts: :mod:`bksdm.train.lcm_models` (U-Net pipelines only).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import LCMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bksdm.artifacts import MODEL_RECORD_FILE, atomic_dir
from bksdm.devices import parse_dtype
from bksdm.eval.generate import generate_images
from bksdm.loading import PLAN_FILE, load_pipeline, teacher_or_default
from bksdm.sampling import sampling_defaults
from bksdm.threads import governed_threads
from bksdm.train.batches import batch_stream
from bksdm.train.checkpoints import (
    CheckpointError,
    claim_output,
    find_checkpoint,
    load_module,
    read_checkpoint,
    read_weights,
    remove_entries,
    restore_training_state,
    trim_metrics,
    write_checkpoint,
)
from bksdm.train.cpu_kernels import kernel_checkpointing
from bksdm.train.distill import WEIGHTS, TrainingSetupError, make_optimizer, save_ema_weights
from bksdm.train.encoders import sample_latents
from bksdm.train.kd import draw_noise, ema_update
from bksdm.train.lcm_config import LcmConfig, lcm_config_to_dict, save_lcm_config
from bksdm.train.lcm_models import LcmModels, check_teacher, load_lcm_models
from bksdm.train.lcm_step import draw_guidance, lcm_step
from bksdm.train.runtime import (
    LossWindow,
    TrainingStopped,
    make_accelerator,
    peak_memory_mb,
    stop_on_sigterm,
    tracker_config,
)
from bksdm.train.validation import image_grid
from bksdm.use.lora import LORA_FILE, load_lora, save_lora

logger = get_logger(__name__)

__all__ = ["LCM_STEPS", "lcm", "lcm_scheduler", "save_student", "validate"]

RUN_ENTRIES = ("config.yaml", "student", "validation")  # an LCM run's own entries in its folder
EMA_LORA_FILE = "lora_ema.safetensors"  # a LoRA run's target adapters in a checkpoint, by parameter name
LCM_STEPS = 4
"""The step count an LCM student's folder records as its default (LCM's 4-step setting)."""


def _fingerprints(cfg: LcmConfig) -> dict[str, Any]:
    m = cfg.model
    if m.mode == "full":
        return {"mode": "full", "time_cond_proj_dim": m.time_cond_proj_dim}
    return {"mode": "lora", "lora_rank": m.lora_rank, "lora_alpha": m.lora_alpha, "lora_targets": m.lora_targets}


def save_checkpoint(accelerator, cfg: LcmConfig, models: LcmModels, ema: EMAModel, step: int, out: Path, opt, sched):
    """A resumable checkpoint: full: ``unet/`` (online student) and ``unet_ema/`` (target), stock diffusers folders;
    lora: ``pytorch_lora_weights.safetensors`` (online adapters) and ``lora_ema.safetensors`` (target adapters)."""
    student = accelerator.unwrap_model(models.student)

    def write_files(folder: Path) -> None:
        if cfg.model.mode == "full":
            student.save_pretrained(folder / "unet")
            save_ema_weights(ema, student, folder / "unet_ema")
        else:
            save_lora(folder, student)
            shadow = {n: p.detach().contiguous() for n, p in zip(models.names, ema.shadow_params, strict=True)}
            save_file(shadow, str(folder / EMA_LORA_FILE))
        save_lcm_config(cfg, folder / "config.yaml")

    ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    return write_checkpoint(
        accelerator,
        out,
        step,
        cfg.train.keep_checkpoints,
        recipe="lcm",
        optimizer=opt,
        lr_scheduler=sched,
        write_files=write_files,
        fingerprints=_fingerprints(cfg),
        extra={"ema": ema_state},
    )


def resume_from(accelerator, cfg: LcmConfig, checkpoint: Path, models: LcmModels, ema: EMAModel, opt, sched) -> int:
    """Loads a checkpoint of :func:`save_checkpoint` into this run; returns its step.

    Raises:
        CheckpointError: not an LCM checkpoint, or made for another mode or student.
    """
    state = read_checkpoint(checkpoint, "lcm", _fingerprints(cfg))
    student = accelerator.unwrap_model(models.student)
    if cfg.model.mode == "full":
        load_module(student, read_weights(checkpoint / "unet", WEIGHTS), "student U-Net")
        stored = read_weights(checkpoint / "unet_ema", WEIGHTS)
    else:
        load_lora(checkpoint / LORA_FILE, student)
        stored = read_weights(checkpoint, Path(EMA_LORA_FILE).stem)
    if set(models.names) - set(stored):
        raise CheckpointError(f"checkpoint {checkpoint}: its target network lacks some of the student's weights")
    shadow = [stored[n].to(p.device, p.dtype) for n, p in zip(models.names, ema.shadow_params, strict=True)]
    ema.load_state_dict({**state["extra"]["ema"], "shadow_params": shadow})
    restore_training_state(checkpoint, state, opt, sched)
    return int(state["step"])


def _guidance(cfg: LcmConfig, ref: str) -> float:
    """The guidance scale a full student is drawn at: ``train.validation_guidance``, else the pipeline's own."""
    g = cfg.train.validation_guidance
    return g if g is not None else sampling_defaults(ref).guidance_scale


def lcm_scheduler(cfg: LcmConfig, config) -> LCMScheduler:
    """``LCMScheduler`` on the teacher's schedule, sampling on the solver's grid with its boundary scalings."""
    kwargs = {"original_inference_steps": cfg.lcm.num_ddim_timesteps, "timestep_scaling": cfg.lcm.timestep_scaling}
    return LCMScheduler.from_config({k: v for k, v in config.items() if k != "skip_prk_steps"}, **kwargs)


@torch.no_grad()
def validate(cfg: LcmConfig, models: LcmModels, student, ema: EMAModel, step: int, out: Path, cache: dict) -> Path:
    """Writes ``validation/step-NNNNNNN.png``: the teacher at its own steps, then the target network at each of
    ``train.validation_steps`` with ``LCMScheduler``, the same prompts and seeds."""
    import inspect

    t, base = cfg.train, models.pipe
    guidance = _guidance(cfg, models.ref)
    trained = [p for p in student.parameters() if p.requires_grad]

    def draw(unet, scheduler, steps: int, scale: float) -> list:
        kwargs = {**base.components, "unet": unet, "scheduler": scheduler}
        if "requires_safety_checker" in inspect.signature(type(base).__init__).parameters:
            kwargs["requires_safety_checker"] = False
        pipe, dtype, size = type(base)(**kwargs), models.teacher.dtype, cfg.data.resolution
        pipe.set_progress_bar_config(disable=True)
        seeds = [t.validation_seed + i for i in range(len(t.validation_prompts))]
        with torch.autocast(unet.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return generate_images(
                pipe, t.validation_prompts, seeds, steps=steps, guidance_scale=scale, height=size, width=size
            )

    if "teacher" not in cache:  # drawn once
        cache["teacher"] = draw(models.teacher, base.scheduler, sampling_defaults(models.ref).steps, guidance)
    rows, labels = [cache["teacher"]], ["teacher"]
    was_training = student.training
    ema.store(trained)
    ema.copy_to(trained)  # the target network's weights
    student.eval()
    try:
        scale = guidance if cfg.model.mode == "full" else 1.0
        for n in t.validation_steps:
            rows.append(draw(student, lcm_scheduler(cfg, base.scheduler.config), n, scale))
            labels.append(f"LCM, {n} step{'s' if n > 1 else ''}")
    finally:
        ema.restore(trained)
        student.train(was_training)
    folder = out / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.png"
    image_grid(rows, labels).save(path)
    return path


def save_student(cfg: LcmConfig, models: LcmModels, student, ema: EMAModel, out: Path) -> Path:
    """The final ``student/``: the pipeline as loaded from its source (exact weights, fp32) with ``LCMScheduler``;
    full: with the target U-Net; lora: plus the target adapters (``pytorch_lora_weights.safetensors``). Its
    ``bksdm_toy.json`` records 4 steps and the guidance to sample with, which ``bksdm generate`` then defaults to."""
    ema.copy_to([p for p in student.parameters() if p.requires_grad])
    student = student.to(torch.float32) if cfg.model.mode == "full" else student
    pipe = load_pipeline(models.ref, **({"unet": student} if cfg.model.mode == "full" else {}))
    pipe.scheduler = lcm_scheduler(cfg, pipe.scheduler.config)
    source = Path(models.ref)
    defaults = sampling_defaults(models.ref)
    record = {
        "sampling": {
            "num_inference_steps": LCM_STEPS,
            "guidance_scale": _guidance(cfg, models.ref) if cfg.model.mode == "full" else 1.0,
            "scheduler": "LCMScheduler",
            "height": defaults.height,
            "width": defaults.width,
        },
        "lcm": {"source": models.ref, "mode": cfg.model.mode, "settings": lcm_config_to_dict(cfg)["lcm"]},
    }
    target = out / "student"
    with atomic_dir(target) as partial:
        pipe.save_pretrained(partial, safe_serialization=True)
        if cfg.model.mode == "lora":
            save_lora(partial, student)
        if (source / PLAN_FILE).is_file():
            shutil.copy(source / PLAN_FILE, partial / PLAN_FILE)
        (partial / MODEL_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


def lcm(cfg: LcmConfig) -> Path:
    """Runs the recipe and returns the folder of the final ``student/`` pipeline."""
    out = Path(cfg.train.output_dir)
    check_teacher(teacher_or_default(cfg.model.teacher))  # a transformer or SDXL fails before anything else
    checkpoint = find_checkpoint(out, cfg.train.resume)
    stale = claim_output(out, resume=cfg.train.resume, overwrite=cfg.train.overwrite, markers=RUN_ENTRIES)
    t, o = cfg.train, cfg.optim
    accelerator, mixed = make_accelerator(out, t.mixed_precision, t.gradient_accumulation_steps, t.trackers)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise TrainingSetupError("bksdm's checkpoints do not gather sharded states; run lcm with DDP (--multi_gpu)")
    set_seed(t.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    if t.teacher_dtype != "auto":
        weight_dtype = parse_dtype(t.teacher_dtype)
    models = load_lcm_models(cfg, accelerator.device, weight_dtype)
    if accelerator.is_main_process:
        remove_entries(stale)  # train.overwrite=true: the earlier run's checkpoints and logs
    accelerator.wait_for_everyone()
    if t.gradient_checkpointing:
        models.student.enable_gradient_checkpointing(kernel_checkpointing(accelerator.device))
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    trained = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = make_optimizer(trained, o, o.resolved_lr(cfg.model.mode))
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps, num_training_steps=t.max_steps
    )
    # A constant EMA rate from the first step, as LCM's target network (EMAModel's default warms its decay up from 0).
    decay = cfg.lcm.ema_decay
    ema = EMAModel(trained, decay=decay, min_decay=decay, update_after_step=-1)
    ema.to(accelerator.device)
    models.student, optimizer = accelerator.prepare(models.student, optimizer)

    step = 0
    if checkpoint is not None:
        step = resume_from(accelerator, cfg, checkpoint, models, ema, optimizer, lr_scheduler)
        logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    target = dict(zip(models.names, ema.shadow_params, strict=True))  # the target network's tensors, updated in place
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / "logs" / "metrics.jsonl", step)  # records after the checkpoint are written again
        save_lcm_config(cfg, out / "config.yaml")
        accelerator.init_trackers("bksdm-lcm", config=tracker_config(lcm_config_to_dict(cfg)))
    accum = t.gradient_accumulation_steps
    batches = batch_stream(cfg, models, accelerator, start_micro_step=step * accum)
    metrics_file = (out / "logs" / "metrics.jsonl") if accelerator.is_main_process else None
    if metrics_file:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
    validated: dict = {}  # the teacher's validation row, drawn once
    bar = tqdm(total=t.max_steps, initial=step, desc="lcm", disable=not accelerator.is_main_process)
    window = LossWindow(accum)
    samples, tick = 0, time.perf_counter()
    solver_steps = cfg.lcm.num_ddim_timesteps
    lo, hi = cfg.lcm.guidance_min, cfg.lcm.guidance_max

    with stop_on_sigterm() as stop, governed_threads(accelerator.device) as threads:
        while step < t.max_steps:
            batch = next(batches)  # one micro batch of this process
            with accelerator.accumulate(models.student):
                shape = tuple(batch["mean"].shape[1:])  # (C, h, w)
                # draw_noise's "timesteps" are solver indices n, uniform on [0, N): its integers below N.
                index, noise, eps = draw_noise(
                    t.seed, batch["micro_step"], batch["positions"], shape, solver_steps, accelerator.device
                )
                guidance = draw_guidance(t.seed, batch["micro_step"], batch["positions"], lo, hi)  # (B,)
                vae = models.pipe.vae.config
                latents = sample_latents(batch["mean"], batch["std"], eps, vae.scaling_factor)  # (B, C, h, w)
                with accelerator.autocast():
                    losses = lcm_step(
                        models.student, models.teacher, target, models.objective,
                        latents, batch["text"], models.uncond, index, noise, guidance,
                    )  # fmt: skip
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and o.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trained, o.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(losses, skipped=batch["skipped"])
            samples += batch["mean"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step is complete ----
            lr_scheduler.step()
            step += 1
            window.step_done()
            if threads is not None:
                threads.tick()
            ema_update(ema, trained)  # the target network: a constant-rate EMA of the student
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                record = {
                    "step": step,
                    **window.flush(accelerator, stop),  # the window's one synchronisation across processes
                    "lr": lr_scheduler.get_last_lr()[0],
                    "samples_per_s": samples / (time.perf_counter() - tick),
                    "peak_memory_mb": peak_memory_mb(accelerator.device),
                    "skipped_samples": window.skipped_total,
                }
                accelerator.log(record, step=step)
                if metrics_file:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    status = f"step {step} loss={record['loss']:.5f} lr={record['lr']:.2e}"
                    bar.set_postfix_str(status)
                    logger.info(status, main_process_only=True)
                samples, tick = 0, time.perf_counter()
            saved = None
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
                saved = save_checkpoint(accelerator, cfg, models, ema, step, out, optimizer, lr_scheduler)
            if (
                accelerator.is_main_process
                and t.validate_every
                and (step % t.validate_every == 0 or step == t.max_steps)
            ):
                validate(cfg, models, accelerator.unwrap_model(models.student), ema, step, out, validated)
            if step < t.max_steps and stop.requested(accelerator):
                saved = saved or save_checkpoint(accelerator, cfg, models, ema, step, out, optimizer, lr_scheduler)
                bar.close()
                accelerator.end_training()
                raise TrainingStopped(step, saved)

    bar.close()
    accelerator.wait_for_everyone()
    folder = out / "student"
    if accelerator.is_main_process:
        folder = save_student(cfg, models, accelerator.unwrap_model(models.student), ema, out)
        logger.info(f"LCM student written to {folder}", main_process_only=True)
    accelerator.end_training()
    return folder
