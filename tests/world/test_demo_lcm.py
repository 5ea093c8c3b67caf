"""``bksdm demo --lcm`` (issue 15): the KD student goes on to latent consistency distillation and is evaluated at
4 steps beside the teacher and the 25-step student, with every figure the demo reports."""

from __future__ import annotations

import json

import pytest

from bksdm.world.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_demo_with_lcm_reports_a_four_step_student(tmp_path) -> None:
    settings = DemoSettings(steps=4, batch_size=8, data_size=64, lcm_steps=4, sampling_steps=2)
    summary = run_demo(tmp_path / "demo", settings)
    assert list(summary["models"]) == ["teacher", "bk-tiny (KD)", "bk-tiny LCM (4 steps)"]
    assert summary["settings"]["lr_scheduler"] == "constant"  # the U-Net budget (BUDGETS): BK-SDM's schedule
    lcm = summary["models"]["bk-tiny LCM (4 steps)"]
    kd = summary["models"]["bk-tiny (KD)"]
    assert 0 <= lcm["prompt_accuracy"] <= 1 and lcm["denoiser_params"] > kd["denoiser_params"]
    images = tmp_path / "demo" / "images"
    assert len(list((images / "bk-tiny-LCM-4-steps").glob("*.png"))) == 96
    recorded = {
        name: json.loads((images / name / "settings.json").read_text())["settings"]
        for name in ("teacher", "bk-tiny-KD", "bk-tiny-LCM-4-steps")
    }
    assert {name: r["steps"] for name, r in recorded.items()} == {
        "teacher": 2,
        "bk-tiny-KD": 2,
        "bk-tiny-LCM-4-steps": 4,
    }
    assert recorded["bk-tiny-LCM-4-steps"]["scheduler"] == "LCMScheduler"  # the LCM student's own scheduler
    assert "bk-tiny LCM (4 steps)" in (tmp_path / "demo" / "summary.md").read_text()
