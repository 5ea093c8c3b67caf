"""``bksdm plan search`` (issue 14): the budget, the pins and the layout's rules on tiny U-Net, SDXL, SD3 and FLUX
teachers; the plan YAML round-trips through ``load_plan`` and ``prune``; bad input fails with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bksdm.cli import main
from bksdm.families import family_of
from bksdm.loading import load_plan
from bksdm.plan import search as search_module
from bksdm.plan.score_job import ScoreOptions, load_scores, score_teacher
from bksdm.plan.search import BudgetError, parse_budget, random_removals, search
from bksdm.plan.search_job import SearchOptions, scores_space, search_plan, student_costs
from bksdm.plan.spec import plan_to_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # seconds, not minutes, on a shared 2-core machine

FAST = {"num_prompts": 2, "timesteps": 2, "seeds": 1, "steps": 2, "batch_size": 8}


def scored(teacher: Path, out: Path, **options) -> Path:
    score_teacher(ScoreOptions(out=out, teacher=str(teacher), **{**FAST, **options}))
    return out


@pytest.fixture(scope="module")
def unet_scores(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scored(tiny_sd_dir, tmp_path_factory.mktemp("sd-scores") / "scores")


@pytest.fixture(scope="module")
def dit_scores(tiny_dit_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit-scores")
    return {layout: scored(tiny_dit_dirs[layout], root / layout, resolution=128) for layout in ("sd3", "flux")}


def run_search(scores: Path, budget: str, out: Path, *extra: str) -> int:
    return main(["plan", "search", "--scores", str(scores), "--budget", budget, "--out", str(out), *extra])


def prune_report(teacher: Path, plan: Path, out: Path) -> dict:
    assert main(["prune", "--teacher", str(teacher), "--plan", str(plan), "--out", str(out)]) == 0
    return json.loads((out / "prune_report.json").read_text())


# ---- budgets, and the YAML through load_plan and prune ------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_params_budget_is_honoured_and_prune_takes_the_plan(
    unet_scores: Path, tiny_sd_dir: Path, tmp_path: Path, fraction: float, capsys
) -> None:
    plan_file = tmp_path / "plan.yaml"
    assert run_search(unet_scores, f"params={fraction}", plan_file) == 0
    assert "predicted loss" in capsys.readouterr().out
    text = plan_file.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(f"params={fraction}" in line for line in header)
    assert any(str(unet_scores) in line for line in header) and any("predicted loss" in line for line in header)
    assert any(line.startswith("# command: bksdm plan search") for line in header)
    plan = load_plan(plan_file)
    assert plan_to_dict(plan) == yaml.safe_load(text)  # an ordinary plan, comments aside
    report = prune_report(tiny_sd_dir, plan_file, tmp_path / "student")
    unet = report["unet"]
    assert unet["student"]["params"] <= fraction * unet["teacher"]["params"]
    student = f"{unet['student']['params']:,} of {unet['teacher']['params']:,}"
    assert any(student in line for line in header)  # the header's count is the real student's


def test_search_beats_every_random_valid_plan_that_fits(unet_scores: Path) -> None:
    record = load_scores(unet_scores)
    space, scores = scores_space(record)
    cost = {u.address: float(u.params) for u in space.units}
    fraction = 0.7
    result = search(space, scores, cost, space.teacher_params, fraction, lambda p: student_costs(space, p)["params"])
    assert result.exhaustive and result.student_cost <= fraction * space.teacher_params
    assert space.problems(result.plan) == []
    fitting = 0
    for removed in random_removals(space, scores, 30, seed=3, single=True):
        # unit parameters add up exactly (test_score checks it against a built student)
        if space.teacher_params - sum(space[u].params for u in removed) <= fraction * space.teacher_params:
            fitting += 1
            assert scores.predict(removed) >= result.predicted_loss - 1e-12
    assert fitting >= 5


def test_macs_budget(unet_scores: Path, tmp_path: Path) -> None:
    summary = search_plan(SearchOptions(unet_scores, "macs=0.75", tmp_path / "plan.yaml"))
    macs = summary["macs"]
    assert macs["student"] <= 0.75 * macs["teacher"]
    assert load_plan(tmp_path / "plan.yaml").name == "searched-macs-0.75"


def test_latency_budget_is_measured(unet_scores: Path, tmp_path: Path) -> None:
    summary = search_plan(SearchOptions(unet_scores, "latency=0.85", tmp_path / "plan.yaml", device="cpu"))
    latency = summary["latency"]
    assert latency["fraction"] <= 0.85 and latency["rounds"][-1]["latency_fraction"] == pytest.approx(
        latency["fraction"], abs=1e-4
    )
    assert "measured step latency" in (tmp_path / "plan.yaml").read_text()


def test_pareto_fronts_find_the_exhaustive_answer(unet_scores: Path, dit_scores: dict[str, Path], monkeypatch) -> None:
    for folder in (unet_scores, dit_scores["sd3"], dit_scores["flux"]):
        space, scores = scores_space(load_scores(folder))
        cost = {u.address: float(u.params) for u in space.units}

        def run(space=space, scores=scores, cost=cost):
            return search(space, scores, cost, space.teacher_params, 0.75, lambda p: student_costs(space, p)["params"])

        exhaustive = run()
        monkeypatch.setattr(search_module, "EXACT_LIMIT", 1)
        fronts = run()
        monkeypatch.undo()
        assert exhaustive.exhaustive and not fronts.exhaustive
        assert fronts.units == exhaustive.units and fronts.predicted_loss == pytest.approx(exhaustive.predicted_loss)


# ---- pins and layout rules ------------------------------------------------------------------------------------------


def test_pins_are_respected(unet_scores: Path, tmp_path: Path) -> None:
    free = search_plan(SearchOptions(unet_scores, "params=0.5", tmp_path / "free.yaml"))
    removed_layer = next(u for u in free["units"] if ".layers." in u)
    kept = search_plan(SearchOptions(unet_scores, "params=0.6", tmp_path / "kept.yaml", keep=[removed_layer]))
    assert removed_layer not in kept["units"]
    stage, _, index = removed_layer.partition(".layers.")
    resolved = family_of(load_scores(unet_scores)["teacher_config"]).resolve(
        load_plan(tmp_path / "kept.yaml"), load_scores(unet_scores)["teacher_config"]
    )
    kept_layers = {s.teacher.address: s.layers for s in (*resolved.down, *resolved.up)}
    assert int(index) in kept_layers[stage]
    # a module address names its unit; keeping a layer of the innermost stage keeps the stage
    assert "down_blocks.3+up_blocks.0" in free["units"]
    by_module = search_plan(
        SearchOptions(unet_scores, "params=0.7", tmp_path / "m.yaml", keep=["down_blocks.3.resnets.0"])
    )
    assert "down_blocks.3+up_blocks.0" not in by_module["units"]
    assert "down_blocks.3.layers.0" not in by_module["units"]
    dropped = search_plan(SearchOptions(unet_scores, "params=0.95", tmp_path / "d.yaml", drop=["mid_block"]))
    assert "mid_block" in dropped["units"] and load_plan(tmp_path / "d.yaml").mid_block == "drop"


def test_every_plan_follows_the_layout_rules(unet_scores: Path) -> None:
    record = load_scores(unet_scores)
    space, scores = scores_space(record)
    family = family_of(record["teacher_config"])
    cost = {u.address: float(u.params) for u in space.units}
    for fraction in (0.95, 0.85, 0.75, 0.65, 0.55):
        try:
            result = search(
                space, scores, cost, space.teacher_params, fraction, lambda p: student_costs(space, p)["params"]
            )
        except BudgetError:
            continue
        resolved = family.resolve(result.plan, record["teacher_config"])
        n = len(resolved.down)
        for i, down in enumerate(resolved.down):  # every stage keeps a layer; its mirror up stage one more
            assert down.layers and len(resolved.up[n - 1 - i].layers) == len(down.layers) + 1


def test_transformer_plans_keep_what_the_family_needs(
    dit_scores: dict[str, Path], tiny_dit_dirs: dict[str, Path], tmp_path: Path
) -> None:
    for layout in ("sd3", "flux"):
        plan_file = tmp_path / f"{layout}.yaml"
        summary = search_plan(SearchOptions(dit_scores[layout], "params=0.8", plan_file))
        plan = load_plan(plan_file)
        report = prune_report(tiny_dit_dirs[layout], plan_file, tmp_path / f"{layout}-student")
        denoiser = report["denoiser"]
        assert denoiser["student"]["params"] <= 0.8 * denoiser["teacher"]["params"]
        assert denoiser["student"]["params"] == summary["params"]["student"]
        kept = dict(plan.blocks)
        if layout == "sd3":
            assert kept["transformer_blocks"][-1] == 5  # SD3's last block always stays
            # equal blocks: the lowest-scoring ones go first
            record = load_scores(dit_scores[layout])
            ranked = sorted(record["units"], key=lambda u: u["ablation"])
            assert set(summary["units"]) == {u["address"] for u in ranked[: len(summary["units"])]}
        for stack, depth in (("transformer_blocks", 6 if layout == "sd3" else 3), ("single_transformer_blocks", 6)):
            if stack in kept:
                assert 1 <= len(kept[stack]) < depth


@pytest.mark.slow
def test_sdxl_keeps_the_mid_block_tied_to_its_attention(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    folder = scored(tiny_sdxl_dir, tmp_path / "scores", num_prompts=1)
    record = load_scores(folder)
    space, scores = scores_space(record)
    cost = {u.address: float(u.params) for u in space.units}
    for fraction in (0.9, 0.8, 0.7):
        result = search(
            space, scores, cost, space.teacher_params, fraction, lambda p: student_costs(space, p)["params"]
        )
        assert not result.exhaustive  # 70 attention blocks: Pareto fronts
        resolved = family_of(space.config).resolve(result.plan, space.config)
        if resolved.mid is not None:
            assert len(resolved.mid) == len(resolved.down[-1].blocks[0])
        report = prune_report(
            tiny_sdxl_dir, _write(result.plan, tmp_path / f"{fraction}.yaml"), tmp_path / str(fraction)
        )
        assert report["unet"]["student"]["params"] <= fraction * report["unet"]["teacher"]["params"]


def _write(plan, path: Path) -> Path:
    path.write_text(yaml.safe_dump(plan_to_dict(plan), sort_keys=False))
    return path


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_fails_with_one_message(unet_scores: Path, tiny_dit_dirs: dict[str, Path], tmp_path: Path, capsys):
    out = tmp_path / "plan.yaml"
    cases = [
        (["params=0.7", "--keep", "down_blocks.9.layers.0"], "not a removable unit"),
        (["params=1.5"], "in (0, 1]"),
        (["params=0"], "in (0, 1]"),
        (["size=0.5"], "KIND=FRACTION"),
        (["params=0.05"], "no valid plan fits 0.05"),
        (["params=0.7", "--keep", "mid_block", "--drop", "mid_block"], "both kept"),
        (["params=0.7", "--teacher", str(tiny_dit_dirs["sd3"])], "scores were measured on"),
    ]
    for args, message in cases:
        assert run_search(unet_scores, *args[:1], out, *args[1:]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert run_search(tmp_path / "nothing", "params=0.5", out) == 2
    assert "no scores.json" in capsys.readouterr().err
    with pytest.raises(BudgetError):
        parse_budget("params=abc")
