"""The SD3-shaped shapes teacher: a short transformer distillation measurably raises a half-depth student's agreement
with its teacher (the transformer counterpart of ``test_world.py``)."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusion3Pipeline

from bksdm.cli import main
from bksdm.eval.generate import generate_images
from bksdm.sampling import sampling_defaults
from bksdm.world.shapes import all_scenes, export
from tests.world.test_world import agreement


@pytest.mark.slow
def test_short_transformer_distillation_raises_agreement_with_the_teacher(tmp_path) -> None:
    from bksdm.loading import BUNDLED_SD3_TEACHER
    from bksdm.world.classifier import load_classifier

    teacher = StableDiffusion3Pipeline.from_pretrained(BUNDLED_SD3_TEACHER)
    guidance = sampling_defaults(BUNDLED_SD3_TEACHER).guidance_scale
    scenes = all_scenes()[::4]  # 24 scenes covering every shape, colour, size and position
    prompts, seeds = [s.caption for s in scenes], [70_000 + i for i in range(len(scenes))]
    classifier = load_classifier()

    def images(folder):
        pipe = teacher if folder is None else StableDiffusion3Pipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        return generate_images(pipe, prompts, seeds, steps=15, guidance_scale=guidance, batch_size=24)

    reference = images(None)
    pruned = tmp_path / "pruned"
    assert main(["prune", "--teacher", "bundled-sd3", "--plan", "keep-half", "--out", str(pruned)]) == 0
    before = agreement(reference, images(pruned), classifier)

    data = export(tmp_path / "data", 800, seed=5)
    out = tmp_path / "run"
    recipe = [
        "model.teacher=bundled-sd3", "model.plan=keep-half", f"model.student={pruned}",
        f"data.train={data}", "data.resolution=64", "data.num_workers=0",
        f"train.output_dir={out}", "train.max_steps=120", "train.batch_size=32", "train.mixed_precision=no",
        "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=false", "train.validate_every=0",
        "train.checkpoint_every=0", "train.use_ema=false", "optim.lr=5e-4", "train.log_every=20",
    ]  # fmt: skip
    assert main(["distill", *recipe]) == 0
    after = agreement(reference, images(out / "student"), classifier)
    assert after >= before + 4, (before, after)  # out of 24 prompt/seed pairs
