"""The bundled teachers by name (``bundled``, ``bundled-sd3``) in every command that takes a teacher or model."""

from __future__ import annotations

import json

from PIL import Image

from bksdm.cli import main
from bksdm.loading import BUNDLED_SD3_TEACHER, BUNDLED_TEACHER, bundled_ref, teacher_or_default
from tests.builders import make_shapes


def test_names_resolve_to_the_shipped_folders_and_a_local_folder_of_that_name_wins(tmp_path, monkeypatch) -> None:
    assert teacher_or_default(None) == str(BUNDLED_TEACHER)
    assert teacher_or_default("bundled") == str(BUNDLED_TEACHER)
    assert teacher_or_default("bundled-sd3") == str(BUNDLED_SD3_TEACHER)
    assert bundled_ref("owner/model") == "owner/model"  # anything else is left alone
    (tmp_path / "bundled-sd3").mkdir()
    monkeypatch.chdir(tmp_path)
    assert bundled_ref("bundled-sd3") == "bundled-sd3"  # ./bundled-sd3 is the user's folder


def test_prune_generate_profile_img2img_and_cache_take_bundled_sd3(tmp_path, capsys) -> None:
    student = tmp_path / "student"
    assert main(["prune", "--teacher", "bundled-sd3", "--plan", "keep-half", "--out", str(student)]) == 0
    config = json.loads((student / "transformer" / "config.json").read_text())
    assert config["num_layers"] == 6  # half of the 12 joint blocks

    gen = tmp_path / "gen"
    (tmp_path / "prompts.txt").write_text("a big red square at the top left\n")
    prompts = ["--prompts", str(tmp_path / "prompts.txt"), "--steps", "2"]
    assert main(["generate", "--model", "bundled-sd3", *prompts, "--out", str(gen)]) == 0
    assert [Image.open(p).size for p in sorted(gen.glob("*.png"))] == [(64, 64)]

    profile = tmp_path / "profile.json"
    assert main(["profile", "bundled-sd3", "--no-latency", "--json", "--out", str(profile)]) == 0
    assert json.loads(profile.read_text())["denoiser_params"] == 1_785_232

    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "white").save(source)
    edited = tmp_path / "edited"
    args = ["img2img", "--model", "bundled-sd3", "--image", str(source), "--prompt", "a small blue circle"]
    assert main([*args, "--steps", "4", "--out", str(edited)]) == 0
    assert len(list(edited.glob("*.png"))) == 1

    data = make_shapes(tmp_path / "data", 4)
    cache = tmp_path / "cache"
    overrides = ["model.teacher=bundled-sd3", f"data.train={data}", "data.resolution=64"]
    assert main(["cache", "--out", str(cache), *overrides]) == 0
    assert (cache / "cache.json").is_file()
    capsys.readouterr()
