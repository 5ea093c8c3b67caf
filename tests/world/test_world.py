"""The embedded shapes world: distillation measurably raises a pruned student's agreement with its teacher."""

from __future__ import annotations

import json

import pytest
import torch

from bksdm.cli import main
from bksdm.eval.generate import generate_images
from bksdm.loading import BUNDLED_TEACHER
from bksdm.world.shapes import all_scenes, export


def agreement(teacher_images, student_images, classifier) -> float:
    """Share of prompt/seed pairs where the classifier reads the same four attributes in both images."""
    from bksdm.world.classifier import predict

    return sum(
        a == b for a, b in zip(predict(classifier, teacher_images), predict(classifier, student_images), strict=True)
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from bksdm.world.classifier import load_classifier
    from bksdm.world.teacher import load_teacher, recommended_settings

    teacher = load_teacher()
    teacher.set_progress_bar_config(disable=True)
    scenes = all_scenes()[::4]  # 24 scenes covering every shape, colour, size and position
    prompts = [s.caption for s in scenes]
    seeds = [70_000 + i for i in range(len(prompts))]
    guidance = recommended_settings()["guidance_scale"]
    images = generate_images(teacher, prompts, seeds, steps=15, guidance_scale=guidance, batch_size=24)
    data = export(tmp_path_factory.mktemp("shapes") / "data", 800, seed=5)
    return {
        "teacher": teacher,
        "prompts": prompts,
        "seeds": seeds,
        "guidance": guidance,
        "images": images,
        "classifier": load_classifier(),
        "data": data,
    }


@pytest.mark.slow
def test_short_distillation_raises_agreement_with_the_teacher(world, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    from bksdm.plan.surgery import build_student

    def student_agreement(unet) -> int:
        pipe = StableDiffusionPipeline(**{**world["teacher"].components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
        images = generate_images(
            pipe, world["prompts"], world["seeds"], steps=15, guidance_scale=world["guidance"], batch_size=24
        )
        return agreement(world["images"], images, world["classifier"])

    pruned = build_student(world["teacher"].unet, _plan("bk-tiny")).student
    before = student_agreement(pruned)
    out = tmp_path / "run"
    args = [
        "distill",
        f"data.train={world['data']}",
        "data.resolution=64",
        "data.num_workers=0",
        "model.plan=bk-tiny",
        f"train.output_dir={out}",
        "train.max_steps=120",
        "train.batch_size=32",
        "train.mixed_precision=no",
        "train.gradient_accumulation_steps=1",
        "train.gradient_checkpointing=false",
        "train.validate_every=0",
        "train.checkpoint_every=0",
        "train.use_ema=false",
        "optim.lr=5e-4",
        "train.log_every=20",
    ]
    assert main(args) == 0  # no model.teacher: the bundled teacher is the default
    trained = StableDiffusionPipeline.from_pretrained(out / "student").unet
    after = student_agreement(trained)
    assert after >= before + 4, (before, after)  # out of 24 prompt/seed pairs


def _plan(name: str):
    from bksdm.plan.spec import PRESETS

    return PRESETS[name]


def test_bundled_teacher_is_the_default_of_prune_and_plan_show(tmp_path, capsys) -> None:
    out = tmp_path / "student"
    assert main(["prune", "--plan", "bk-small", "--out", str(out)]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["teacher"] == str(BUNDLED_TEACHER)
    assert main(["plan", "show", "bk-tiny", "--teacher", str(BUNDLED_TEACHER)]) == 0
    assert "mid_block" in capsys.readouterr().out


def test_teacher_and_classifier_weights_are_small_and_load_in_stock_diffusers() -> None:
    from diffusers import StableDiffusionPipeline

    size = sum(p.stat().st_size for p in BUNDLED_TEACHER.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED_TEACHER)
    assert pipe.unet.config.down_block_types[-1] == "DownBlock2D" and pipe.unet.config.layers_per_block == 2
    with torch.no_grad():
        image = pipe("a big blue square at the top left", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
