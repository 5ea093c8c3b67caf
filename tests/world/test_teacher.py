"""The bundled shapes teacher: a stock SD pipeline folder, SD-v1's exact block layout, and it draws what it is told."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from bksdm.plan.archs import get_arch
from bksdm.plan.resolved import resolve
from bksdm.plan.spec import PRESETS
from bksdm.plan.surgery import shapes_of, weight_map
from bksdm.world import shapes
from bksdm.world.teacher import (
    SETTINGS_FILE,
    TEACHER_DIR,
    build_untrained_teacher,
    load_teacher,
    recommended_settings,
    teacher_configs,
)
from bksdm.world.teacher_eval import EVAL_SEED, held_out_images

TEST_SEED = 20_000
"""Noise seeds of this test's pairs: disjoint from the pairs the shipped guidance scale was chosen on."""


@pytest.fixture(scope="module")
def teacher() -> StableDiffusionPipeline:
    return load_teacher()


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def test_shipped_folder_loads_with_stock_diffusers(teacher: StableDiffusionPipeline) -> None:
    # Stock loading, no custom code: the classes diffusers/transformers pick from model_index.json.
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER_DIR)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None
    assert sorted(p.parent.name for p in TEACHER_DIR.rglob("*.safetensors")) == ["text_encoder", "unet", "vae"]
    assert not list(TEACHER_DIR.rglob("*.bin")) and not list(TEACHER_DIR.rglob("*.pt"))
    # Every shapes word is one token, and prompts are padded to CLIP's 77 like SD's.
    ids = pipe.tokenizer("a small red circle at the top left").input_ids
    assert len(ids) == 2 + 8 and pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size * pipe.vae_scale_factor == shapes.IMAGE_SIZE


def test_folder_is_at_most_30_mb() -> None:
    size = sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MiB"


def test_uses_sd_noise_schedule_and_sampler(teacher: StableDiffusionPipeline) -> None:
    reference = get_arch("sd-v1.4").scheduler_config
    config = teacher.scheduler.config
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset", "set_alpha_to_one"):
        assert config[key] == reference[key], key
    assert config["skip_prk_steps"] is True and type(teacher.scheduler).__name__ == "PNDMScheduler"  # SD-v1.4's
    # SD-2's objective on the same schedule (SD-2.1 at 768 px: v-prediction, identical betas).
    sd2 = get_arch("sd-v2.1").scheduler_config
    assert config["prediction_type"] == sd2["prediction_type"] == "v_prediction"
    assert (sd2["beta_start"], sd2["beta_end"], sd2["beta_schedule"]) == (
        config["beta_start"],
        config["beta_end"],
        config["beta_schedule"],
    )


def test_other_samplers_made_from_its_config_do_not_clip_latents(teacher: StableDiffusionPipeline) -> None:
    """As in SD's configs, clip_sample is off: a DDIM scheduler made by name (``bksdm generate --scheduler``)
    used to clip the teacher's latents (|z| up to 2.9) to [-1, 1], which spoilt img2img at low strength (and
    diffusers warns about configs that lack the key). DDIM then draws what it is asked."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from bksdm.eval.generate import generate_images
    from bksdm.world.classifier import load_classifier, prompt_accuracy

    ddim = DDIMScheduler.from_config(teacher.scheduler.config)
    assert ddim.config.clip_sample is False and ddim.config.prediction_type == "v_prediction"
    pipe = StableDiffusionPipeline(**{**teacher.components, "scheduler": ddim})
    pipe.set_progress_bar_config(disable=True)
    prompts = [scene.caption for scene in shapes.all_scenes()[::12]]  # 8 scenes
    images = generate_images(pipe, prompts, [TEST_SEED + i for i in range(8)], **_sampling())
    assert prompt_accuracy(load_classifier(), images, prompts) >= 0.75


def _sampling() -> dict:
    settings = recommended_settings()
    return {"steps": settings["num_inference_steps"], "guidance_scale": settings["guidance_scale"]}


def test_unet_has_sd_v1_block_layout(teacher: StableDiffusionPipeline) -> None:
    ours, sd = dict(teacher.unet.config), get_arch("sd-v1.4").unet_config
    for key in ("down_block_types", "up_block_types", "layers_per_block", "in_channels", "out_channels"):
        assert ours[key] == sd[key], key
    assert ours["mid_block_type"] in (None, "UNetMidBlock2DCrossAttn") and sd.get("mid_block_type") in (
        None,
        "UNetMidBlock2DCrossAttn",
    )
    assert ours["cross_attention_dim"] == teacher.text_encoder.config.hidden_size
    assert ours["block_out_channels"][2] == ours["block_out_channels"][3]  # like SD's 1280, 1280
    assert ours["use_linear_projection"] == sd.get("use_linear_projection", False)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_applies_exactly_as_to_sd_v1_4(teacher: StableDiffusionPipeline, preset: str) -> None:
    ours = resolve(PRESETS[preset], dict(teacher.unet.config))
    sd = resolve(PRESETS[preset], get_arch("sd-v1.4").unet_config)
    # Same teacher blocks removed, same student address for every kept one, same feature-KD locations.
    assert ours.block_fates() == sd.block_fates()
    assert [(p.teacher, p.student, p.downscale) for p in ours.feature_pairs()] == [
        (p.teacher, p.student, p.downscale) for p in sd.feature_pairs()
    ]
    student = ours.student_config()
    for key in ("down_block_types", "up_block_types", "layers_per_block", "mid_block_type"):
        assert student[key] == sd.student_config()[key], key
    teacher_shapes = shapes_of(teacher.unet)
    wm = weight_map(ours, shapes_of(_meta_unet(student)), teacher_shapes)
    assert wm.problems == []
    if preset == "identity":
        assert wm.unused == () and wm.sources == {k: k for k in teacher_shapes}


def test_builders_match_the_shipped_folder(teacher: StableDiffusionPipeline) -> None:
    """teacher.py's configs are what was trained, so a retrain reproduces the shipped structure."""
    fresh = build_untrained_teacher(seed=0)
    for name in ("unet", "vae"):
        shipped = {k: v for k, v in getattr(teacher, name).config.items() if not k.startswith("_")}
        built = {k: v for k, v in getattr(fresh, name).config.items() if not k.startswith("_")}
        shipped.pop("scaling_factor", None)
        built.pop("scaling_factor", None)
        assert shipped == built, name
        assert shapes_of(getattr(teacher, name)) == shapes_of(getattr(fresh, name))
    assert shapes_of(teacher.text_encoder) == shapes_of(fresh.text_encoder)
    assert teacher.text_encoder.config.hidden_size == teacher_configs()["text_encoder"]["hidden_size"]
    # scaling_factor was measured (LATENT_SCALE / std of real latents), not left at the initial 1.0.
    assert teacher.vae.config.scaling_factor != 1.0


def test_settings_record_provenance_and_accuracy() -> None:
    record = json.loads((TEACHER_DIR / SETTINGS_FILE).read_text())
    settings = recommended_settings()
    assert settings["num_inference_steps"] == 25
    assert settings["guidance_scale"] == record["sampling"]["guidance_scale"]
    assert record["training"]["command"].startswith("python -m bksdm.world.train_teacher")
    assert record["training"]["wall_time_s"] > 0 and record["training"]["machine"]
    accuracy = record["evaluation"]["prompt_accuracy_by_guidance_scale"][str(settings["guidance_scale"])]
    assert accuracy >= 0.8


def test_teacher_draws_what_it_is_asked(teacher: StableDiffusionPipeline) -> None:
    classifier = pytest.importorskip("bksdm.world.classifier")
    settings = recommended_settings()
    # 24 of the 96 scenes, spread by a fixed draw (every shape, colour, size and position occurs), with noise
    # seeds the guidance scale was not chosen on.
    picks = np.random.default_rng(0).choice(len(shapes.all_scenes()), size=24, replace=False)
    scenes = [shapes.all_scenes()[i] for i in picks]
    seeds = [TEST_SEED + int(i) for i in picks]
    assert not set(seeds) & {EVAL_SEED + i for i in range(96)}
    images = held_out_images(
        teacher, scenes, seeds, settings["guidance_scale"], settings["num_inference_steps"], batch_size=24
    )
    assert all(image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) for image in images)
    accuracy = classifier.prompt_accuracy(classifier.load_classifier(), images, [s.caption for s in scenes])
    assert accuracy >= 0.75, accuracy
    # Not a fixed drawing per prompt: the same prompt with two seeds gives two different images.
    again = held_out_images(teacher, scenes[:1], [seeds[0] + 1], settings["guidance_scale"], 25)
    assert not np.array_equal(np.asarray(again[0]), np.asarray(images[0]))
