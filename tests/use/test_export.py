"""``bksdm export onnx`` (bksdm.use.onnx.export, bksdm.cli.export), ``bksdm profile --onnx`` (use.onnx.runtime).

Exports are made once per module (tracing costs seconds) and only read by the tests. The shapes-teacher tests
run on the teacher's exact architecture with random weights until the trained weights land; ONNX parity and
latency do not depend on the weights' values.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bksdm.cli import main
from bksdm.use.onnx.export import ExportError, export_onnx, parse_components
from bksdm.use.onnx.runtime import onnx_session
from bksdm.world.teacher import TEACHER_DIR, build_untrained_teacher

TOLERANCE = 1e-3


def _export(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", "onnx", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_export(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every network of the tiny SD-v1 pipeline, exported through the CLI; and what it printed."""
    out = tmp_path_factory.mktemp("tiny-onnx") / "onnx"
    components = "unet,text_encoder,vae_decoder,vae_encoder"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", "onnx", "--model", str(tiny_sd_dir), "--out", str(out), "--components", components])
    assert code == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def shapes_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes teacher's architecture with random weights, saved (stand-in until the trained one lands)."""
    folder = tmp_path_factory.mktemp("untrained-teacher") / "teacher"
    build_untrained_teacher(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes_teacher_export(shapes_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("teacher-onnx") / "onnx"
    return export_onnx(shapes_teacher, out)


def _check_parity(report: dict, components: tuple[str, ...]) -> None:
    assert tuple(report["components"]) == components
    for name, component in report["components"].items():
        assert len(component["parity"]) == 2, name  # the traced shape and another one
        errors = [e for check in component["parity"] for e in check["max_abs_error"].values()]
        assert max(errors) == component["max_abs_error"] < TOLERANCE, name
        assert component["passed"] is True
        # a real comparison: outputs are not all zero, and the errors are what float32 leaves
        assert all(v > 0.01 for check in component["parity"] for v in check["max_abs_reference"].values()), name
    assert report["passed"] is True


# --- the tiny SD-v1 pipeline --------------------------------------------------------------------------------


def test_tiny_export_passes_parity_and_prints_it(tiny_export: tuple[Path, str]) -> None:
    out, printed = tiny_export
    report = json.loads((out / "export_report.json").read_text())
    _check_parity(report, ("unet", "text_encoder", "vae_decoder", "vae_encoder"))
    for name in report["components"]:
        assert f"{name}/model.onnx" in printed
        assert f"{report['components'][name]['max_abs_error']:.2e}" in printed
    assert printed.count(" ok") == 4 and "FAIL" not in printed
    assert report["latent_side_multiple"] == 8 and report["vae_scale_factor"] == 8
    # the second check really used other shapes (dynamic axes): batch 3, a smaller latent, 16 tokens
    unet_checks = report["components"]["unet"]["parity"]
    assert [c["input_shapes"]["sample"] for c in unet_checks] == [[2, 4, 16, 16], [3, 4, 8, 8]]
    assert [c["input_shapes"]["timestep"] for c in unet_checks] == [[2], [1]]  # one timestep for the batch too
    text_checks = report["components"]["text_encoder"]["parity"]
    assert [c["input_shapes"]["input_ids"] for c in text_checks] == [[2, 77], [3, 16]]


def test_tiny_export_layout_and_sessions(tiny_export: tuple[Path, str], tiny_sd_pipe) -> None:
    out, _ = tiny_export
    assert sorted(p.name for p in out.iterdir()) == [
        "export_report.json",
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae_decoder",
        "vae_encoder",
    ]
    expected = {
        "unet": (
            {"sample": "tensor(float)", "timestep": "tensor(float)", "encoder_hidden_states": "tensor(float)"},
            ["out_sample"],
        ),
        "text_encoder": ({"input_ids": "tensor(int32)"}, ["last_hidden_state", "pooler_output"]),
        "vae_decoder": ({"latent_sample": "tensor(float)"}, ["sample"]),
        "vae_encoder": ({"sample": "tensor(float)"}, ["latent_sample"]),
    }
    for name, (inputs, outputs) in expected.items():
        session = onnx_session(out / name)
        assert {i.name: i.type for i in session.get_inputs()} == inputs
        assert [o.name for o in session.get_outputs()] == outputs
        assert (out / name / "config.json").is_file()
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64, 96, 96]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionPipeline" and index["unet"] == ["diffusers", "OnnxRuntimeModel"]

    # The exported U-Net runs one step at a batch and size it was not traced with, as PyTorch does.
    gen = torch.Generator().manual_seed(5)
    sample, hidden = torch.randn(4, 4, 24, 24, generator=gen), torch.randn(4, 77, 32, generator=gen)
    timestep = torch.tensor([321.0])
    with torch.no_grad():
        reference = tiny_sd_pipe.unet(sample, timestep, hidden).sample.numpy()
    got = onnx_session(out / "unet").run(
        None, {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": hidden.numpy()}
    )[0]
    assert np.abs(got - reference).max() < TOLERANCE


def test_tiny_export_runs_in_stock_diffusers(tiny_export: tuple[Path, str], tiny_sd_dir: Path) -> None:
    import diffusers

    if not hasattr(diffusers, "OnnxStableDiffusionPipeline"):  # deprecated in diffusers 0.42, for optimum
        pytest.skip(f"diffusers {diffusers.__version__} no longer has OnnxStableDiffusionPipeline")
    from diffusers import OnnxStableDiffusionPipeline, StableDiffusionPipeline

    out, _ = tiny_export
    onnx_pipe = OnnxStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider")
    onnx_pipe.set_progress_bar_config(disable=True)
    torch_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    torch_pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    kwargs = {"height": 128, "width": 128, "num_inference_steps": 3, "output_type": "np"}
    a = onnx_pipe("a red circle", latents=latents, **kwargs).images
    b = torch_pipe("a red circle", latents=torch.from_numpy(latents), **kwargs).images
    assert a.shape == b.shape == (1, 128, 128, 3)
    assert np.abs(a - b).max() < TOLERANCE
    assert a.std() > 0.01  # an image, not a constant


def test_pruned_student_parity(tiny_sd_dir: Path, tmp_path: Path, capsys) -> None:
    student = tmp_path / "student"
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--plan", "bk-tiny", "--out", str(student)]) == 0
    capsys.readouterr()
    out = tmp_path / "onnx"
    code, printed, _ = _export(capsys, "--model", str(student), "--out", str(out), "--components", "unet", "--json")
    assert code == 0
    report = json.loads(printed)
    _check_parity(report, ("unet",))
    assert report["latent_side_multiple"] == 4  # bk-tiny drops a stage, so one downsampler less
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64, 96]


def test_parity_failure_exits_1_and_keeps_the_files(tiny_sd_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "onnx"
    args = ["--model", str(tiny_sd_dir), "--out", str(out), "--components", "text_encoder", "--tolerance", "1e-12"]
    code, printed, err = _export(capsys, *args)
    assert code == 1
    assert "FAIL" in printed and "parity check failed for text_encoder" in err
    assert (out / "text_encoder" / "model.onnx").is_file()
    assert json.loads((out / "export_report.json").read_text())["passed"] is False


def test_large_weights_go_to_one_external_file(tiny_sd_dir: Path, tmp_path: Path) -> None:
    report = export_onnx(tiny_sd_dir, tmp_path / "onnx", components=["vae_decoder"], external_data_threshold=0)
    folder = tmp_path / "onnx" / "vae_decoder"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.onnx", "model.onnx_data"]
    assert (folder / "model.onnx").stat().st_size < 100_000 < (folder / "model.onnx_data").stat().st_size
    assert report["components"]["vae_decoder"]["external_data"] == "vae_decoder/model.onnx_data"
    _check_parity(report, ("vae_decoder",))


def test_dynamo_exporter(tiny_sd_dir: Path, tmp_path: Path) -> None:
    report = export_onnx(tiny_sd_dir, tmp_path / "onnx", components=["vae_decoder"], exporter="dynamo")
    assert report["exporter"] == "dynamo" and report["opset"] == 18
    _check_parity(report, ("vae_decoder",))


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--components", "unet,vae"], "unknown: vae"),
        (["--components", "unet,unet"], "distinct"),
        (["--opset", "5"], "--opset 5"),
        (["--tolerance", "0"], "--tolerance"),
        (["--model", "{missing}"], "unet/config.json"),
        (["--model", "{sdxl}"], "SDXL"),
        (["--out", "{busy}"], "--overwrite"),
    ],
)
def test_bad_input_exits_2(args, message, tiny_sd_dir, tiny_sdxl_dir, tmp_path, capsys) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    missing = tmp_path / "missing"
    missing.mkdir()
    names = {"missing": str(missing), "sdxl": str(tiny_sdxl_dir), "busy": str(busy)}
    base = {"--model": str(tiny_sd_dir), "--out": str(tmp_path / "out")}
    given = [a.format(**names) for a in args]
    base.update(zip(given[::2], given[1::2], strict=True))
    code, printed, err = _export(capsys, *[x for kv in base.items() for x in kv])
    assert code == 2 and printed == ""
    assert err.startswith("bksdm export onnx: error:") or err.startswith("bksdm export: error:"), err
    assert message in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_missing_onnxruntime_names_the_fix(tiny_sd_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what Python sees when the package is not installed
    with pytest.raises(ExportError, match=r"pip install 'bksdm\[onnx\]'"):
        export_onnx(tiny_sd_dir, tmp_path / "out")


def test_parse_components_keeps_a_fixed_order() -> None:
    assert parse_components("vae_decoder, unet") == ("unet", "vae_decoder")
    assert parse_components(None) == ("unet", "text_encoder", "vae_decoder")


# --- the shapes teacher and its bk-tiny student; profile --onnx ----------------------------------------------


def test_shapes_teacher_architecture_parity(shapes_teacher_export: dict) -> None:
    _check_parity(shapes_teacher_export, ("unet", "text_encoder", "vae_decoder"))
    assert shapes_teacher_export["vae_scale_factor"] == 4  # the shapes VAE is x4, unlike SD's x8


def test_shapes_teacher_bk_tiny_student_parity(shapes_teacher: Path, tmp_path: Path) -> None:
    student = tmp_path / "student"
    assert main(["prune", "--teacher", str(shapes_teacher), "--plan", "bk-tiny", "--out", str(student)]) == 0
    _check_parity(export_onnx(student, tmp_path / "onnx", components=["unet"]), ("unet",))


def test_profile_onnx_prints_both_rows(shapes_teacher: Path, shapes_teacher_export: dict, capsys) -> None:
    onnx_dir = shapes_teacher_export["out"]
    base = ["profile", "--model", str(shapes_teacher), "--onnx", onnx_dir, "--repeats", "2", "--device", "cpu"]
    assert main(base) == 0
    table = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    for row in ("U-Net step", "U-Net step, CFG (batch 2)", "U-Net step, ONNX Runtime", "U-Net step, CFG, ONNX Runtime"):
        assert row in lines and lines[row].rstrip().endswith(")"), row  # each row ends with its latency (min ...)
    assert "with the ONNX Runtime U-Net:" in table and "PyTorch's speed" in table

    assert main([*base, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    onnx = result["onnx"]
    assert len(onnx["unet_step_times_s"]) == 2 and onnx["unet_step_s"] > 0 and onnx["unet_step_cfg_s"] > 0
    assert onnx["threads"] == torch.get_num_threads()
    steps = result["steps"]
    assert onnx["image_s"] == pytest.approx(
        result["text_encoder_s"] + steps * onnx["unet_step_s"] + result["vae_decode_s"]
    )


def test_profile_onnx_refuses_another_unet_and_bad_options(
    shapes_teacher: Path, shapes_teacher_export: dict, tmp_path: Path, capsys
) -> None:
    onnx_dir = shapes_teacher_export["out"]
    base = ["profile", "--model", str(shapes_teacher), "--device", "cpu", "--repeats", "1"]
    assert main([*base, "--plan", "bk-tiny", "--onnx", onnx_dir]) == 2
    assert "not the profiled one" in capsys.readouterr().err
    assert main([*base, "--no-latency", "--onnx", onnx_dir]) == 2
    assert "--no-latency" in capsys.readouterr().err
    assert main([*base, "--onnx", str(tmp_path)]) == 2
    assert "export_report.json" in capsys.readouterr().err
    assert main([*base, "--dtype", "bf16", "--onnx", onnx_dir]) == 2
    assert "fp32" in capsys.readouterr().err


def test_bundled_teacher_and_bk_tiny_student_parity(tmp_path: Path) -> None:
    _check_parity(export_onnx(TEACHER_DIR, tmp_path / "teacher"), ("unet", "text_encoder", "vae_decoder"))
    student = tmp_path / "student"
    assert main(["prune", "--plan", "bk-tiny", "--out", str(student)]) == 0  # the bundled teacher by default
    _check_parity(export_onnx(student, tmp_path / "student-onnx"), ("unet", "text_encoder", "vae_decoder"))
