"""Tests for ``bksdm profile`` (bksdm.cli.profile, bksdm.eval.profile, bksdm.eval.profile_job) and
prune.vae_decoder_params.

Architecture presets are profiled without latency only: that path builds them on the meta device, so the real
SD-v1.4 and SDXL counts cost a second. Timing, the per-image breakdown and the timed stock pipeline call are tested
on the tiny saved pipelines.
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
from bksdm.eval.per_image import measured_breakdown, per_image
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
    err = _fail(capsys, "--no-latency")
    assert f"is missing from {tmp_path / 'missing'}" in err and "reinstall bksdm" in err


def test_bad_plan_exits_2(tiny_sd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no-such-plan" in _fail(capsys, str(tiny_sd_dir), "--plan", "no-such-plan", "--no-latency")
    assert "multiple of 8" in _fail(capsys, "--arch", "sd-v1.4", "--no-latency", "--resolution", "500")


# --- per image: parts, shares, MACs, the measured pipeline call ----------------------------------------------------

PARTS = ("text_encoders", "denoiser", "vae_decode")


def _counts(family: str = "unet") -> dict[str, Any]:
    """A profile result's counts and medians, round numbers so every expected figure is exact."""
    return {
        "family": family, "steps": 5, "text_encoder_macs": 10, "text_encoder_macs_with_attention": 11,
        "denoiser_macs": 100, "denoiser_macs_with_attention": 120, "vae_decoder_macs": 1000,
        "vae_decoder_macs_with_attention": 1010, "text_encoder_s": 1.0, "denoiser_step_s": 2.0,
        "denoiser_step_cfg_s": 3.0, "vae_decode_s": 4.0,
    }  # fmt: skip


def test_per_image_by_hand() -> None:
    guided = per_image(_counts(), guided=True)
    parts = guided["parts"]
    assert {n: (p["calls"], p["batch"]) for n, p in parts.items()} == {
        "text_encoders": (2, 1), "denoiser": (5, 2), "vae_decode": (1, 1),
    }  # fmt: skip
    assert [parts[n]["s"] for n in PARTS] == [2.0, 15.0, 4.0] and guided["image_s"] == 21.0
    assert [parts[n]["share"] for n in PARTS] == [2 / 21, 15 / 21, 4 / 21]
    assert [parts[n]["macs"] for n in PARTS] == [20, 1000, 1000] and guided["image_macs"] == 2020
    assert guided["image_macs_with_attention"] == 22 + 1200 + 1010
    plain = per_image(_counts(), guided=False)
    assert (plain["image_s"], plain["image_macs"]) == (1.0 + 10.0 + 4.0, 10 + 500 + 1000)
    assert (plain["parts"]["denoiser"]["calls"], plain["parts"]["denoiser"]["batch"]) == (5, 1)
    # FLUX.1 guides with two transformer calls at batch 1 per step: same MACs, twice the calls.
    flux = per_image(_counts("flux"), guided=True)["parts"]["denoiser"]
    assert (flux["calls"], flux["batch"], flux["macs"], flux["s"]) == (10, 1, 1000, 15.0)
    untimed = {k: v for k, v in _counts().items() if not k.endswith("_s")}
    assert "image_s" not in per_image(untimed, guided=True) and "s" not in per_image(untimed, True)["parts"]["denoiser"]


def test_measured_breakdown_by_hand() -> None:
    guided = per_image(_counts(), guided=True)  # composed 21 s: text 2, 5 x 3 s steps, VAE 4
    out = measured_breakdown(guided, measured_s=25.0, steps_run=6)  # PNDM: one step more than asked
    assert out["parts_s"] == {"text_encoders": 2.0, "denoiser": 18.0, "vae_decode": 4.0, "other": 1.0}
    assert out["shares"] == {"text_encoders": 0.08, "denoiser": 0.72, "vae_decode": 0.16, "other": 0.04}
    assert (out["composed_s"], out["gap_s"], out["measured_over_composed"]) == (21.0, 4.0, 25 / 21)


def test_tiny_per_image_from_own_numbers(timed: tuple[dict[str, Any], str, Path]) -> None:
    out, _, _ = timed
    for key, guided in (("per_image", False), ("per_image_cfg", True)):
        image, n = out[key], 2 if guided else 1
        step = out["unet_step_cfg_s" if guided else "unet_step_s"]
        parts = image["parts"]
        assert [parts[p]["s"] for p in PARTS] == [n * out["text_encoder_s"], 2 * step, out["vae_decode_s"]], key
        assert image["image_s"] == n * out["text_encoder_s"] + 2 * step + out["vae_decode_s"], key
        assert out[key.replace("per_", "") + "_s"] == image["image_s"]
        assert math.isclose(sum(parts[p]["share"] for p in PARTS), 1.0, rel_tol=1e-12), key
        assert math.isclose(sum(parts[p]["macs_share"] for p in PARTS), 1.0, rel_tol=1e-12), key
        # MACs are exact integers: text encoders x n + 2 steps x n samples + one decode.
        expected = n * out["text_encoder_macs"] + 2 * n * out["unet_macs"] + out["vae_decoder_macs"]
        assert image["image_macs"] == out[key.replace("per_", "") + "_macs"] == expected, key
        assert sum(parts[p]["macs"] for p in PARTS) == expected


def test_tiny_end_to_end_runs_the_stock_pipeline(timed: tuple[dict[str, Any], str, Path], tiny_sd_dir: Path) -> None:
    from diffusers import PNDMScheduler

    out, stderr, _ = timed
    end = out["end_to_end"]
    assert out["end_to_end_note"] is None and "timing one stock StableDiffusionPipeline call" in stderr
    assert (end["pipeline"], end["scheduler"], end["image_size"]) == (
        "StableDiffusionPipeline",
        "PNDMScheduler",
        [128, 128],
    )
    # PNDM (SD-v1's scheduler) runs one step more than asked: the callback counted what the pipeline really ran.
    scheduler = PNDMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    scheduler.set_timesteps(2)
    assert end["steps"] == 2 and end["steps_run"] == len(scheduler.timesteps) == 3
    assert (end["guidance_scale"], end["classifier_free"], end["negative_prompt"]) == (7.5, True, "")
    assert end["warmup_calls"] == 0 and end["s"] > 0
    assert end["composed_s"] == out["image_cfg_s"] and end["gap_s"] == end["s"] - out["image_cfg_s"]
    assert end["parts_s"]["denoiser"] == 3 * out["unet_step_cfg_s"]
    assert math.isclose(sum(end["parts_s"].values()), end["s"], rel_tol=1e-12)
    assert math.isclose(sum(end["shares"].values()), 1.0, rel_tol=1e-12)


def test_end_to_end_takes_the_steps_asked(tiny_sd2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # DDIM runs exactly the steps asked; the table shows the measured shares beside the composed ones.
    args = [str(tiny_sd2_dir), "--steps", "3", "--repeats", "1", "--warmup", "1", "--device", "cpu"]
    out = _profile(capsys, *args)
    end = out["end_to_end"]
    assert (end["scheduler"], end["steps"], end["steps_run"], end["warmup_calls"]) == ("DDIMScheduler", 3, 3, 1)
    assert end["parts_s"]["denoiser"] == out["per_image_cfg"]["parts"]["denoiser"]["s"]
    assert main(["profile", *args]) == 0
    table = capsys.readouterr().out
    for text in ("per image, 3 steps with classifier-free guidance (U-Net at batch 2)", "measured share",
                 "other (scheduler, post-processing)", "3 x batch 2",
                 "Measured: one stock StableDiffusionPipeline call, 3 steps, guidance 7.5"):  # fmt: skip
        assert text in table, text


def test_end_to_end_absent_says_why(tiny_sd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile(capsys, str(tiny_sd_dir), "--steps", "1", "--repeats", "1", "--warmup", "0", "--no-end-to-end")
    assert out["end_to_end"] is None and out["end_to_end_note"] == "not measured: --no-end-to-end"
    assert out["per_image_cfg"]["image_s"] > 0
    assert _profile(capsys, str(tiny_sd_dir), "--no-latency")["end_to_end_note"] == "not measured: --no-latency"
    preset = _profile(capsys, "--arch", "sd-v1.4", "--no-latency")
    assert preset["end_to_end"] is None and "no tokenizer" in preset["end_to_end_note"]


def test_sd14_per_image_macs_and_ratio_to_teacher(capsys: pytest.CaptureFixture[str]) -> None:
    teacher = _profile(capsys, "--arch", "sd-v1.4", "--no-latency")
    tiny = _profile(capsys, "--arch", "sd-v1.4", "--plan", "bk-tiny", "--no-latency")
    for out in (teacher, tiny):  # 25 steps, guidance: 2 text passes, 50 U-Net samples, one decode
        assert out["steps"] == 25
        assert out["image_cfg_macs"] == 2 * out["text_encoder_macs"] + 50 * out["unet_macs"] + out["vae_decoder_macs"]
        assert out["image_macs"] == out["text_encoder_macs"] + 25 * out["unet_macs"] + out["vae_decoder_macs"]
    assert tiny["teacher_macs"] == {
        "denoiser_macs": teacher["unet_macs"], "image_macs": teacher["image_macs"],
        "image_cfg_macs": teacher["image_cfg_macs"],
    }  # fmt: skip
    ratio = tiny["macs_ratio_to_teacher"]
    assert ratio["image_cfg"] == tiny["image_cfg_macs"] / teacher["image_cfg_macs"]
    assert ratio["denoiser_step"] == tiny["unet_macs"] / teacher["unet_macs"]
    # The VAE decoder's 1.24 TMACs do not shrink: the image ratio sits above the U-Net's 0.605.
    assert round(ratio["denoiser_step"], 3) == 0.605 and round(ratio["image_cfg"], 3) == 0.632
    assert "teacher_macs" not in teacher


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "need --steps >= 1"),
        (["--repeats", "-1"], "--repeats >= 1"),
        (["--resolution", "-8"], "--resolution must be positive"),
    ],
)
def test_bad_numbers_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in _fail(capsys, "--arch", "sd-v1.4", *args)


@pytest.mark.parametrize("args", [["--steps", "two"], ["--no-end-to-end=yes"], ["--arch", "sd-v1.4", "extra"]])
def test_unparsable_options_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["profile", *args])
    assert stop.value.code == 2
    assert "bksdm profile: error:" in capsys.readouterr().err
