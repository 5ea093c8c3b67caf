"""``bksdm demo --teacher``: the whole job on a transformer teacher (SD3's layout) as on the U-Net one."""

from __future__ import annotations

import json

import pytest
import yaml

from bksdm.cli import main
from bksdm.train.distill import TrainingSetupError
from bksdm.world.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_demo_prunes_half_the_blocks_of_a_transformer_teacher_and_reports_it(tiny_dit_dirs, tmp_path) -> None:
    teacher = tiny_dit_dirs["sd3"]
    settings = DemoSettings(teacher=str(teacher), steps=2, batch_size=4, data_size=32, sampling_steps=2)
    summary = run_demo(tmp_path / "demo", settings)
    assert summary["settings"]["plan"] == "keep-half"  # the transformer default
    assert summary["settings"]["lr_scheduler"] == "cosine"  # the transformer budget (BUDGETS)
    recipe = yaml.safe_load((tmp_path / "demo" / "runs" / "keep-half-KD" / "config.yaml").read_text())
    assert recipe["optim"]["lr_scheduler"] == "cosine" and recipe["train"]["max_steps"] == 2
    assert list(summary["models"]) == ["teacher", "keep-half (KD)"]
    student, whole = summary["models"]["keep-half (KD)"], summary["models"]["teacher"]
    assert 0 < student["denoiser_params"] < whole["denoiser_params"]
    config = json.loads((tmp_path / "demo" / "pruned" / "keep-half" / "transformer" / "config.json").read_text())
    teacher_config = json.loads((teacher / "transformer" / "config.json").read_text())
    assert config["num_layers"] == teacher_config["num_layers"] // 2
    images = tmp_path / "demo" / "images"
    assert len(list((images / "keep-half-KD").glob("*.png"))) == 96
    assert f"Teacher `{teacher}`, plan `keep-half`" in (tmp_path / "demo" / "summary.md").read_text()


def test_demo_lcm_on_a_transformer_teacher_is_refused_before_any_work(tiny_dit_dirs, tmp_path, capsys) -> None:
    with pytest.raises(TrainingSetupError, match="bksdm lcm distils U-Net pipelines"):
        run_demo(tmp_path / "demo", DemoSettings(teacher=str(tiny_dit_dirs["sd3"]), lcm_steps=4))
    assert not (tmp_path / "demo").exists()
    assert main(["demo", "--teacher", str(tiny_dit_dirs["sd3"]), "--lcm", "--out", str(tmp_path / "d")]) == 2
    assert "bksdm lcm distils U-Net pipelines" in capsys.readouterr().err


def test_demo_with_a_missing_bundled_teacher_name_says_how_to_get_it(tmp_path, monkeypatch, capsys) -> None:
    import bksdm.loading

    monkeypatch.setattr(bksdm.loading, "BUNDLED_SD3_TEACHER", tmp_path / "missing")
    assert main(["demo", "--teacher", "bundled-sd3", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "the bundled SD3-shaped shapes teacher is missing" in err and "train_dit_teacher" in err
    assert not (tmp_path / "d").exists()
