"""A brief output distillation of a carried ControlNet: the student + carried ControlNet learn to predict what the
teacher + the teacher's ControlNet predict, on the student's data with their control images.

The pruned ControlNet (:func:`bksdm.use.adapters.controlnet.prune_controlnet`) starts from the teacher
ControlNet's weights, but feeds a U-Net whose blocks have themselves been distilled into new roles. The objective
is BK-SDM's output KD (Kim et al., ECCV 2024, Eq. 2) with the ControlNets in the loop, only the carried ControlNet
trained::

    loss_kd_out = || student(x_t, t, c, carried(x_t, t, c, control))
                     - teacher(x_t, t, c, teacher_controlnet(x_t, t, c, control)) ||²

plus, optionally, ``lambda_task`` times the plain diffusion loss of the student + carried ControlNet. The data are
folders (or hub data sets) of images, captions and control images, one record each, as diffusers' ControlNet
training script reads them (``file_name``, ``text``, ``conditioning_image`` columns).

The runtime is ``bksdm distill``'s (:mod:`bksdm.train.runtime`, :mod:`bksdm.train.checkpoints`): accelerate,
safetensors checkpoints in the run folder, ``resume``, a SIGTERM stop with a checkpoint, ``logs/metrics.jsonl``;
randomness keyed by (seed, step, position) (:mod:`bksdm.seeding`), so a resumed run takes the steps of an
uninterrupted one. :func:`controlnet_kd_step` is the pure objective.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bksdm.families.unet import UNET
from bksdm.seeding import sample_generator
from bksdm.threads import governed_threads
from bksdm.train.checkpoints import (
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
from bksdm.train.data import GlobalBatchSampler, ImageTransform, open_source
from bksdm.train.data.batch_sampling import SampleRef
from bksdm.train.data.images import load_sample
from bksdm.train.encoders import encode_images, freeze, freeze_teacher_parts, sample_latents
from bksdm.train.kd import draw_noise
from bksdm.train.runtime import LossWindow, TrainingStopped, make_accelerator, stop_on_sigterm

logger = get_logger(__name__)

__all__ = ["CONTROL_COLUMN", "ControlNetKDSettings", "KDSettingsError", "controlnet_kd_step", "distill_controlnet"]

CONTROL_COLUMN = "conditioning_image"
"""Default metadata column of the control images (diffusers' ``train_controlnet.py`` reads the same name)."""
RECIPE = "controlnet-kd"
"""The checkpoints' recipe name: a distill or LCM checkpoint is not resumed here, nor the other way round."""
STREAM_CAPTION = 3
"""Seeding stream of the caption drops (the data stream draws crops, the noise stream timesteps and noise)."""
_WEIGHTS = "diffusion_pytorch_model"


class KDSettingsError(ValueError):
    """The distillation settings are unusable (every problem listed)."""


@dataclass
class ControlNetKDSettings:
    """A brief ControlNet distillation (``bksdm adapt controlnet --distill-steps N --data D``)."""

    data: str
    """Images, captions and control images: a folder with ``metadata.csv`` / ``.jsonl``, or ``hf:NAME``."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    lr: float = 1e-4
    resolution: int | None = None
    """Training side in pixels; None: the teacher U-Net's ``sample_size`` times the VAE's factor."""
    image_column: str = "file_name"
    caption_column: str = "text"
    control_column: str = CONTROL_COLUMN
    caption_dropout: float = 0.1
    """Share of captions replaced by "" (the pipelines run the ControlNet on the unconditional branch too)."""
    lambda_task: float = 0.0
    """Weight of the student's own diffusion loss beside the output KD (weight 1)."""
    seed: int = 0
    run_dir: str | None = None
    """Checkpoints and logs; None: the output folder's name with ``-kd`` appended, beside it."""
    resume: bool = False
    """Continue the run in ``run_dir`` from its latest checkpoint."""
    overwrite: bool = False
    """Replace another run in ``run_dir``."""
    checkpoint_every: int = 0
    """Checkpoint every N steps; 0: only at the end."""
    log_every: int = 10
    mixed_precision: str = "no"
    probe_size: int = 32
    """Samples of the fixed probe batch whose KD loss is measured before and after (same noise, timesteps)."""

    def check(self) -> None:
        """Raises :class:`KDSettingsError` listing every unusable value, before any model is loaded."""
        problems = [
            f"{name} must be >= {low}, got {getattr(self, name)}"
            for name, low in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("probe_size", 1))
            if getattr(self, name) < low
        ]
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.caption_dropout < 1:
            problems.append(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.lambda_task < 0 or self.checkpoint_every < 0:
            problems.append("lambda_task and checkpoint_every must be >= 0")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed_precision {self.mixed_precision!r}: use no, fp16 or bf16")
        if problems:
            raise KDSettingsError("the ControlNet distillation settings are unusable: " + "; ".join(problems))


def controlnet_kd_step(
    student: nn.Module,
    carried: nn.Module,
    teacher: nn.Module,
    teacher_controlnet: nn.Module,
    scheduler,
    latents: Tensor,
    text: Tensor,
    control: Tensor,
    timesteps: Tensor,
    noise: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    lambda_task: float = 0.0,
) -> dict[str, Tensor]:
    """One forward of the objective: the teacher pair under ``no_grad``, the student pair with a graph to the carried
    ControlNet (the student U-Net is frozen but passes gradients through).

    Args:
        student, carried: The student U-Net and its (trained) ControlNet; ``carried`` may be wrapped (DDP).
        teacher, teacher_controlnet: The frozen teacher U-Net and its ControlNet.
        scheduler: The training scheduler (``add_noise``, prediction type).
        latents: Clean scaled latents (B, 4, h, w); ``text`` (B, L, D); ``control`` (B, 3, H, W) in [0, 1].
        timesteps: (B,); ``noise``: (B, 4, h, w).
        added_cond_kwargs: SDXL's ``text_embeds`` / ``time_ids`` (None for SD-v1/v2).
        lambda_task: Weight of ``loss_task``.

    Returns:
        float32 scalars ``loss`` (to backpropagate), ``loss_kd_out`` and ``loss_task``.
    """
    noisy, target = UNET.noise(scheduler, latents.float(), noise.float(), timesteps)  # (B, 4, h, w) each
    extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}

    def predict(unet: nn.Module, controlnet: nn.Module) -> Tensor:
        down, mid = controlnet(noisy, timesteps, text, control, return_dict=False, **extra)
        return unet(
            noisy, timesteps, text, down_block_additional_residuals=down, mid_block_additional_residual=mid,
            return_dict=False, **extra,
        )[0].float()  # fmt: skip

    with torch.no_grad():
        teacher_pred = predict(teacher, teacher_controlnet)
    student_pred = predict(student, carried)
    loss_kd_out = F.mse_loss(student_pred, teacher_pred)
    loss_task = F.mse_loss(student_pred, target.float())
    return {"loss": loss_kd_out + lambda_task * loss_task, "loss_kd_out": loss_kd_out, "loss_task": loss_task}


class ControlPairs(Dataset):
    """Records of images, captions and control images; item :class:`SampleRef` -> image (3, R, R) in [-1, 1],
    control (3, R, R) in [0, 1], caption. Both images are resized and centre-cropped alike, never flipped (a flip
    would move the shape away from where its control says)."""

    def __init__(self, s: ControlNetKDSettings, resolution: int) -> None:
        self.images = open_source(s.data, image_column=s.image_column, caption_column=s.caption_column)
        self.controls = open_source(s.data, image_column=s.control_column, caption_column=s.caption_column)
        self.transform = ImageTransform(resolution, center_crop=True, random_flip=False)
        self.seed = s.seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        image = load_sample(self.images[ref.index], self.transform, self.seed, ref.step, ref.position)
        control = load_sample(self.controls[ref.index], self.transform, self.seed, ref.step, ref.position)
        return {
            "pixel_values": image["pixel_values"],
            "control": (control["pixel_values"] + 1) / 2,
            "caption": image["caption"],
            "position": ref.position,
            "step": ref.step,
        }


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "control": torch.stack([s["control"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "positions": [s["position"] for s in samples],
        "step": samples[0]["step"],
    }


@dataclass
class _Models:
    pipe: Any
    student: nn.Module
    teacher_controlnet: nn.Module
    scheduler: Any
    resolution: int


def _inputs(models: _Models, batch: dict[str, Any], s: ControlNetKDSettings, device, noise_seed: int):
    """A loader batch as the objective's inputs: latents, text states, control, timesteps, noise, SDXL extras."""
    drops = [sample_generator(s.seed, batch["step"], p, STREAM_CAPTION) for p in batch["positions"]]
    captions = [
        "" if float(torch.rand((), generator=g)) < s.caption_dropout else c
        for c, g in zip(batch["caption"], drops, strict=True)
    ]
    mean, std = encode_images(models.pipe.vae, batch["pixel_values"].to(device))
    text, pooled = UNET.encode_prompt(models.pipe, captions, device)
    timesteps, noise, eps = draw_noise(
        noise_seed, batch["step"], batch["positions"], tuple(mean.shape[1:]),
        int(models.scheduler.config.num_train_timesteps), device,
    )  # fmt: skip
    latents = sample_latents(mean, std, eps, models.pipe.vae.config.scaling_factor)
    added = UNET.conditioning(pooled, models.resolution, device, models.pipe.unet.config)
    return latents, text, batch["control"].to(device), timesteps, noise, added


@torch.no_grad()
def _probe(models: _Models, carried: nn.Module, batch: dict[str, Any], s: ControlNetKDSettings, device) -> float:
    """``loss_kd_out`` of the fixed probe batch (its own noise seed, so it never equals a training batch's draws).

    Run in chunks of the training batch size, so it needs no more memory than a training step's forward (the probe
    is larger than a batch: at once, 32 SD-v1.4 samples at 256 px are 5 GB of VAE activations alone); every draw is
    keyed by the sample's position, so the chunks see what one batch would, and the mean is the same."""
    was_training = carried.training
    carried.eval()
    count, total = len(batch["positions"]), 0.0
    for start in range(0, count, s.batch_size):
        chunk = {key: value if key == "step" else value[start : start + s.batch_size] for key, value in batch.items()}
        latents, text, control, timesteps, noise, added = _inputs(models, chunk, s, device, s.seed + 1)
        losses = controlnet_kd_step(
            models.student, carried, models.pipe.unet, models.teacher_controlnet, models.scheduler,
            latents, text, control, timesteps, noise, added,
        )  # fmt: skip
        total += float(losses["loss_kd_out"]) * len(chunk["positions"])
    carried.train(was_training)
    return total / count


def distill_controlnet(
    s: ControlNetKDSettings, teacher: str, student: str, teacher_controlnet: nn.Module, carried: nn.Module, out: Path
) -> dict[str, Any]:
    """Trains ``carried`` in place for ``s.steps`` steps; returns what the report records of the run.

    Args:
        s: The settings (checked).
        teacher: The teacher pipeline (folder or hub id).
        student: The student pipeline folder (its ``unet/``).
        teacher_controlnet: The teacher's ControlNet (frozen here).
        carried: The pruned ControlNet to train.
        out: The adapted ControlNet's output folder (names the default run folder).

    Raises:
        TrainingStopped: SIGTERM arrived; a checkpoint of the step reached was written (``resume`` continues).
        OutputInUseError: The run folder holds another run and neither ``resume`` nor ``overwrite`` is set.
    """
    from bksdm.loading import load_pipeline, load_unet

    run_dir = Path(s.run_dir) if s.run_dir else out.with_name(out.name + "-kd")
    checkpoint = find_checkpoint(run_dir, "latest" if s.resume else None)
    stale = claim_output(run_dir, resume="latest" if s.resume else None, overwrite=s.overwrite, markers=())
    accelerator, _ = make_accelerator(run_dir, s.mixed_precision)
    device = accelerator.device
    pipe = load_pipeline(teacher)
    freeze_teacher_parts(pipe, pipe.unet, device, torch.float32)
    student_unet = load_unet(student).to(device)
    freeze(student_unet, teacher_controlnet.to(device))
    resolution = s.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    models = _Models(pipe, student_unet, teacher_controlnet, UNET.training_scheduler(pipe.scheduler.config), resolution)
    dataset = ControlPairs(s, resolution)
    if accelerator.is_main_process:
        remove_entries(stale)
    carried.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(carried.parameters(), lr=s.lr, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=min(20, s.steps // 10))
    wrapped, optimizer = accelerator.prepare(carried, optimizer)
    fingerprints = {"controlnet": json.loads(carried.to_json_string())}
    step = 0
    if checkpoint is not None:
        state = read_checkpoint(checkpoint, RECIPE, fingerprints)
        load_module(carried, read_weights(checkpoint / "controlnet", _WEIGHTS), "ControlNet")
        restore_training_state(checkpoint, state, optimizer, lr_scheduler)
        step = int(state["step"])
    probe_refs = [SampleRef(i % len(dataset), 0, i) for i in range(s.probe_size)]
    probe_batch = _collate([dataset[r] for r in probe_refs])
    probe_before = _probe(models, carried, probe_batch, s, device)
    sampler = GlobalBatchSampler(
        len(dataset), s.batch_size * accelerator.num_processes, s.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes, start_step=step,
    )  # fmt: skip
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate)
    metrics = run_dir / "logs" / "metrics.jsonl"
    if accelerator.is_main_process:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        trim_metrics(metrics, step)
    window, records, began = LossWindow(1), [], time.perf_counter()

    def save(at: int) -> Path:
        return write_checkpoint(
            accelerator, run_dir, at, 1, recipe=RECIPE, optimizer=optimizer, lr_scheduler=lr_scheduler,
            write_files=lambda folder: carried.save_pretrained(folder / "controlnet"), fingerprints=fingerprints,
        )  # fmt: skip

    bar = tqdm(total=s.steps, initial=step, desc="controlnet kd", disable=not accelerator.is_main_process)
    with stop_on_sigterm() as stop, governed_threads(accelerator.device) as threads:
        for batch in loader:
            if step >= s.steps:
                break
            latents, text, control, timesteps, noise, added = _inputs(models, batch, s, device, s.seed)
            losses = controlnet_kd_step(
                student_unet, wrapped, pipe.unet, teacher_controlnet, models.scheduler,
                latents, text, control, timesteps, noise, added, s.lambda_task,
            )  # fmt: skip
            accelerator.backward(losses["loss"])
            accelerator.clip_grad_norm_(carried.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.add(losses)
            window.step_done()
            if threads is not None:
                threads.tick()
            step += 1
            bar.update(1)
            if step % s.log_every == 0 or step == s.steps:
                record = {"step": step, **window.flush(accelerator, stop), "lr": lr_scheduler.get_last_lr()[0]}
                records.append(record)
                if accelerator.is_main_process:
                    with metrics.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix_str(f"loss_kd_out={record['loss_kd_out']:.5f}")
            saved = None
            if step == s.steps or (s.checkpoint_every and step % s.checkpoint_every == 0):
                saved = save(step)
            if step < s.steps and stop.requested(accelerator):
                bar.close()
                raise TrainingStopped(step, saved or save(step))
    bar.close()
    carried.eval().requires_grad_(False)
    return {
        "settings": asdict(s),
        "run_dir": str(run_dir),
        "steps": step,
        "seconds": round(time.perf_counter() - began, 1),
        "probe_loss_kd_out": {"before": probe_before, "after": _probe(models, carried, probe_batch, s, device)},
        "log": records,
    }
