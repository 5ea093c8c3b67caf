"""SDXL on the same seam (issue 13, item 8): a KOALA-style student (reduced transformer depth, self-attention
feature KD) distilled through the CLI, and ``bksdm cache`` with both text encoders and the pooled embedding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import make_shapes
from diffusers import StableDiffusionXLPipeline
from test_train import overrides

from bksdm.cli import main
from bksdm.train.batches import make_loader, prepare_batch
from bksdm.train.config import load_config
from bksdm.train.distill import TrainingSetupError, load_models
from bksdm.train.kd import LossWeights, draw_noise, kd_step
from bksdm.world.tiny_dit import save_tiny_dit_pipeline

PLAN = """name: tiny-sdxl-koala
base: bk-base
transformer_blocks:
  down_blocks.2.attentions.*: first:2
  up_blocks.0.attentions.*: first:2
  mid_block.attentions.0: first:2
"""


@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_dir) -> Path:
    return tiny_sdxl_dir


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def test_koala_style_student_distils_with_self_attention_features(sdxl_dir, shapes_dir, tmp_path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "run"
    args = overrides(sdxl_dir, shapes_dir, out, model__plan=plan, loss__feature_sites="self_attention")
    assert main(["distill", *args]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "student")
    assert list(pipe.unet.config.transformer_layers_per_block) == [1, 2, 2]  # the teacher's innermost: 3
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["loss_kd_feat"] > 0 for r in records)
    image = pipe("a red circle", num_inference_steps=2, height=128, width=128, output_type="np").images[0]
    assert image.shape == (128, 128, 3)


def test_self_attention_sites_are_refused_for_a_transformer_teacher(shapes_dir, tmp_path) -> None:
    teacher = save_tiny_dit_pipeline(tmp_path / "sd3", "sd3")
    cfg = load_config(
        None,
        overrides(teacher, shapes_dir, tmp_path / "run", model__plan="keep-half", loss__feature_sites="self_attention"),
    )
    with pytest.raises(TrainingSetupError, match="feature_sites=self_attention reads a U-Net"):
        load_models(cfg, torch.device("cpu"), torch.float32)


def test_sdxl_cache_holds_both_encoders_and_the_pooled_embedding(sdxl_dir, shapes_dir, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    assert main(["cache", "--out", str(cache), "--dtype", "fp32", *overrides(sdxl_dir, shapes_dir, tmp_path)[:5]]) == 0
    meta = json.loads((cache / "cache.json").read_text())
    assert meta.get("pooled", meta.get("sdxl")) and meta["family"] == "unet"
    raw_cfg = load_config(
        None, overrides(sdxl_dir, shapes_dir, tmp_path / "x", train__batch_size=4, model__plan="bk-small")
    )
    cached_cfg = load_config(
        None,
        overrides(sdxl_dir, shapes_dir, tmp_path / "x", train__batch_size=4, model__plan="bk-small", data__cache=cache),
    )
    models = load_models(raw_cfg, torch.device("cpu"), torch.float32)
    models.student.eval()
    raw = next(iter(make_loader(raw_cfg, 0, 1, start_micro_step=3)))
    cached = next(iter(make_loader(cached_cfg, 0, 1, start_micro_step=3)))
    a = prepare_batch(raw, models, raw_cfg, torch.device("cpu"))
    b = prepare_batch(cached, models, cached_cfg, torch.device("cpu"))
    # Both encoders' penultimate states, concatenated (32 + 64 wide in the tiny SDXL), and encoder 2's pooled output.
    assert a["text"].shape == b["text"].shape == (4, 77, 96)
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(a["added_cond_kwargs"][key], b["added_cond_kwargs"][key], rtol=1e-5, atol=1e-5)
    assert a["added_cond_kwargs"]["text_embeds"].shape == (4, 32)
    losses = []
    for prepared in (a, b):
        t, noise, eps = draw_noise(1, 3, prepared["positions"], tuple(prepared["mean"].shape[1:]), 1000, "cpu")
        latents = (prepared["mean"] + prepared["std"] * eps) * models.pipe.vae.config.scaling_factor
        with torch.no_grad():
            loss = kd_step(
                models.student, models.teacher, models.scheduler, latents, prepared["text"], t, noise,
                models.feature_pairs, LossWeights(), prepared["added_cond_kwargs"],
            )["loss"]  # fmt: skip
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


NEW_RECIPES = {  # recipe -> (architecture preset its teacher has, student denoiser parameters)
    "sd3.5-medium-keep-half": ("sd3.5-medium", 1_107_717_952),
    "flux.1-dev-keep-third": ("flux.1-dev", 3_943_806_272),
    "sdxl-koala-style": ("sdxl-base", 1_022_160_964),
}


@pytest.mark.parametrize("name", sorted(NEW_RECIPES))
def test_transformer_and_sdxl_recipes_load_and_their_plans_fit_the_published_teachers(name) -> None:
    from bksdm.families import family_of
    from bksdm.loading import load_plan
    from bksdm.plan.archs import get_arch

    root = Path(__file__).resolve().parents[2]
    path = root / "configs" / "distill" / f"{name}.yaml"
    cfg = load_config(path)  # unknown keys or wrong types fail here
    header = path.read_text().split("\n\n")[0]
    rel = f"configs/distill/{path.name}"
    assert f"bksdm distill --config {rel}" in header and "accelerate launch --multi_gpu -m bksdm.cli distill" in header
    assert "bksdm cache --out" in header and cfg.train.output_dir == f"runs/{name}"
    arch, params = NEW_RECIPES[name]
    config = dict(get_arch(arch).denoiser_config)
    family = family_of(config)
    plan = load_plan(root / cfg.model.plan if cfg.model.plan.endswith(".yaml") else cfg.model.plan)
    with torch.device("meta"):
        student = family.build(family.resolve(plan, config).student_config())
    assert sum(v.numel() for v in student.parameters()) == params
    assert f"{params:,}" in header  # the documented count is the measured one
