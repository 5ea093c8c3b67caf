"""Tests for ``bksdm profile`` (bksdm.cli.profile, bksdm.eval.profile) and prune.vae_decoder_params.

Architecture presets are profiled without latency only: that path builds them on the meta device, so the real
SD-v1.4 and SDXL counts cost a second. Timing is tested on the tiny saved pipelines.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bksdm.cli import main
from bksdm.plan.archs import build_vae
from bksdm.plan.prune import vae_decoder_params

SD14_UNET = 859_520_964
SD14_TEXT = 123_060_480
SD_VAE_DECODER = 49_490_179
SDXL_UNET = 2_567_463_684
OPENCLIP_BIGG_TEXT = 694_659_840


def _profile(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["profile", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _fail(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["profile", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


# --- architecture presets (meta device, exact published counts) ---------------------------------------


def test_sd14_counts_match_paper(capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile(capsys, "--arch", "sd-v1.4", "--no-latency")
    assert out["unet_params"] == SD14_UNET
    assert out["text_encoder_params"] == SD14_TEXT
    assert out["vae_decoder_params"] == SD_VAE_DECODER
    assert out["whole_params"] == 1_032_071_623  # REFERENCE.md's "whole" column
    assert abs(out["unet_macs"] - 338.7e9) / 338.7e9 < 0.005
    assert abs(out["text_encoder_macs"] - 6.5e9) / 6.5e9 < 0.01
    assert abs(out["vae_decoder_macs"] - 1240.1e9) / 1240.1e9 < 0.001
    assert out["unet_macs_with_attention"] > out["unet_macs"]
    assert out["resolution"] == 512 and out["latent_size"] == 64
    assert out["latency"] is False
    assert "unet_step_s" not in out and "peak_memory_bytes" not in out
    assert out["plan"] is None


def test_sd14_bk_tiny_plan(capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile(capsys, "--arch", "sd-v1.4", "--plan", "bk-tiny", "--no-latency")
    assert out["plan"] == "bk-tiny"
    assert out["unet_params"] == 323_384_964
    assert out["whole_params"] == 495_935_623
    assert abs(out["unet_macs"] - 205.0e9) / 205.0e9 < 0.005


def test_sdxl_has_two_text_encoders(capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile(capsys, "--arch", "sdxl-base", "--no-latency")
    assert list(out["text_encoders"]) == ["text_encoder", "text_encoder_2"]
    assert out["text_encoders"]["text_encoder"]["params"] == SD14_TEXT
    assert out["text_encoders"]["text_encoder_2"]["params"] == OPENCLIP_BIGG_TEXT
    assert out["text_encoder_params"] == SD14_TEXT + OPENCLIP_BIGG_TEXT
    assert out["unet_params"] == SDXL_UNET
    assert out["resolution"] == 1024 and out["latent_size"] == 128
    assert out["whole_params"] == SDXL_UNET + SD14_TEXT + OPENCLIP_BIGG_TEXT + SD_VAE_DECODER


def test_vae_decoder_params_is_decoder_alone() -> None:
    # The paper's 49,490,179 leaves out post_quant_conv (20 parameters), which vae.decode also runs.
    assert vae_decoder_params(build_vae("sd-v1.4")) == SD_VAE_DECODER


# --- a saved tiny pipeline: loading, timing, plans -----------------------------------------------------


@pytest.fixture(scope="module")
def timed(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """One timed profile of the tiny SD folder: (stdout JSON, stderr, the --out file)."""
    out_file = tmp_path_factory.mktemp("profile") / "sub" / "profile.json"
    # capsys is function-scoped; this module-scoped run (shared by several tests) captures by hand.
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(
            ["profile", str(tiny_sd_dir), "--steps", "2", "--repeats", "2", "--warmup", "0", "--json"]
            + ["--device", "cpu", "--out", str(out_file)]
        )
    assert code == 0
    return json.loads(stdout.getvalue()), stderr.getvalue(), out_file


def test_tiny_timings_compose(timed: tuple[dict[str, Any], str, Path]) -> None:
    out, _, _ = timed
    assert out["latency"] is True
    assert (out["steps"], out["repeats"], out["warmup"]) == (2, 2, 0)
    for key in ("unet_step", "unet_step_cfg", "text_encoder", "vae_decode"):
        assert out[f"{key}_s"] > 0
        assert len(out[f"{key}_times_s"]) == 2
        assert out[f"{key}_min_s"] == min(out[f"{key}_times_s"])
    expected = out["text_encoder_s"] + 2 * out["unet_step_s"] + out["vae_decode_s"]
    assert math.isclose(out["image_s"], expected, rel_tol=1e-12)
    expected_cfg = 2 * out["text_encoder_s"] + 2 * out["unet_step_cfg_s"] + out["vae_decode_s"]
    assert math.isclose(out["image_cfg_s"], expected_cfg, rel_tol=1e-12)
    assert out["text_encoders"]["text_encoder"]["latency_s"] == out["text_encoder_s"]  # one encoder
    assert out["peak_memory_bytes"] > 0 and "RSS" in out["peak_memory_method"]
    assert out["device"].startswith("cpu (") and out["dtype"] == "fp32"
    assert out["resolution"] == 128 and out["latent_size"] == 16  # tiny: 16 x VAE factor 8


def test_tiny_out_file_is_the_printed_json(timed: tuple[dict[str, Any], str, Path]) -> None:
    out, _, out_file = timed
    assert json.loads(out_file.read_text()) == out


def test_tiny_weights_and_meta_counts_agree(
    timed: tuple[dict[str, Any], str, Path], tiny_sd_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --no-latency builds the folder's modules on meta from their configs; the timed run loads the weights.
    out, _, _ = timed
    meta = _profile(capsys, str(tiny_sd_dir), "--no-latency")
    for key in (
        "unet_params",
        "unet_macs",
        "unet_macs_with_attention",
        "text_encoder_params",
        "whole_params",
    ):
        assert meta[key] == out[key], key
    assert meta["vae_decoder_macs"] == out["vae_decoder_macs"]
    assert meta["device"].startswith("none")


def test_tiny_table_mentions_device_and_components(tiny_sd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", str(tiny_sd_dir), "--steps", "2", "--repeats", "1", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    assert "device: cpu (" in table
    for label in (
        "text_encoder",
        "U-Net step",
        "CFG",
        "VAE decoder",
        "whole",
        "per image, 2 steps",
        "peak memory",
    ):
        assert label in table, label


def test_plan_on_folder_shrinks_unet(
    tiny_sd_dir: Path, timed: tuple[dict[str, Any], str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, _, _ = timed
    meta = _profile(capsys, str(tiny_sd_dir), "--plan", "bk-small", "--no-latency")
    assert meta["plan"] == "bk-small"
    assert meta["unet_params"] < teacher["unet_params"]
    assert meta["unet_macs"] < teacher["unet_macs"]
    assert meta["text_encoder_params"] == teacher["text_encoder_params"]
    # With timing the student comes from surgery on the loaded weights: same shapes as the meta build.
    student = _profile(
        capsys, str(tiny_sd_dir), "--plan", "bk-small", "--steps", "1", "--repeats", "1", "--warmup", "0"
    )
    assert student["unet_params"] == meta["unet_params"]
    assert student["unet_step_s"] > 0


def test_sdxl_folder_two_encoders_timed(tiny_sdxl_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile(capsys, str(tiny_sdxl_dir), "--steps", "1", "--repeats", "1", "--warmup", "0")
    assert list(out["text_encoders"]) == ["text_encoder", "text_encoder_2"]
    per_encoder = sum(e["latency_s"] for e in out["text_encoders"].values())
    assert math.isclose(out["text_encoder_s"], per_encoder, rel_tol=1e-12)
    assert out["unet_step_cfg_s"] > 0


def test_resolution_override_scales_decoder_macs(tiny_sd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    native = _profile(capsys, str(tiny_sd_dir), "--no-latency")
    double = _profile(capsys, str(tiny_sd_dir), "--no-latency", "--resolution", "256")
    assert double["resolution"] == 256 and double["latent_size"] == 32
    # Every decoder conv / linear runs per pixel, so 4x the pixels is exactly 4x the MACs.
    assert double["vae_decoder_macs"] == 4 * native["vae_decoder_macs"]
    assert double["unet_macs"] > 3 * native["unet_macs"]


# --- user errors: one line, exit code 2 ---------------------------------------------------------------


def test_unknown_arch_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, "--arch", "sd-v9", "--no-latency")
    assert "unknown architecture 'sd-v9'" in err and "sd-v1.4" in err


def test_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, str(tmp_path / "no-such-model"), "--no-latency")
    assert "no such folder" in err and "no-such-model" in err


def test_folder_without_pipeline_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, str(tmp_path), "--no-latency")
    assert "model_index.json" in err


def test_no_source_profiles_the_bundled_teacher(
    tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bksdm.loading

    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tiny_sd_dir)  # stands in for the shipped teacher
    assert main(["profile", "--no-latency", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == str(tiny_sd_dir) and out["unet_params"] == 5_456_292
    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tmp_path / "missing")
    assert "bundled shapes teacher is missing" in _fail(capsys, "--no-latency")


def test_bad_plan_exits_2(tiny_sd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no-such-plan" in _fail(capsys, str(tiny_sd_dir), "--plan", "no-such-plan", "--no-latency")
    assert "multiple of 8" in _fail(capsys, "--arch", "sd-v1.4", "--no-latency", "--resolution", "500")
