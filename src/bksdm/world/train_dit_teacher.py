"""Train the SD3-shaped shapes teacher from scratch on a CPU and save it as a ``StableDiffusion3Pipeline`` folder.

Usage (the command that made the shipped teacher is recorded in ``assets/teacher-sd3/bksdm_toy.json``)::

    python -m bksdm.world.train_dit_teacher --out src/bksdm/world/assets/teacher-sd3

Stages (the architecture and why: :mod:`bksdm.world.dit_teacher`):

1. the VAE is the U-Net teacher's, frozen; the world's training images (seed 2, as for the U-Net teacher) are
   encoded once and cached in ``--work-dir``; ``shift_factor`` and ``scaling_factor`` are set so the scaled latents
   have mean 0 and standard deviation ``--latent-std`` (1, SD3's convention);
2. both CLIP text encoders and the transformer are trained *jointly* from scratch with rectified flow, SD3's
   objective and the one bksdm distils SD3 students with (:class:`bksdm.families.base.FlowMatching`):
   x_s = (1 - s) x_0 + s n, target n - x_0, s drawn logit-normal and moved by the scheduler's shift (3.0), 10% of
   captions dropped to "" for classifier-free guidance, an EMA of the weights.

   Why this density: the U-Net teacher's lesson was that position is decided at the noisiest steps and must be
   learnt there at full weight. Rectified flow gives both: its target n - x_0 carries x_0 at full weight at every s
   (like v-prediction, unlike epsilon), its schedule ends at pure noise (nothing of the layout leaks through x_1,
   which is why the latents can keep unit variance), and SD3's shift of 3 puts 39% of the draws above s = 0.8
   (logit-normal without the shift: 8%), where the sampler, with the same shift, takes 11 of its 25 steps.
   Measured at step 300 of 600-step trials (24 held-out pairs, guidance 3, per-attribute accuracy): shift 3 read
   position 0.96, size 0.92, colour 0.83 and drew one coherent blob per image; shift 1 with 20% of the draws uniform
   in [0.8, 1) (``--shift 1 --high-t-share 0.2``: more low-noise draws, for the outlines) read 0.75, 0.71, 0.71 and
   drew fragments. Shape was near chance in both at that point (0.25, 0.42): it is learnt last. The sampler's shift
   hardly matters once trained (the shift-1 weights sampled at shift 3 gave the same readings, images within 0.4/255
   on average: the same ODE, discretised differently); the training density is what decides.
3. evaluation on held-out (prompt, seed) pairs exactly as for the U-Net teacher (:mod:`bksdm.world.teacher_eval`:
   every scene once, noise seed 10000 + i, 25 steps, several guidance scales, the attribute classifier), through
   the stock pipeline; the best scale is shipped as the recommended one.

Training runs the text stream short: the stock pipeline feeds T5's 256 zero tokens, which are identical at every
layer (no position embedding on text; same input, same output), so 256 of them weigh in every softmax exactly as
one token with log(256) added to its attention logit (`token_runs.RepeatedTokenAttnProcessor`). Training uses that one
token (5x faster per step on a CPU, measured), the same function of the weights to float precision; the saved
model has the stock processors and runs the stock 16 + 256 text tokens.

Checkpoints go to ``--work-dir`` every ``--checkpoint-every`` steps and a rerun with the same arguments resumes from
them. ``--eval-only`` re-evaluates an existing folder and updates its ``bksdm_toy.json``.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0

from bksdm.artifacts import MODEL_RECORD_FILE, atomic_file
from bksdm.families.sd3 import SD3
from bksdm.families.token_runs import attn_processors, folded
from bksdm.world import shapes
from bksdm.world.dit_teacher import T5_ZERO_TOKENS, build_untrained_dit_teacher, load_dit_teacher
from bksdm.world.dit_teacher_recipe import DitTeacherRecipe, parse_args
from bksdm.world.teacher import TEACHER_DIR
from bksdm.world.teacher_eval import (
    evaluate,
    machine,
    parameter_counts,
    write_settings,
)
from bksdm.world.teacher_loop import Clock, LoopSettings, quick_evaluation, train_modules
from bksdm.world.teacher_recipe import CAPTION_DROPOUT, UNET_WORLD_SEED
from bksdm.world.train_teacher import encode_world

logger = logging.getLogger("bksdm.world.train_dit_teacher")

TRAINED = ("transformer", "text_encoder", "text_encoder_2")
"""The pipeline components trained here (the VAE is reused, frozen)."""


# ------------------------------------------------------------------------------------ short text stream


def caption_ids(pipe: StableDiffusion3Pipeline) -> torch.Tensor:
    """Token ids (97, CLIP_LENGTH) of every caption of :func:`shapes.all_scenes` and, last, of "", padded exactly as
    ``StableDiffusion3Pipeline`` pads them (both CLIPs share the tokenizer)."""
    captions = [scene.caption for scene in shapes.all_scenes()] + [""]
    tokenizer = pipe.tokenizer
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_short(pipe: StableDiffusion3Pipeline, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pipe.encode_prompt``'s states and pooled vector with gradients, T5's zero tokens shortened to one.

    Returns:
        States (B, CLIP_LENGTH + 1, joint_attention_dim): both CLIPs' penultimate states concatenated and zero-padded
        to the joint width, then one zero token; pooled (B, pooled_projection_dim).
    """
    states, pooled = [], []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])  # SD3 reads the penultimate layer
        pooled.append(out[0])
    clip = torch.cat(states, dim=-1)
    joint = pipe.transformer.config.joint_attention_dim
    clip = F.pad(clip, (0, joint - clip.shape[-1]))
    return torch.cat([clip, clip.new_zeros(clip.shape[0], 1, joint)], dim=1), torch.cat(pooled, dim=-1)


# ------------------------------------------------------------------------------------------- latents


def prepare_latents(pipe: StableDiffusion3Pipeline, recipe: DitTeacherRecipe, work_dir: Path) -> torch.Tensor:
    """Stage 1: scaled latents (N, 4, 16, 16) of the training images and their scene ids; sets the VAE's factors.

    The posterior means and stds are cached in ``work_dir/latents.pt``; one latent is drawn per image (fixed seed),
    and ``shift_factor`` / ``scaling_factor`` make the drawn latents mean 0, std ``recipe.latent_std``.
    """
    cache = work_dir / "latents.pt"
    if cache.is_file():
        state = torch.load(cache, weights_only=True)
        means, stds, labels = state["means"], state["stds"], state["labels"].tolist()
    else:
        means, stds, labels = encode_world(pipe.vae, recipe.train_images)
        with atomic_file(cache) as partial:
            torch.save({"means": means, "stds": stds, "labels": torch.tensor(labels)}, partial)
    generator = torch.Generator().manual_seed(recipe.seed)
    raw = means + stds * torch.randn(means.shape, generator=generator)
    shift, scale = float(raw.mean()), recipe.latent_std / float(raw.std())
    pipe.vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scale, 5))
    logger.info("latents of %d images: shift_factor %.5f, scaling_factor %.5f", len(labels), shift, scale)
    return (means - shift) * scale, stds * scale, torch.tensor(labels)


def sample_sigmas(count: int, recipe: DitTeacherRecipe, scheduler_config, generator: torch.Generator) -> torch.Tensor:
    """Noise levels s (count,): the SD3 family's shifted logit-normal, a share ``high_t_share`` uniform in
    [high_t_from, 1) instead."""
    sigmas = torch.cat([SD3.sample_timestep(generator, scheduler_config, None) for _ in range(count)]) / 1000
    high = recipe.high_t_from + (1 - recipe.high_t_from) * torch.rand(count, generator=generator)
    return torch.where(torch.rand(count, generator=generator) < recipe.high_t_share, high, sigmas)


# ------------------------------------------------------------------------------------------ training


def flow_loss(pipe, batch: tuple[torch.Tensor, torch.Tensor], ids, recipe, generator) -> torch.Tensor:
    """Rectified-flow loss of one batch (clean latents (B, 4, 16, 16), caption rows of ``ids``), the text stream
    short (:func:`encode_short`; the transformer must run :func:`bksdm.families.token_runs.folded`)."""
    latents, captions = batch
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = sample_sigmas(len(latents), recipe, pipe.scheduler.config, generator)
    noisy, target = SD3.noise(pipe.scheduler, latents, noise, sigmas * 1000)  # target: noise - latents
    states, pooled = encode_short(pipe, ids[captions])
    pred = SD3.call(pipe.transformer, noisy, sigmas * 1000, states, {"pooled_projections": pooled})
    return F.mse_loss(pred, target)


def train_denoiser(pipe: StableDiffusion3Pipeline, data, recipe: DitTeacherRecipe, work_dir: Path, clock: Clock):
    """Stage 2: both CLIPs and the transformer trained jointly (:func:`train_modules`), the text stream short;
    leaves the EMA weights and stock processors in ``pipe``. Resumes from ``work_dir/denoiser.pt`` (written every
    ``recipe.checkpoint_every`` steps)."""
    means, stds, labels = data
    ids = caption_ids(pipe)  # (97, L); row 96 is ""

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(labels), (recipe.batch,), generator=generator)
        latents = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator)  # (B, 4, 16, 16)
        captions = labels[pick].clone()
        captions[torch.rand(recipe.batch, generator=generator) < CAPTION_DROPOUT] = len(ids) - 1
        return flow_loss(pipe, (latents, captions), ids, recipe, generator)

    def quick_eval(step: int) -> None:  # through the stock pipeline: stock processors, 16 + 256 text tokens
        with attn_processors(pipe.transformer, JointAttnProcessor2_0()):
            quick_evaluation(pipe, step, [3.0, 5.0], recipe.grid_dir)

    settings = LoopSettings(
        "transformer", recipe.steps, recipe.lr, recipe.warmup, recipe.seed, recipe.checkpoint_every, recipe.eval_every
    )
    with folded(pipe.transformer, T5_ZERO_TOKENS):
        modules = {name: getattr(pipe, name) for name in TRAINED}
        train_modules(modules, settings, batch_loss, work_dir / "denoiser.pt", clock, quick_eval)


# -------------------------------------------------------------------------------------------------- main


def write_record(out: Path, accuracies: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """:func:`bksdm.world.teacher_eval.write_settings`, with the sampler named as this pipeline's."""
    shift = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"]
    return write_settings(out, accuracies, record, f"FlowMatchEulerDiscreteScheduler (SD3's, shift {shift:g})")


def train_dit_teacher(recipe: DitTeacherRecipe, command: str) -> dict[str, Any]:
    """Trains (or, with ``recipe.eval_only``, re-evaluates) the SD3-shaped teacher into ``recipe.out``.

    Returns:
        The settings written to ``recipe.out/bksdm_toy.json``.
    """
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    out = Path(recipe.out)
    if recipe.eval_only:
        return write_record(out, evaluate(load_dit_teacher(path=out), recipe.guidance, recipe.grid_dir), {})
    clock = Clock()
    work_dir = Path(recipe.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_untrained_dit_teacher(recipe.seed, recipe.vae_from, recipe.blocks, recipe.heads, recipe.shift)
    data = prepare_latents(pipe, recipe, work_dir)
    train_denoiser(pipe, data, recipe, work_dir, clock)
    trained = clock.spent()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        accuracies = evaluate(pipe, recipe.guidance, recipe.grid_dir)
    record = {
        "training": {
            "command": command,
            "wall_time_s": round(trained["wall"]),
            "cpu_time_s": round(trained["cpu"]),  # below wall time x threads when the machine was shared
            "wall_time_including_evaluation_s": round(clock.spent()["wall"]),
            "machine": machine(),
            "data": f"shapes world seed {UNET_WORLD_SEED} ({recipe.train_images} images), encoded by the frozen VAE of "
            + ("the U-Net shapes teacher" if Path(recipe.vae_from) == TEACHER_DIR else recipe.vae_from),
        },
        "parameters": parameter_counts(pipe),
    }
    return write_record(out, accuracies, record)


def main(argv: Sequence[str] | None = None) -> None:
    recipe = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m bksdm.world.train_dit_teacher " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = train_dit_teacher(recipe, command)
    logger.info("wrote %s: %s", Path(recipe.out) / MODEL_RECORD_FILE, json.dumps(settings["sampling"]))


if __name__ == "__main__":
    main()
