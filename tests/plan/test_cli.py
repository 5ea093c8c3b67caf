"""The prune and plan commands end to end, as a user runs them, on tiny SD-shaped teachers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from bksdm.cli import main
from bksdm.loading import load_plan


def test_prune_writes_a_pipeline_that_stock_diffusers_loads(tiny_sd_dir, tmp_path, capsys) -> None:
    out = tmp_path / "tiny-student"
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--plan", "bk-tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "student written to" in printed and "fewer" in printed

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.block_out_channels == [32, 64, 96]
    assert pipe.unet.config.mid_block_type is None
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()

    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    kept = pipe.unet.state_dict()["up_blocks.0.resnets.1.conv1.weight"]
    assert torch.equal(kept, teacher.unet.state_dict()["up_blocks.1.resnets.2.conv1.weight"])
    for key, value in teacher.text_encoder.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[key], value), key
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    report = json.loads((out / "prune_report.json").read_text())
    removed = {r["teacher"] for r in report["blocks"] if r["student"] is None}
    assert {
        "mid_block",
        "down_blocks.3.resnets.0",
        "down_blocks.2.downsamplers.0",
        "up_blocks.0.resnets.2",
        "up_blocks.1.attentions.1",
    } <= removed
    assert report["unet"]["student"]["params"] == sum(p.numel() for p in pipe.unet.parameters())
    assert report["unet"]["teacher"]["params"] - report["unet"]["student"]["params"] == sum(
        r["params"] for r in report["blocks"] if r["student"] is None
    )
    assert report["unet"]["student"]["macs"] < report["unet"]["teacher"]["macs"]
    markdown = (out / "prune_report.md").read_text()
    assert "**removed**" in markdown and "## Feature-distillation pairs" in markdown
    # the recorded plan reproduces the student
    assert load_plan(out).layers and load_plan(out).drop_innermost_stages == 1


def test_prune_sdxl_teacher_loads_in_the_sdxl_pipeline(tiny_sdxl_dir, tmp_path) -> None:
    out = tmp_path / "xl-small"
    assert main(["prune", "--teacher", str(tiny_sdxl_dir), "--plan", "bk-small", "--out", str(out)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.unet.config.mid_block_type is None and pipe.unet.config.layers_per_block == 1
    image = pipe("a blue square", num_inference_steps=2, output_type="np", height=128, width=128).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


def test_prune_tiny_on_sdxl_needs_partial_init(tiny_sdxl_dir, tmp_path, capsys) -> None:
    out = tmp_path / "xl-tiny"
    assert main(["prune", "--teacher", str(tiny_sdxl_dir), "--plan", "bk-tiny", "--out", str(out)]) == 2
    assert "--allow-partial-init" in capsys.readouterr().err and not out.exists()
    args = [
        "prune",
        "--teacher",
        str(tiny_sdxl_dir),
        "--plan",
        "bk-tiny",
        "--out",
        str(out),
        "--allow-partial-init",
    ]
    assert main(args) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert len(report["weights"]["random_init"]) == 4


def test_bad_plan_fails_before_writing_anything(tiny_sd_dir, tmp_path, capsys) -> None:
    plan = tmp_path / "broken.yaml"
    plan.write_text("name: broken\ndown_layers: first\nlayers:\n  down_blocks.9: [0]\n  up_blocks.1: [0]\n")
    out = tmp_path / "never"
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--plan", str(plan), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown block address 'down_blocks.9'" in err
    assert "up_blocks.1 keeps 1 layers but its mirror down_blocks.2 keeps 1" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_missing_teacher_and_occupied_out_are_clear_errors(tiny_sd_dir, tmp_path, capsys) -> None:
    assert main(["prune", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--out", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--out", str(busy), "--overwrite"]) == 0
    assert (busy / "model_index.json").is_file() and not (busy / "keep.txt").exists()


def test_plan_show_lists_kept_and_removed_blocks(capsys) -> None:
    assert main(["plan", "show", "bk-tiny"]) == 0
    text = capsys.readouterr().out
    assert "down_blocks.2.downsamplers.0" in text and "removed" in text
    assert "up_blocks.1.resnets.2" in text and "→ up_blocks.0.resnets.1" in text
    assert "removed parameters: 536,136,000" in text  # 859,520,964 - 323,384,964
    assert "down_blocks.2.attentions.1.proj_out ↔ down_blocks.2.attentions.0.proj_out" in text

    assert main(["plan", "show", "bk-base", "--arch", "sd-v2.1-base", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["student_config"]["layers_per_block"] == 1
    assert sum(r["params"] for r in data["blocks"] if r["student"] is None) == 865_910_724 - 583_480_964


def test_plan_show_unknown_plan(capsys) -> None:
    assert main(["plan", "show", "bk-huge"]) == 2
    assert "not a preset" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--version"], ["plan", "list"]])
def test_small_commands(argv, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's --version exits
        code = stop.code
    assert code == 0
    assert capsys.readouterr().out.strip()


def test_prune_without_teacher_uses_the_bundled_one(tiny_sd_dir, tmp_path, monkeypatch, capsys) -> None:
    import bksdm.loading

    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tiny_sd_dir)  # stands in for the shipped teacher
    out = tmp_path / "student"
    assert main(["prune", "--plan", "bk-base", "--out", str(out)]) == 0
    assert json.loads((out / "prune_report.json").read_text())["teacher"] == str(tiny_sd_dir)
    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tmp_path / "missing")
    assert main(["prune", "--out", str(tmp_path / "other")]) == 2
    assert "bundled shapes teacher is missing" in capsys.readouterr().err
