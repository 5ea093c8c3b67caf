"""``bksdm plan score`` (issue 14): units and their minimal valid ablations, ablation losses, similarity scores, the
pair decomposition, determinism, units made inert in a test-built teacher, and the command's files and failures.

Teachers are the tiny stock pipelines (:mod:`bksdm.world.tiny`, :mod:`bksdm.world.tiny_dit`) with a calibration of
2 prompts x 2 timesteps x 1 seed drawn in 2 sampling steps, so each scoring takes seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from builders import make_shapes

from bksdm.cli import main
from bksdm.plan.removable import unit_space
from bksdm.plan.score import decompose, spearman
from bksdm.plan.score_job import ScoreOptions, score_teacher
from bksdm.plan.spec import PRESETS
from bksdm.plan.units import STAGE, UnitError
from bksdm.world.tiny import build_tiny_pipeline, tiny_unet_config
from bksdm.world.tiny_dit import build_tiny_dit_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # seconds, not minutes, on a shared 2-core machine

FAST = {"num_prompts": 2, "timesteps": 2, "seeds": 1, "steps": 2, "batch_size": 8}


def score(teacher: Path, out: Path, **options) -> dict:
    return score_teacher(ScoreOptions(out=out, teacher=str(teacher), **{**FAST, **options}))


def units_of(record: dict) -> dict[str, dict]:
    return {u["address"]: u for u in record["units"]}


@pytest.fixture(scope="module")
def inert_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 whose block 2 does nothing: the adaLN-zero gates of both streams are zero (their projections'
    weights and biases), so the block adds 0 * attention and 0 * feed-forward to its inputs."""
    pipe = build_tiny_dit_pipeline("sd3", seed=0)
    block = pipe.transformer.transformer_blocks[2]
    with torch.no_grad():
        for linear in (block.norm1.linear, block.norm1_context.linear):
            linear.weight.zero_()
            linear.bias.zero_()
    path = tmp_path_factory.mktemp("inert-sd3")
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def inert_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-v1 whose pair (down_blocks.3 layer 1, up_blocks.0 layer 0) does nothing: the down resnet's conv2 is
    zero (96 -> 96 channels, no shortcut: the layer returns its input), and the up resnet's conv2 is zero with a 1x1
    shortcut [I | 0] over (hidden, skip), so it returns its hidden input. The up layer consumes exactly the skip the
    down layer produced, so the student without both computes what the teacher computes."""
    pipe = build_tiny_pipeline("sd-v1", seed=0)
    unet = pipe.unet
    with torch.no_grad():
        down = unet.down_blocks[3].resnets[1]
        down.conv2.weight.zero_()
        down.conv2.bias.zero_()
        up = unet.up_blocks[0].resnets[0]
        up.conv2.weight.zero_()
        up.conv2.bias.zero_()
        up.conv_shortcut.weight.zero_()
        up.conv_shortcut.bias.zero_()
        width = up.conv_shortcut.weight.shape[0]
        up.conv_shortcut.weight[:, :width, 0, 0] = torch.eye(width)
    path = tmp_path_factory.mktemp("inert-unet")
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sd3_scores(inert_sd3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return score(inert_sd3, tmp_path_factory.mktemp("sd3-scores") / "scores", validate=3)


@pytest.fixture(scope="module")
def unet_scores(inert_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return score(inert_unet, tmp_path_factory.mktemp("unet-scores") / "scores")


# ---- units --------------------------------------------------------------------------------------------------


def test_units_of_a_unet_are_the_valid_minimal_ablations() -> None:
    space = unit_space(tiny_unet_config("sd-v1"), 128, 8)
    addresses = [u.address for u in space.units]
    # down_blocks.1 widens 32 -> 64 in its layer 0, so only its layer 1 can go; up_blocks.2's last layer takes the
    # 32-channel skip and up_blocks.3's first the 64-channel input, so neither can go alone (weight shapes differ).
    assert "down_blocks.1.layers.1" in addresses and "down_blocks.1.layers.0" not in addresses
    assert "up_blocks.3.layers.0" not in addresses
    assert {"mid_block", "down_blocks.3+up_blocks.0"} <= set(addresses)
    for ablation in space.ablations:
        assert space.problems(ablation.plan) == [], ablation.key
        if ablation.tie:  # a pair removes one down and one up layer of mirrored stages
            down, up = ablation.units
            assert down.startswith("down_blocks.") and up.startswith("up_blocks.")
    # all 6 pairs of the innermost stages (96 channels throughout) are valid
    assert sum(a.tie == "down_blocks.3+up_blocks.0" for a in space.ablations) == 6
    stage = space["down_blocks.3+up_blocks.0"]
    assert stage.kind == STAGE and "down_blocks.3.layers.0" in stage.contains
    # params are the units' own: removing bk-small's units saves exactly what the student lacks
    units = space.removed_by(PRESETS["bk-small"])
    assert units == {
        "down_blocks.0.layers.1", "down_blocks.1.layers.1", "down_blocks.2.layers.1", "down_blocks.3.layers.1",
        "mid_block", "up_blocks.0.layers.1", "up_blocks.1.layers.1", "up_blocks.2.layers.1", "up_blocks.3.layers.1",
    }  # fmt: skip
    from bksdm.families import UNET
    from bksdm.profiling import count_params

    with torch.device("meta"):
        student = UNET.build(UNET.resolve(PRESETS["bk-small"], space.config).student_config())
    assert space.teacher_params - count_params(student) == sum(space[u].params for u in units)
    # and a plan made from units removes exactly them
    assert space.removed_by(space.plan_for(units, "again")) == units
    with pytest.raises(UnitError, match="did you mean"):
        space.find("down_blocks.1.layer.1")
    assert space.find("down_blocks.1.attentions.1").address == "down_blocks.1.layers.1"


def test_sdxl_mid_block_is_tied_to_the_last_down_stage_first_attention() -> None:
    space = unit_space(tiny_unet_config("sdxl"), 128, 8)
    tied = [a for a in space.ablations if a.tie and a.tie.startswith("mid_block")]
    # a spanning set of the 3 x 3 (mid block, attention block) pairs: (b, 0) and (0, b)
    assert len(tied) == 5
    for ablation in tied:
        assert space.problems(ablation.plan) == []
        assert ablation.units[0].startswith("mid_block.attentions.0.transformer_blocks.")
        assert ablation.units[1].startswith("down_blocks.2.attentions.0.transformer_blocks.")
    lone = [a for a in space.ablations if a.units == ("up_blocks.0.attentions.1.transformer_blocks.2",)]
    assert len(lone) == 1 and lone[0].plan.transformer_blocks == (("up_blocks.0.attentions.1", (0, 1)),)
    # SDXL's innermost stage cannot go (its up stage would take 64 channels where the teacher's took 96)
    assert not any(u.kind == STAGE for u in space.units)


def test_sd3_last_block_is_not_a_unit() -> None:
    config = load_denoiser_config_of_tiny("sd3")
    space = unit_space(config, 128, 8)
    assert [u.address for u in space.units] == [f"transformer_blocks.{i}" for i in range(5)]
    assert space.ablations[0].plan.blocks == (("transformer_blocks", (1, 2, 3, 4, 5)),)


def load_denoiser_config_of_tiny(layout: str) -> dict:
    from bksdm.world.tiny_dit import tiny_dit_config

    name = "FluxTransformer2DModel" if layout.startswith("flux") else "SD3Transformer2DModel"
    return {"_class_name": name, **tiny_dit_config(layout)}


# ---- pure maths -------------------------------------------------------------------------------------------------


def test_decompose_recovers_additive_scores_up_to_the_constant() -> None:
    down = {"d0": 0.5, "d1": 0.2}
    up = {"u0": 0.1, "u1": 0.4, "u2": 0.9}
    pairs = {(d, u): down[d] + up[u] for d in down for u in up}
    got = decompose(pairs)
    # every pair is reproduced exactly, and the constant puts the lowest down and up score level
    for (d, u), value in pairs.items():
        assert got[d] + got[u] == pytest.approx(value)
    assert min(got["d0"], got["d1"]) == pytest.approx(min(got["u0"], got["u1"], got["u2"]))
    assert got["d0"] - got["d1"] == pytest.approx(0.3)
    # a disconnected family gets one constant per component
    two = decompose({("a", "x"): 1.0, ("b", "y"): 0.0})
    assert two == pytest.approx({"a": 0.5, "x": 0.5, "b": 0.0, "y": 0.0})


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


# ---- scoring ----------------------------------------------------------------------------------------------------


def test_a_block_that_does_nothing_scores_zero_and_others_do_not(sd3_scores: dict) -> None:
    units = units_of(sd3_scores)
    assert units["transformer_blocks.2"]["ablation"] == pytest.approx(0.0, abs=1e-10)
    assert units["transformer_blocks.2"]["similarity"] == pytest.approx(0.0, abs=1e-6)
    for address, unit in units.items():
        if address != "transformer_blocks.2":
            assert unit["ablation"] > 1e-4, address
            assert unit["similarity"] > 1e-3, address
    assert sd3_scores["calibration"]["inputs"] == 4
    assert sd3_scores["family"] == "sd3" and sd3_scores["units"][0]["params"] > 0


def test_an_inert_unet_pair_scores_zero(unet_scores: dict) -> None:
    pairs = {tuple(p["units"]): p["ablation"] for p in unet_scores["pairs"]}
    inert = ("down_blocks.3.layers.1", "up_blocks.0.layers.0")
    assert pairs[inert] == pytest.approx(0.0, abs=1e-10)
    same_stage = [v for k, v in pairs.items() if k[0].startswith("down_blocks.3") and k != inert]
    assert len(same_stage) == 5 and min(same_stage) > 1e-6
    units = units_of(unet_scores)
    assert units["down_blocks.3.layers.1"]["similarity"] == pytest.approx(0.0, abs=1e-6)
    assert units["down_blocks.3.layers.0"]["similarity"] > 1e-4
    # what the search predicts for removing one pair is the measured pair loss: 0 here, the lowest of the stage
    # (the additive fit of single layers' shares cannot rank this stage, whose random layers barely matter)
    from bksdm.plan.search_job import scores_space

    _, scores = scores_space(unet_scores)
    assert scores.predict(inert) == pytest.approx(0.0, abs=1e-10)
    assert min(scores.predict(k) for k in pairs if k[0].startswith("down_blocks.3") and k != inert) > 1e-6
    assert units["up_blocks.0.layers.0"]["similarity"] is None  # input (hidden + skip) and output differ in shape


def test_same_seed_same_scores_and_another_seed_differs(inert_sd3: Path, sd3_scores: dict, tmp_path: Path) -> None:
    again = score(inert_sd3, tmp_path / "again", validate=3)
    for a, b in zip(sd3_scores["units"], again["units"], strict=True):
        assert (a["ablation"], a["similarity"]) == (b["ablation"], b["similarity"])
    assert again["validation"] == sd3_scores["validation"]
    other = score(inert_sd3, tmp_path / "other", seed=1)
    assert [u["ablation"] for u in other["units"]] != [u["ablation"] for u in sd3_scores["units"]]
    assert other["calibration"]["prompts"] == sd3_scores["calibration"]["prompts"]


def test_validation_compares_measured_and_predicted(sd3_scores: dict) -> None:
    validation = sd3_scores["validation"]
    assert len(validation["plans"]) == 3
    for plan in validation["plans"]:  # each more than one measured ablation
        assert len(plan["units"]) >= 2 and plan["measured"] > 0
        assert "transformer_blocks.5" not in plan["units"]
        expected = sum(u["ablation"] for u in sd3_scores["units"] if u["address"] in plan["units"])
        assert plan["predicted"] == pytest.approx(expected)
    assert validation["spearman"] is None or -1 <= validation["spearman"] <= 1


def test_cli_writes_json_csv_markdown_chart(inert_sd3: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "scores"
    args = ["plan", "score", "--teacher", str(inert_sd3), "--out", str(out), "--num-prompts", "2", "--timesteps", "1"]
    assert main([*args, "--steps", "2", "--validate", "3"]) == 0
    printed = capsys.readouterr().out
    assert "scored 5 units" in printed and "transformer_blocks.2" in printed and "Spearman" in printed
    record = json.loads((out / "scores.json").read_text())
    assert record["calibration"]["timesteps"] and record["teacher"] == str(inert_sd3)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert rows[0]["address"] == "transformer_blocks.2" and rows[0]["rank"] == "1"
    markdown = (out / "scores.md").read_text()
    assert "## transformer_blocks" in markdown and "## Additivity check" in markdown
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an occupied folder is refused unless --overwrite; bad values exit 2 before any work
    assert main([*args, "--steps", "2"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([*args, "--steps", "2", "--overwrite"]) == 0
    assert main(["plan", "score", "--out", str(tmp_path / "x"), "--timesteps", "0"]) == 2
    assert "--timesteps 0" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_unet_presets_in_the_report(unet_scores: dict) -> None:
    presets = {p["name"]: p for p in unet_scores["presets"]}
    assert set(presets) == {"bk-base", "bk-small", "bk-tiny"}
    units = units_of(unet_scores)
    small = presets["bk-small"]
    assert small["predicted"] == pytest.approx(
        sum(units[u]["ablation"] for u in small["units"] if units[u]["measured"] == "alone")
        + sum(p["ablation"] for p in unet_scores["pairs"] if set(p["units"]) <= set(small["units"]))
    )
    assert presets["bk-tiny"]["params"] < small["params"] < presets["bk-base"]["params"] < 1
    assert "down_blocks.3+up_blocks.0" in presets["bk-tiny"]["units"]


def test_data_captions_and_cache_latents_as_calibration(
    tiny_sd_dir: Path, inert_sd3: Path, tmp_path: Path, capsys
) -> None:
    data = make_shapes(tmp_path / "data", n=6)
    from_data = score(tiny_sd_dir, tmp_path / "from-data", data=str(data), num_prompts=3)
    captions = (data / "metadata.csv").read_text().splitlines()[1:]
    assert from_data["calibration"]["prompts"] == [captions[i].split(",")[1] for i in (0, 2, 4)]
    cache = tmp_path / "cache"
    args = ["cache", "--out", str(cache), f"model.teacher={tiny_sd_dir}", f"data.train={data}", "data.resolution=128"]
    assert main(args) == 0
    from_cache = score(tiny_sd_dir, tmp_path / "from-cache", cache=str(cache), num_prompts=3, seeds=2)
    calibration = from_cache["calibration"]
    assert calibration["source"] == f"cache {cache}" and calibration["sampling"] is None
    assert calibration["inputs"] == 3 * 2 * 2 and len(calibration["prompts"]) == 3
    assert all(u["ablation"] >= -1e-6 for u in from_cache["units"])
    assert max(u["ablation"] for u in from_cache["units"]) > 1e-3
    # a cache holds one family's text states: another family's teacher is refused, nothing written
    out = tmp_path / "wrong"
    assert main(["plan", "score", "--teacher", str(inert_sd3), "--cache", str(cache), "--out", str(out)]) == 2
    assert "holds the text states of a unet teacher" in capsys.readouterr().err and not out.exists()
