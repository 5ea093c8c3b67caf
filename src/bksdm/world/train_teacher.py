"""Train the embedded shapes teacher from scratch on a CPU and save it as a diffusers pipeline folder.

Usage (the command that made the shipped teacher is recorded in ``assets/teacher/bksdm_toy.json``)::

    python -m bksdm.world.train_teacher --out src/bksdm/world/assets/teacher

Three stages, as Stable Diffusion itself was built, but all on shapes-world pairs generated on the fly:

1. the VAE (MSE reconstruction + a small KL term), then frozen; its ``scaling_factor`` scales its latents on
   real shapes to standard deviation LATENT_SCALE (SD's 0.18215 scaled them to 1; see
   :data:`~bksdm.world.teacher_recipe.LATENT_SCALE` for why less);
2. the text encoder and the U-Net *jointly* from scratch (there is no pretrained CLIP for this world), with SD's
   noise schedule and SD-2's v-prediction objective, 10% of captions dropped to "" for classifier-free guidance,
   a share of extra timesteps from the noisiest fifth, and an EMA of the weights.

   Why v-prediction: with SD-1's epsilon objective the U-Net learnt shape, colour and size but never the
   position words (position accuracy at chance, 0.25-0.28, after 1,000-2,500 steps, in every weighting we tried).
   Position is decided in the first, noisiest sampling steps, where an epsilon network's x0 estimate is its
   output times 1/sqrt(alpha_bar) (12x at t=961): the loss barely sees the layout there. A v network outputs
   about -x0 there, so the layout is learnt at full weight: position accuracy was 0.79 after 500 steps.
3. evaluation on held-out (prompt, seed) pairs: every scene of :func:`shapes.all_scenes` once, noise seed
   10000 + i, 25 PNDM steps, several guidance scales, judged by the attribute classifier; the best scale is
   shipped as the recommended one.

Training data are world seeds 1 (VAE) and 2 (U-Net); evaluation uses fresh noise seeds, so no evaluated sample
was seen in training (the 96 captions themselves are the whole world and are all seen, as with any prompt set
drawn from a training distribution). Checkpoints go to ``--work-dir`` every ``--checkpoint-every`` steps and a
rerun with the same arguments resumes from them. ``--eval-only`` re-evaluates an existing folder and updates its
``bksdm_toy.json``.

The settings and the reasons for their defaults are in :mod:`bksdm.world.teacher_recipe`; the evaluation and the
settings record in :mod:`bksdm.world.teacher_eval`.
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
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from bksdm.artifacts import atomic_file
from bksdm.world import shapes
from bksdm.world.teacher import build_untrained_teacher, load_teacher, training_scheduler
from bksdm.world.teacher_eval import (
    evaluate,
    machine,
    parameter_counts,
    save_grid,
    write_settings,
)
from bksdm.world.teacher_loop import Clock, LoopSettings, quick_evaluation, train_modules
from bksdm.world.teacher_recipe import (
    CAPTION_DROPOUT,
    MIN_SNR_GAMMA,
    UNET_WORLD_SEED,
    VAE_WORLD_SEED,
    TeacherRecipe,
    parse_args,
)

logger = logging.getLogger("bksdm.world.train_teacher")


# ------------------------------------------------------------------------------------------------ data


def world_batch(world_seed: int, start: int, count: int) -> tuple[torch.Tensor, list[int]]:
    """Pairs ``start .. start+count-1`` of a world seed: images (N, 3, 64, 64) in [-1, 1] and scene indices."""
    scene_index = {scene: i for i, scene in enumerate(shapes.all_scenes())}
    images, labels = [], []
    for index in range(start, start + count):
        image, scene = shapes.sample(world_seed, index)
        images.append(image)
        labels.append(scene_index[scene])
    return torch.from_numpy(shapes.to_array(images)), labels


def caption_ids(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """Token ids (97, 77) of every caption of :func:`shapes.all_scenes` and, last, of "" (the unconditional one),
    padded exactly as ``StableDiffusionPipeline.encode_prompt`` pads them."""
    captions = [scene.caption for scene in shapes.all_scenes()] + [""]
    tokenizer = pipe.tokenizer
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ------------------------------------------------------------------------------------------------ VAE


def train_vae(vae: AutoencoderKL, steps: int, batch: int, lr: float, kl_weight: float, seed: int) -> None:
    """Stage 1: reconstruction training of the VAE on fresh world pairs (never the same image twice)."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        images, _ = world_batch(VAE_WORLD_SEED, step * batch, batch)  # (B, 3, 64, 64)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss_rec = F.mse_loss(recon, images)
        loss_kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent value
        loss = loss_rec + kl_weight * loss_kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(rec=f"{loss_rec.item():.5f}", kl=f"{loss_kl.item():.3f}", refresh=False)
        if step % 200 == 0 or step == steps - 1:
            logger.info("vae step %d/%d: mse %.5f, kl/value %.3f", step + 1, steps, loss_rec.item(), loss_kl.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_world(vae: AutoencoderKL, count: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Posterior mean and std (N, 4, 16, 16) of ``count`` U-Net training images, unscaled, and their scene ids."""
    means, stds, labels = [], [], []
    for start in tqdm(range(0, count, chunk), desc="encode", mininterval=5):
        images, batch_labels = world_batch(UNET_WORLD_SEED, start, min(chunk, count - start))
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        labels += batch_labels
    return torch.cat(means), torch.cat(stds), labels


def prepare_vae(pipe: StableDiffusionPipeline, recipe: TeacherRecipe, work_dir: Path, clock: Clock):
    """Stage 1 (or its checkpoint ``work_dir/vae.pt``): the trained, frozen VAE with its ``scaling_factor`` set.

    Returns:
        The U-Net's training data: posterior means and stds of ``recipe.train_images`` images and their scene ids.
    """
    vae_file = work_dir / "vae.pt"
    if vae_file.is_file():
        state = torch.load(vae_file, weights_only=True)
        pipe.vae.load_state_dict(state["vae"])
        latent_std = float(state["latent_std"])
        clock.before = state.get("spent", clock.before)
        pipe.vae.eval().requires_grad_(False)
        logger.info("loaded the trained VAE from %s", vae_file)
        means, stds, labels = encode_world(pipe.vae, recipe.train_images)
    else:
        train_vae(pipe.vae, recipe.vae_steps, recipe.vae_batch, recipe.vae_lr, recipe.kl_weight, recipe.seed)
        means, stds, labels = encode_world(pipe.vae, recipe.train_images)
        generator = torch.Generator().manual_seed(recipe.seed)
        latent_std = float((means + stds * torch.randn(means.shape, generator=generator)).std())
        with atomic_file(vae_file) as partial:
            torch.save({"vae": pipe.vae.state_dict(), "latent_std": latent_std, "spent": clock.spent()}, partial)
        if recipe.grid_dir:  # top row: real images; bottom row: their reconstructions
            with torch.no_grad():
                images, _ = world_batch(UNET_WORLD_SEED, 0, 8)
                recon = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mean).sample
            both = torch.cat([images, recon]).clamp(-1, 1)
            save_grid(pipe.image_processor.postprocess(both, output_type="pil"), Path(recipe.grid_dir) / "vae.png")
    # SD scales its latents to unit variance (0.18215 = 1/std); we scale them to std LATENT_SCALE (see there).
    pipe.vae.register_to_config(scaling_factor=round(recipe.latent_scale / latent_std, 5))
    logger.info("VAE ready: scaling_factor %.5f after %.0f s", pipe.vae.config.scaling_factor, clock.spent()["wall"])
    return means, stds, labels


# ------------------------------------------------------------------------------------- text + U-Net


def sample_timesteps(count: int, high_share: float, high_from: int, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps (count,): uniform over SD's 1000, but a share ``high_share`` from [high_from, 1000).

    The noisiest steps are where x_t no longer shows where the shape is, so the only steps where the prompt's
    position words can be learned; uniform sampling draws them too rarely (see HIGH_T_SHARE).
    """
    uniform = torch.randint(1000, (count,), generator=generator)
    high = torch.randint(high_from, 1000, (count,), generator=generator)
    return torch.where(torch.rand(count, generator=generator) < high_share, high, uniform)


def train_denoiser(
    pipe: StableDiffusionPipeline,
    data: tuple[torch.Tensor, torch.Tensor, list[int]],
    recipe: TeacherRecipe,
    work_dir: Path,
    clock: Clock,
) -> None:
    """Stage 2: the text encoder and the U-Net trained jointly on cached latents (:func:`train_modules`); leaves the
    EMA weights in ``pipe``. Resumes from ``work_dir/denoiser.pt`` (written every ``recipe.checkpoint_every`` steps).
    """
    unet, text_encoder = pipe.unet, pipe.text_encoder
    scale = pipe.vae.config.scaling_factor
    means, stds, labels = data
    labels_t = torch.tensor(labels)
    ids = caption_ids(pipe)  # (97, 77); row 96 is ""
    noise_scheduler = training_scheduler(pipe.scheduler.config.prediction_type)

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(labels), (recipe.batch,), generator=generator)
        eps = torch.randn(means[pick].shape, generator=generator)
        latents = (means[pick] + stds[pick] * eps) * scale  # (B, 4, 16, 16), std LATENT_SCALE
        captions = labels_t[pick].clone()
        captions[torch.rand(recipe.batch, generator=generator) < CAPTION_DROPOUT] = len(ids) - 1
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = sample_timesteps(recipe.batch, recipe.high_t_share, recipe.high_t_from, generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(ids[captions])[0]  # (B, 77, TEXT_WIDTH)
        pred = unet(noisy, timesteps, encoder_hidden_states).sample
        if noise_scheduler.config.prediction_type == "v_prediction":
            # Plain v-MSE: at the noisiest steps v is about -x0, so the layout the prompt asks for is learned
            # with full weight there, where an epsilon network must be exact to 1/sqrt(alpha_bar) (12x at t=961)
            # for its x0 to be right (Salimans & Ho 2022; SD-2's objective).
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
            return F.mse_loss(pred, target)
        return _weighted_epsilon_loss(pred, noise, timesteps, noise_scheduler, recipe)

    settings = LoopSettings(
        "unet", recipe.unet_steps, recipe.lr, recipe.warmup, recipe.seed, recipe.checkpoint_every, recipe.eval_every
    )
    modules = {"unet": unet, "text_encoder": text_encoder}
    train_modules(
        modules,
        settings,
        batch_loss,
        work_dir / "denoiser.pt",
        clock,
        lambda step: quick_evaluation(pipe, step, [5.0], recipe.grid_dir),
    )


def _weighted_epsilon_loss(pred, noise, timesteps, noise_scheduler, recipe: TeacherRecipe) -> torch.Tensor:
    """Epsilon loss weighted by clamp(SNR, floor, gamma) / SNR, i.e. the x0 error weighted by clamp(SNR, floor,
    gamma), with SNR that of the data: SD's alpha_bar / (1 - alpha_bar) times the latent variance. The cap is
    min-SNR-gamma (Hang et al. 2023); the floor (cf. Salimans & Ho 2022's truncated SNR weighting) keeps the
    noisiest steps, where the layout (position) is decided from the prompt, from weighing almost nothing."""
    snr = compute_snr(noise_scheduler, timesteps) * recipe.latent_scale**2
    weight = torch.clamp(snr, min=recipe.snr_floor, max=MIN_SNR_GAMMA) / snr
    return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()


# -------------------------------------------------------------------------------------------------- main


def train_teacher(recipe: TeacherRecipe, command: str) -> dict[str, Any]:
    """Trains (or, with ``recipe.eval_only``, re-evaluates) a teacher into ``recipe.out``.

    Args:
        recipe: The run's settings.
        command: The command line recorded in ``bksdm_toy.json``.

    Returns:
        The settings written to ``recipe.out/bksdm_toy.json``.
    """
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    out = Path(recipe.out)
    if recipe.eval_only:
        return write_settings(out, evaluate(load_teacher(path=out), recipe.guidance, recipe.grid_dir), {})

    clock = Clock()
    work_dir = Path(recipe.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_untrained_teacher(recipe.seed, prediction_type=recipe.prediction_type)
    data = prepare_vae(pipe, recipe, work_dir, clock)
    train_denoiser(pipe, data, recipe, work_dir, clock)
    trained = clock.spent()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    accuracies = evaluate(pipe, recipe.guidance, recipe.grid_dir)
    record = {
        "training": {
            "command": command,
            "wall_time_s": round(trained["wall"]),
            "cpu_time_s": round(trained["cpu"]),  # below wall time x threads when the machine was shared
            "wall_time_including_evaluation_s": round(clock.spent()["wall"]),
            "machine": machine(),
            "data": f"shapes world seeds {VAE_WORLD_SEED} (VAE) and {UNET_WORLD_SEED} ({recipe.train_images} images)",
        },
        "parameters": parameter_counts(pipe),
    }
    return write_settings(out, accuracies, record)


def main(argv: Sequence[str] | None = None) -> None:
    recipe = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m bksdm.world.train_teacher " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = train_teacher(recipe, command)
    if not recipe.eval_only:
        logger.info("saved the teacher to %s: %s", recipe.out, json.dumps(settings["sampling"]))


if __name__ == "__main__":
    main()
