"""The fault sweep's last silent wrong results in ``report`` and ``dreambooth`` (issue 11), kept as regression
tests: each is refused with one message (exit 2) naming the option or the file, and nothing is written.

- report: ``--columns 0``, an ``evaluation.json`` holding NaN, a model folder without ``manifest.jsonl``;
- dreambooth: ``--prior-loss-weight nan`` (trained to NaN weights and wrote them), ``--guidance-scale nan``, and
  a symlink loop among the instance images (left out without a word).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bksdm.cli import main
from bksdm.eval.report import ReportError, ReportOptions, write_report
from bksdm.use.dreambooth.checks import check_config
from bksdm.use.dreambooth.config import DreamBoothConfig, DreamBoothError, with_values


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def _generate_folder(folder: Path, count: int = 3, metrics: str | None = '{"metrics": {"is": 2.5}, "count": 3}'):
    """A folder as bksdm generate (and evaluate) leave it: images, manifest.jsonl, evaluation.json."""
    _images(folder, count)
    lines = [json.dumps({"index": i, "prompt": f"prompt {i}", "seed": i, "file": f"{i:06d}.png"}) for i in range(count)]
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    if metrics is not None:
        (folder / "evaluation.json").write_text(metrics)
    return folder


# --------------------------------------------------------------------------------------------- report


def test_a_well_formed_report_still_writes(tmp_path: Path) -> None:
    a, b = _generate_folder(tmp_path / "a"), _generate_folder(tmp_path / "b")
    report = write_report(tmp_path / "out", ReportOptions(models={"a": str(a), "b": str(b)}, profile=False, columns=1))
    assert report["models"]["a"]["metrics"] == {"is": 2.5} and len(report["grid"]) == 1


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--columns", "0"], "--columns 0: the image grid needs at least 1 prompt (default 8)"),
        (["--columns", "-3"], "--columns -3: the image grid needs at least 1 prompt (default 8)"),
        (["--steps", "0", "--latency"], "--steps 0: the latency needs at least 1 denoising step (default 25)"),
    ],
)
def test_report_refuses_bad_counts(tmp_path: Path, capsys, flags: list[str], expected: str) -> None:
    """``--columns 0`` was accepted: a report without the grid it was asked for."""
    a = _generate_folder(tmp_path / "a")
    code, err = _run(capsys, "report", "--no-profile", "--model", f"a={a}", "--out", tmp_path / "out", *flags)
    assert code == 2 and f"bksdm report: error: {expected}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"metrics": {"fid": NaN}}', "NaN is not a JSON value"),
        ('{"metrics": {"fid": -Infinity}}', "-Infinity is not a JSON value"),
        ('{"metrics": {"fid": "12.5"}}', "metric 'fid' is '12.5', not a number; run bksdm evaluate again"),
        ('{"metrics": {"fid": null}}', "metric 'fid' is None, not a number"),
    ],
)
def test_report_refuses_an_evaluation_without_numbers(tmp_path: Path, capsys, content: str, expected: str) -> None:
    """An evaluation.json holding NaN was read (Python's json takes it) and the report written."""
    a, b = _generate_folder(tmp_path / "a", metrics=content), _generate_folder(tmp_path / "b")
    code, err = _run(capsys, "report", "--no-profile", "--model", f"a={a}", "--model", f"b={b}", "--out",
                     tmp_path / "out")  # fmt: skip
    assert code == 2 and "bksdm report: error: " in err and expected in err, err
    assert str(a / "evaluation.json") in err
    assert not (tmp_path / "out").exists()


def test_report_refuses_a_folder_without_its_manifest(tmp_path: Path, capsys) -> None:
    """Without manifest.jsonl the grid paired images by file name: "same prompts and seeds" went unchecked."""
    a, b = _generate_folder(tmp_path / "a"), _generate_folder(tmp_path / "b")
    (a / "manifest.jsonl").unlink()
    code, err = _run(capsys, "report", "--no-profile", "--model", f"a={a}", "--model", f"b={b}", "--out",
                     tmp_path / "out")  # fmt: skip
    assert code == 2
    assert f"bksdm report: error: --model a={a}: {a} has no manifest.jsonl" in err
    assert f"or only the figures: --model a={a / 'evaluation.json'}" in err
    assert not (tmp_path / "out").exists()
    # The way out the message gives works.
    code, err = _run(capsys, "report", "--no-profile", "--model", f"a={a / 'evaluation.json'}", "--model", f"b={b}",
                     "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["models"]["a"]["metrics"] == {"is": 2.5}


def test_report_python_api_refuses_too(tmp_path: Path) -> None:
    a = _generate_folder(tmp_path / "a", metrics='{"metrics": {"is": NaN}}')
    with pytest.raises(ReportError, match="NaN is not a JSON value"):
        write_report(tmp_path / "out", ReportOptions(models={"a": str(a)}, profile=False))
    with pytest.raises(ReportError, match="--columns 0"):
        write_report(tmp_path / "out", ReportOptions(models={"a": str(a)}, profile=False, columns=0))


# ----------------------------------------------------------------------------------------- dreambooth


@pytest.fixture()
def base(tmp_path: Path) -> DreamBoothConfig:
    subject = _images(tmp_path / "subject", 3)
    settings = {"instance_dir": str(subject), "instance_prompt": "a sks dog", "output_dir": str(tmp_path / "out")}
    cfg = with_values(DreamBoothConfig(), settings)
    return cfg


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"prior_loss_weight": float("nan"), "class_prompts": ["a dog"]}, "--prior-loss-weight must be a finite "
         "number, got nan"),
        ({"prior_loss_weight": float("inf"), "class_prompts": ["a dog"]}, "--prior-loss-weight must be a finite "
         "number, got inf"),
        ({"prior_loss_weight": -1.0, "class_prompts": ["a dog"]}, "--prior-loss-weight must not be negative, got -1.0"),
        ({"prior_loss_weight": 0.0, "class_prompts": ["a dog"]}, "--prior-loss-weight 0 turns the class loss off"),
        ({"guidance_scale": float("nan")}, "--guidance-scale nan: the guidance scale must be a finite number"),
        ({"guidance_scale": -5.0}, "--guidance-scale -5: the guidance scale cannot be negative"),
        ({"guidance_scale": 0.5}, "--guidance-scale 0.5: guidance applies only above 1"),
        ({"sample_steps": 0}, "--sample-steps 0: needs at least 1 denoising step"),
        ({"lr": float("inf")}, "--lr must be a finite number, got inf"),
        ({"lr": float("nan")}, "--lr must be a finite number, got nan"),
        ({"lora_alpha": float("nan")}, "--lora-alpha must be a finite number, got nan"),
        ({"lora_alpha": 0.0}, "--lora-alpha must be positive, got 0.0"),
        ({"max_grad_norm": float("nan")}, "--max-grad-norm must be a finite number, got nan"),
    ],
)  # fmt: skip
def test_dreambooth_numbers_are_checked_finite(base: DreamBoothConfig, changes: dict, expected: str) -> None:
    cfg = with_values(base, changes).resolved()
    with pytest.raises(DreamBoothError) as info:
        check_config(cfg)
    assert str(info.value).startswith(f"cannot start (1 problem):\n  - {expected}")  # one problem, said once


@pytest.mark.parametrize(
    "changes",
    [{}, {"guidance_scale": 0.0}, {"guidance_scale": 1.0}, {"sample_steps": 1}, {"prior_loss_weight": 0.0}],
)
def test_dreambooth_sensible_numbers_pass(base: DreamBoothConfig, changes: dict) -> None:
    assert len(check_config(with_values(base, changes).resolved())) == 3


def test_a_symlink_loop_among_the_instance_images_is_named(base: DreamBoothConfig, tmp_path: Path) -> None:
    """It was left out silently; the README says every image is checked before the model loads."""
    loop = Path(base.data.instance_dir) / "2.png"
    os.symlink(loop.name, loop)
    with pytest.raises(DreamBoothError) as info:
        check_config(base.resolved())
    assert f"--instance-dir: {loop} is not a readable image (" in str(info.value)
    assert "Too many levels of symbolic links" in str(info.value)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--class-prompt", "a circle", "--prior-loss-weight", "nan"], "--prior-loss-weight must be a finite number"),
        (["--guidance-scale", "nan"], "--guidance-scale nan: the guidance scale must be a finite number"),
        (["--lora", "--lora-alpha", "inf"], "--lora-alpha must be a finite number, got inf"),
    ],
)
def test_dreambooth_cli_refuses_before_any_model_loads(tmp_path: Path, capsys, flags, expected) -> None:
    subject = _images(tmp_path / "subject", 3)
    # No model is given: the bundled teacher would be loaded if the checks passed; they run first.
    code, err = _run(capsys, "dreambooth", "--instance-dir", subject, "--instance-prompt", "a sks circle", "--out",
                     tmp_path / "db", "--steps", "2", *flags)  # fmt: skip
    assert code == 2 and "bksdm dreambooth: error: cannot start (1 problem):" in err and expected in err, err
    assert not (tmp_path / "db").exists()
