"""The embedded teacher: a tiny text-to-image model with exactly Stable Diffusion's structure, trained on shapes.

It is what a newcomer with no GPU and no network distils from, and what the tests use to check that distillation
really works, so it must both *be* Stable Diffusion in every structural respect and *draw* what it is asked for:

- a ``CLIPTokenizer`` (the tiny offline vocabulary of :func:`bksdm.world.tiny.build_tiny_tokenizer`, which encodes
  every shapes-world word as one token) and a ``CLIPTextModel`` trained from scratch, since no pretrained CLIP
  exists for this world;
- an ``AutoencoderKL`` whose ``scaling_factor`` scales its latents on real shapes to a fixed standard deviation
  (SD scales to 1; we scale to 0.35, see :data:`bksdm.world.teacher_recipe.LATENT_SCALE`);
- a ``UNet2DConditionModel`` with SD-v1's block layout: 4 stages, cross-attention in the outer three, 2 layers
  per down stage (3 per up stage), a ``UNetMidBlock2DCrossAttn``; so every BK preset resolves against it exactly
  as against SD-v1.4 (same addresses, same removed blocks), only narrower;
- SD's noise schedule (scaled-linear betas 0.00085 → 0.012 over 1000 steps, shared by SD-1 and SD-2), SD-2's
  v-prediction objective (SD-2.x at 768 px is v-prediction with this very schedule) and SD-v1.4's sampler
  (PNDM with PLMS steps only). Every bksdm command handles both objectives; for why v rather than SD-1's
  epsilon, see :mod:`bksdm.world.train_teacher`.

The trained weights live in ``assets/teacher`` as a plain diffusers folder (``StableDiffusionPipeline
.from_pretrained`` loads it with no custom code), next to ``bksdm_toy.json`` which records the sampling settings
to use, the command that trained it, how long that took on what machine and the measured prompt accuracy.
:mod:`bksdm.world.train_teacher` re-creates it. This module only builds and loads: no training, no writing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bksdm.artifacts import MODEL_RECORD_FILE
from bksdm.world.shapes import IMAGE_SIZE
from bksdm.world.tiny import build_tiny_tokenizer

__all__ = [
    "LATENT_SIZE",
    "SETTINGS_FILE",
    "TEACHER_DIR",
    "VAE_SCALE_FACTOR",
    "build_untrained_teacher",
    "load_teacher",
    "recommended_settings",
    "teacher_configs",
    "training_scheduler",
]

TEACHER_DIR = Path(__file__).parent / "assets" / "teacher"
"""The shipped, trained teacher: a diffusers ``StableDiffusionPipeline`` folder."""

SETTINGS_FILE = MODEL_RECORD_FILE
"""File in :data:`TEACHER_DIR` with the recommended sampling settings and the teacher's provenance."""

VAE_SCALE_FACTOR = 4
"""Image side / latent side. SD's VAE has 4 stages (x8); ours has 3 (x4), see :func:`teacher_configs`."""

LATENT_SIZE = IMAGE_SIZE // VAE_SCALE_FACTOR
"""Latent side (16): with SD's three U-Net downsamplers the stages run at 16, 8, 4 and 2."""

TEXT_WIDTH = 64
"""Hidden size of the text encoder, hence the U-Net's ``cross_attention_dim`` (SD-v1: 768)."""

# SD-v1.4 widths are (320, 640, 1280, 1280). Ours keep the pattern "last two stages equally wide", so a bug that
# confuses stage 2 with stage 3 is not caught by a shape mismatch here either. 32 at the 16x16 stage keeps one
# training step and one sampling step cheap on a CPU, which the distillation demo depends on.
_UNET_CHANNELS = (32, 64, 64, 64)
_NORM_GROUPS = 8  # SD: 32 groups of 10+ channels; 8 divides every width and skip concatenation used here

# SD's training noise schedule (the one its U-Net was trained with and every SD scheduler config carries).
_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
PREDICTION_TYPE = "v_prediction"
"""The teacher's objective: SD-2's v-prediction, on SD's (SD-1 and SD-2 share it) noise schedule. See
:mod:`bksdm.world.train_teacher` for why not SD-1's epsilon."""

_DEFAULT_SETTINGS: dict[str, Any] = {"num_inference_steps": 25, "guidance_scale": 5.0}


def teacher_configs() -> dict[str, dict[str, Any]]:
    """Return the config of every model component of the teacher.

    Returns:
        ``{"unet": ..., "vae": ..., "text_encoder": ..., "scheduler": ...}``: keyword arguments of
        ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextConfig`` (without the token ids, which come from
        the tokenizer) and ``PNDMScheduler``.
    """
    unet = {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        # SD-v1's layout: cross-attention in the three outer stages, none in the innermost, 2 layers per block.
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(_UNET_CHANNELS),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": _NORM_GROUPS,
        "norm_eps": 1e-5,
        "cross_attention_dim": TEXT_WIDTH,
        # diffusers' legacy name for the head count (SD-v1: 8 heads everywhere, so 40/80/160-wide heads); 2 heads
        # of 16/32/32 channels here: more heads of 4-8 channels train slower on a CPU (measured) for no gain.
        "attention_head_dim": 2,
        "use_linear_projection": False,
        "upcast_attention": False,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        # 3 stages (x4) rather than SD's 4 (x8): a 64-pixel image then has a 16x16 latent, the same 16-16-8-4-2
        # ladder as the tiny test U-Nets, and the innermost U-Net stage still sees 2x2 rather than 1x1 (at x8 it
        # would be 8 -> 1x1, where BK-Tiny's "drop the innermost stage" would be untestable on spatial features).
        # SD's compression (48 pixel values per latent value) is lower here: 12, plenty for flat shapes.
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        # SD: (128, 256, 512, 512). 16 at full resolution: the 64x64 convolutions dominate the VAE's cost, and
        # flat shapes need few channels there.
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,  # SD: 2
        "act_fn": "silu",
        "norm_num_groups": _NORM_GROUPS,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": 1.0,  # set by training to 1/std of the latents, as SD's 0.18215 was
        "force_upcast": False,
    }
    text_encoder = {
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 4 * TEXT_WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,  # CLIP's context: SD pipelines pad every prompt to 77 tokens
        "hidden_act": "quick_gelu",  # CLIP ViT-L's, as in SD-v1
        "projection_dim": TEXT_WIDTH,
    }
    # clip_sample=False as in SD's scheduler configs: a DDIM scheduler made from this config by name must not clip
    # latents to [-1, 1] (the teacher's reach 2.9), which damages every image.
    scheduler = {
        **_SCHEDULE,
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def training_scheduler(prediction_type: str = PREDICTION_TYPE) -> DDPMScheduler:
    """SD's training noise schedule as a ``DDPMScheduler`` (what ``add_noise`` and the loss use)."""
    return DDPMScheduler(**{**_SCHEDULE, "prediction_type": prediction_type})


def _text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|startoftext|>", "<|endoftext|>")}
    return CLIPTextConfig(
        **teacher_configs()["text_encoder"],
        vocab_size=len(tokenizer),
        # Real ids, so the pooled output is read at the first end-of-text token as CLIP does.
        bos_token_id=ids["<|startoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def build_untrained_teacher(seed: int = 0, prediction_type: str = PREDICTION_TYPE) -> StableDiffusionPipeline:
    """Build the teacher pipeline with freshly initialised weights (the starting point of training).

    Args:
        seed: Seed of the initial weights; the caller's global RNG state is left untouched.
        prediction_type: What the U-Net predicts (``v_prediction`` or ``epsilon``), recorded in the scheduler.

    Returns:
        A ``StableDiffusionPipeline`` on CPU in eval mode, with no safety checker.
    """
    configs = teacher_configs()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(_text_encoder_config(tokenizer))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        # from_config keeps clip_sample (PNDM does not take it) for the schedulers made from this one by name
        scheduler=PNDMScheduler.from_config({**configs["scheduler"], "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_teacher(device: str | torch.device = "cpu", path: str | Path | None = None) -> StableDiffusionPipeline:
    """Load the shipped teacher (or another folder written by :mod:`bksdm.world.train_teacher`).

    Args:
        device: Where to put the models.
        path: A teacher folder; defaults to :data:`TEACHER_DIR`.

    Returns:
        The stock ``StableDiffusionPipeline``, progress bar off.

    Raises:
        FileNotFoundError: If the folder holds no pipeline.
    """
    path = Path(path) if path is not None else TEACHER_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no teacher pipeline in {path}; train one with `python -m bksdm.world.train_teacher --out {path}`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(path).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recommended_settings(path: str | Path | None = None) -> dict[str, Any]:
    """Return the sampling settings the teacher was validated with.

    Args:
        path: A teacher folder; defaults to :data:`TEACHER_DIR`.

    Returns:
        ``{"num_inference_steps": int, "guidance_scale": float}``, ready to pass to the pipeline, plus
        ``"height"``/``"width"``. Defaults (25 steps, guidance 5) when the folder has no settings file.
    """
    from bksdm.sampling import sampling_defaults  # the one reader of a model's recorded sampling settings

    path = Path(path) if path is not None else TEACHER_DIR
    settings = dict(_DEFAULT_SETTINGS)
    if (path / SETTINGS_FILE).is_file():
        recorded = sampling_defaults(path)
        settings.update(num_inference_steps=recorded.steps, guidance_scale=recorded.guidance_scale)
    settings.update(height=IMAGE_SIZE, width=IMAGE_SIZE)
    return settings
