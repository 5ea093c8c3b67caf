"""The distillation recipe (BK-SDM, Sec. 3.2): setup, one flat loop, checkpoints and logs.

All side effects of training live here: loading, accelerate, files, logging. The objective itself is
:func:`bksdm.train.kd.kd_step`. The loop reads top to bottom; each optimizer step is ``accumulation`` micro
steps, and micro step ``m`` always trains on the same samples with the same noise (``bksdm.seeding``), whatever
the number of processes, so a resumed or re-sharded run takes the same steps.

Every teacher family (:mod:`bksdm.families`: SD-v1/v2/SDXL U-Nets, SD3 / SD3.5 and FLUX.1 transformers) takes the
same loop: the family says how to resolve the plan, encode prompts, draw timesteps, noise, call the denoiser and
what to predict. The denoiser's weights live in the pipeline's own subfolder (``unet/`` or ``transformer/``), in
checkpoints (with ``unet_ema/`` or ``transformer_ema/``) as in the final ``student/`` pipeline.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import SchedulerMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bksdm.artifacts import atomic_dir
from bksdm.devices import parse_dtype
from bksdm.families import denoiser_of, family_of
from bksdm.families.base import Family
from bksdm.loading import PLAN_FILE, load_pipeline, load_plan, teacher_or_default
from bksdm.plan.render import DENOISER_LABELS
from bksdm.plan.surgery import build_student
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
from bksdm.train.config import DistillConfig, OptimConfig, config_to_dict, save_config
from bksdm.train.cpu_kernels import kernel_checkpointing
from bksdm.train.encoders import freeze_teacher_parts, sample_latents
from bksdm.train.kd import LossWeights, draw_noise, ema_update, kd_step
from bksdm.train.runtime import (
    LossWindow,
    TrainingStopped,
    make_accelerator,
    peak_memory_mb,
    status_line,
    stop_on_sigterm,
    tracker_config,
)
from bksdm.train.sharding import full, full_state, placed_like, plain_model, shard_model, wants_sharding
from bksdm.train.validation import Validator, plot_losses

logger = get_logger(__name__)

__all__ = ["TrainingSetupError", "distill", "load_models", "make_optimizer"]

WEIGHTS = "diffusion_pytorch_model"  # diffusers' weight file stem
RUN_ENTRIES = ("config.yaml", "student", "loss_curve.png", "validation")  # a distill run's own entries in its folder


class TrainingSetupError(ValueError):
    """The recipe cannot start (missing teacher or data, an unusable combination of options)."""


@dataclass
class Models:
    """Everything the loop needs from the teacher pipeline and the student."""

    pipe: Any  # the teacher pipeline (its tokenizers/encoders/VAE are shared with the saved student)
    family: Family  # the denoisers' family: plan, prompt encoding, timesteps, target, call
    teacher: torch.nn.Module  # the pipeline's denoiser (UNet2DConditionModel, SD3/Flux transformer)
    student: torch.nn.Module  # a stock model of the teacher's class
    scheduler: SchedulerMixin  # the training scheduler (``family.training_scheduler``)
    feature_pairs: tuple
    plan_source: str

    @property
    def folder(self) -> str:
        """The denoiser's subfolder in pipelines and checkpoints: ``unet`` or ``transformer``."""
        return self.family.denoiser


def make_optimizer(params, o: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The student's AdamW as configured: bitsandbytes' 8-bit one, or PyTorch's (fused unless turned off)."""
    kwargs = {"lr": lr, "betas": (o.adam_beta1, o.adam_beta2), "weight_decay": o.weight_decay, "eps": o.adam_epsilon}
    if o.use_8bit_adam:
        import bitsandbytes as bnb  # optional: pip install bitsandbytes

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=o.fused_adam, **kwargs)


def load_models(cfg: DistillConfig, device: torch.device, weight_dtype: torch.dtype) -> Models:
    """Loads the teacher pipeline, builds (or loads) the student, and freezes every teacher part."""
    pipe = load_pipeline(teacher_or_default(cfg.model.teacher))  # no teacher given: the bundled shapes teacher
    teacher = denoiser_of(pipe)
    family = family_of(teacher)
    if cfg.model.student:
        folder = Path(cfg.model.student)
        denoiser_dir = folder / family.denoiser if (folder / family.denoiser).is_dir() else folder
        if not (denoiser_dir / "config.json").is_file():
            raise TrainingSetupError(
                f"model.student={folder}: holds neither {family.denoiser}/ nor a config.json; the {family.name} "
                f"teacher needs a folder written by `bksdm prune` (or its {family.denoiser}/)"
            )
        student = family.model_class.from_pretrained(denoiser_dir)
        plan = load_plan(folder if (folder / PLAN_FILE).is_file() else cfg.model.plan)
        plan_source = str(folder)
    else:
        plan = load_plan(cfg.model.plan)
        surgery = build_student(
            teacher, plan, init=cfg.model.init, allow_mismatched=cfg.model.allow_partial_init, seed=cfg.train.seed
        )
        student, plan_source = surgery.student, cfg.model.plan
    resolved = family.resolve(plan, dict(teacher.config))
    if cfg.loss.feature_sites == "self_attention" and not hasattr(resolved, "self_attention_pairs"):
        raise TrainingSetupError(
            f"loss.feature_sites=self_attention reads a U-Net's self-attention layers; the {family.name} teacher's "
            "kept blocks are matched as they are (use loss.feature_sites=blocks)"
        )
    sites = cfg.loss.feature_sites == "self_attention"
    pairs = resolved.self_attention_pairs() if sites else resolved.feature_pairs()
    freeze_teacher_parts(pipe, teacher, device, weight_dtype)
    student.to(device)
    student.train()
    scheduler = family.training_scheduler(pipe.scheduler.config)
    return Models(pipe, family, teacher, student, scheduler, pairs, plan_source)


def save_checkpoint(
    accelerator: Accelerator, cfg: DistillConfig, models: Models, ema, step: int, out: Path, optimizer, lr_scheduler
) -> Path:
    """A resumable checkpoint (:mod:`bksdm.train.checkpoints`): the student in ``unet/`` (``transformer/``), the EMA
    weights in ``unet_ema/`` (``transformer_ema/``), both stock diffusers folders, the optimizer and schedule, the
    resolved config."""
    student = accelerator.unwrap_model(models.student)
    main = accelerator.is_main_process  # every process gathers a sharded student's tensors, the main one keeps them
    weights = full_state(student, keep=main)
    ema_weights = ema_state(ema, student, keep=main) if ema is not None else None

    def write_files(folder: Path) -> None:
        write_weights(weights, student, folder / models.folder)
        if ema_weights is not None:
            write_weights(ema_weights, student, folder / f"{models.folder}_ema")
        save_config(cfg, folder / "config.yaml")

    return write_checkpoint(
        accelerator,
        out,
        step,
        cfg.train.keep_checkpoints,
        recipe="distill",
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        write_files=write_files,
        fingerprints={"ema": ema is not None},
        extra={"ema": _ema_scalars(ema)} if ema is not None else None,
    )


def resume_from(accelerator: Accelerator, checkpoint: Path, models: Models, ema, optimizer, lr_scheduler) -> int:
    """Loads a checkpoint written by :func:`save_checkpoint` into this run; returns its step.

    Raises:
        CheckpointError: not a distill checkpoint of this format, or made for another student (plan) or EMA setting.
    """
    state = read_checkpoint(checkpoint, "distill", {"ema": ema is not None})
    student = accelerator.unwrap_model(models.student)
    what = f"student {DENOISER_LABELS[models.folder]}"
    load_module(student, read_weights(checkpoint / models.folder, WEIGHTS), what)
    if ema is not None:
        stored = read_weights(checkpoint / f"{models.folder}_ema", WEIGHTS)
        names = [name for name, _ in student.named_parameters()]
        if set(names) - set(stored):
            raise CheckpointError(
                f"checkpoint {checkpoint}: {models.folder}_ema/ does not hold every student parameter"
            )
        shadow = [
            placed_like(p, stored[name].to(p.device, p.dtype)) for name, p in zip(names, ema.shadow_params, strict=True)
        ]
        ema.load_state_dict({**state["extra"]["ema"], "shadow_params": shadow})
    restore_training_state(checkpoint, state, optimizer, lr_scheduler)
    return int(state["step"])


def save_ema_weights(ema, student: torch.nn.Module, folder: Path) -> None:
    """The EMA weights as a stock diffusers folder of the student's class (:func:`ema_state`, :func:`write_weights`)."""
    write_weights(ema_state(ema, student), student, folder)


def ema_state(ema, student: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The EMA weights by the student's state-dict names, whole (collective when sharded: ``sharding.full``).

    The EMA averages parameters only; the student's persistent buffers (SD3's fixed sin-cos ``pos_embed``; a U-Net
    has none) are taken as they are. (``EMAModel.save_pretrained`` would first build a second student to copy them
    into: 1.8 GB more at the end of every checkpoint at SD size, which took a 256-px distill run past 18 GB.)
    """
    names = [name for name, _ in student.named_parameters()]
    tensors = {name: full(p, keep).detach() for name, p in zip(names, ema.shadow_params, strict=True)}
    tensors.update({k: full(v, keep).detach() for k, v in student.state_dict().items() if k not in tensors})
    return tensors


def write_weights(tensors: dict[str, torch.Tensor], model: torch.nn.Module, folder: Path) -> None:
    """A stock diffusers model folder: ``tensors`` in one safetensors file and ``model``'s config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    save_file(tensors, str(folder / f"{WEIGHTS}.safetensors"), metadata={"format": "pt"})
    model.save_config(folder)


def _ema_scalars(ema) -> dict[str, Any]:
    return {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}


def save_student(models: Models, denoiser: torch.nn.Module, out: Path) -> Path:
    """The final output: a complete pipeline of the teacher's class (its encoders/VAE/scheduler + ``denoiser``, the
    student with its EMA weights if on), loadable by the stock ``StableDiffusionPipeline``,
    ``StableDiffusion3Pipeline``, ...

    With EMA the raw weights of the last step stay in the last checkpoint's ``unet/`` (``transformer/``). Written
    atomically: a crash or a full disk leaves the checkpoints and no half pipeline.
    """
    pipe = models.pipe
    setattr(pipe, models.folder, denoiser)  # pipe.unet / pipe.transformer: model_index.json follows
    pipe.to(torch.float32)
    target = out / "student"
    with atomic_dir(target) as partial:
        pipe.save_pretrained(partial, safe_serialization=True)
        plan_file = Path(models.plan_source) / PLAN_FILE
        if plan_file.is_file():
            shutil.copy(plan_file, partial / PLAN_FILE)
    return target


def distill(cfg: DistillConfig) -> Path:
    """Runs the recipe and returns the folder of the final student pipeline."""
    out = Path(cfg.train.output_dir)
    if cfg.model.student and not Path(cfg.model.student).is_dir():
        raise TrainingSetupError(
            f"model.student={cfg.model.student}: no such folder; give a folder written by `bksdm prune` (or its "
            "unet/ or transformer/)"
        )
    checkpoint = find_checkpoint(out, cfg.train.resume)  # before any work: a bad path fails now
    stale = claim_output(out, resume=cfg.train.resume, overwrite=cfg.train.overwrite, markers=RUN_ENTRIES)
    accelerator, mixed = make_accelerator(
        out, cfg.train.mixed_precision, cfg.train.gradient_accumulation_steps, cfg.train.trackers
    )
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise TrainingSetupError(
            f"accelerate's {accelerator.distributed_type.value} plugin is not used by bksdm distill: launch with "
            "accelerate launch --multi_gpu --num_processes N and set train.sharding=fsdp to shard the student"
        )
    sharded = wants_sharding(cfg.train.sharding, accelerator.num_processes, mixed, cfg.optim.use_8bit_adam)
    if accelerator.is_main_process:
        remove_entries(stale)  # train.overwrite=true: the earlier run's checkpoints and logs
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    if cfg.train.teacher_dtype != "auto":
        weight_dtype = parse_dtype(cfg.train.teacher_dtype)
    models = load_models(cfg, accelerator.device, weight_dtype)
    if cfg.train.gradient_checkpointing:
        models.student.enable_gradient_checkpointing(kernel_checkpointing(accelerator.device))
    if cfg.train.attention == "default" and models.folder != "unet":
        raise TrainingSetupError(
            "train.attention=default is the U-Net's classic attention processor; a transformer student keeps its "
            "own joint-attention processors (use train.attention=sdpa)"
        )
    if cfg.train.attention == "default":  # the classic attention processor, e.g. to compare against SDPA
        from diffusers.models.attention_processor import AttnProcessor

        models.student.set_attn_processor(AttnProcessor())
    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    if sharded:  # before the optimizer and the EMA, which then hold shards too
        shard_model(models.teacher, accelerator.device)  # frozen: gathered block by block under no_grad
        shard_model(models.student, accelerator.device, bf16=mixed == "bf16")
    o = cfg.optim
    world = accelerator.num_processes
    lr = o.lr * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world if o.scale_lr else o.lr
    optimizer = make_optimizer(models.student.parameters(), o, lr)
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps, num_training_steps=cfg.train.max_steps
    )
    ema = None
    if cfg.train.use_ema:
        ema = EMAModel(
            models.student.parameters(),
            decay=cfg.train.ema_decay,
            model_cls=models.family.model_class,
            model_config=models.student.config,
        )
        ema.to(accelerator.device)
    # The lr schedule is stepped by hand once per optimizer step (accelerate would step it once per process).
    if sharded:  # FSDP2 reduces the gradients itself; accelerate only steps the optimizer on sync steps
        optimizer = accelerator.prepare(optimizer)
    else:
        models.student, optimizer = accelerator.prepare(models.student, optimizer)

    step = 0
    if checkpoint is not None:
        step = resume_from(accelerator, checkpoint, models, ema, optimizer, lr_scheduler)
        logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / "logs" / "metrics.jsonl", step)  # records after the checkpoint are written again
        save_config(cfg, out / "config.yaml")
        accelerator.init_trackers("bksdm-distill", config=tracker_config(config_to_dict(cfg)))
    weights = LossWeights(cfg.loss.lambda_task, cfg.loss.lambda_out, cfg.loss.lambda_feat)
    accum = cfg.train.gradient_accumulation_steps
    # A sharded run's grids are drawn by every process together (each holds a share of both denoisers).
    drawers = sharded or accelerator.is_main_process
    validator = (
        Validator(cfg, models, out, write=accelerator.is_main_process) if drawers and cfg.train.validate_every else None
    )
    batches = batch_stream(cfg, models, accelerator, start_micro_step=step * accum)
    metrics_file = (out / "logs" / "metrics.jsonl") if accelerator.is_main_process else None
    if metrics_file:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=step,
        desc="distill, sharded" if sharded else "distill",
        disable=not accelerator.is_main_process,
    )
    # Loss terms stay on the device until a log step: one reduction across processes per log_every steps.
    window = LossWindow(accum)
    samples, tick = 0, time.perf_counter()

    # SIGTERM (preemption, kill) stops the run with a checkpoint: one process at the end of the optimizer step in
    # progress, several at the next log step (their stop vote rides on the window's all-reduce).
    with stop_on_sigterm() as stop, governed_threads(accelerator.device) as threads:
        while step < cfg.train.max_steps:
            batch = next(batches)  # one micro batch of this process: latents' distribution, text states, positions
            with accelerator.accumulate(models.student):
                latent_shape = tuple(batch["mean"].shape[1:])  # (C, h, w)
                timesteps, noise, eps = draw_noise(
                    cfg.train.seed,
                    batch["micro_step"],
                    batch["positions"],
                    latent_shape,
                    models.scheduler.config.num_train_timesteps,
                    accelerator.device,
                    sample_timestep=models.family.timestep_sampler(models.scheduler.config, latent_shape),
                )
                vae = models.pipe.vae.config
                latents = sample_latents(
                    batch["mean"], batch["std"], eps, vae.scaling_factor, shift_factor=vae.get("shift_factor")
                )  # (B, C, h, w)
                losses = kd_step(
                    models.student,
                    models.teacher,
                    models.scheduler,
                    latents,
                    batch["text"],
                    timesteps,
                    noise,
                    models.feature_pairs,
                    weights,
                    batch.get("added_cond_kwargs"),
                    family=models.family,
                )
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and o.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(models.student.parameters(), o.max_grad_norm)
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
            if ema is not None:
                ema_update(ema, accelerator.unwrap_model(models.student).parameters())  # EMAModel.step, in place
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
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
                    bar.set_postfix_str(status_line(record))
                    logger.info(status_line(record), main_process_only=True)
                samples, tick = 0, time.perf_counter()
            every = cfg.train.checkpoint_every
            saved = None
            if (every and step % every == 0) or step == cfg.train.max_steps:
                saved = save_checkpoint(accelerator, cfg, models, ema, step, out, optimizer, lr_scheduler)
            if validator and (step % cfg.train.validate_every == 0 or step == cfg.train.max_steps):
                validator.run(accelerator.unwrap_model(models.student), step)
            if step < cfg.train.max_steps and stop.requested(accelerator):
                saved = saved or save_checkpoint(accelerator, cfg, models, ema, step, out, optimizer, lr_scheduler)
                bar.close()
                accelerator.end_training()
                raise TrainingStopped(step, saved)

    bar.close()
    accelerator.wait_for_everyone()
    target = out / "student"
    student = accelerator.unwrap_model(models.student)
    main = accelerator.is_main_process  # every process gathers a sharded student's tensors, the main one keeps them
    final = ema_state(ema, student, main) if ema is not None else full_state(student, main)
    if accelerator.is_main_process:
        target = save_student(models, plain_model(student, final, models.family.model_class), out)
        if metrics_file and metrics_file.is_file():
            plot_losses(metrics_file, out / "loss_curve.png")
        logger.info(f"student pipeline written to {target}", main_process_only=True)
    accelerator.end_training()
    return target
