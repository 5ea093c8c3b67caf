"""Plans, surgery, ``bksdm prune`` and ``bksdm plan show`` on transformer teachers (issue 13), on tiny SD3, SD3.5
(dual attention) and FLUX.1 pipelines with the real block layouts (:mod:`bksdm.world.tiny_dit`: SD3 6 joint blocks,
SD3.5 the same with blocks 0-2 dual-attention, FLUX 3 double + 6 single blocks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

from bksdm.cli import main
from bksdm.families import FLUX, SD3, family_of
from bksdm.loading import load_plan
from bksdm.plan.archs import get_arch
from bksdm.plan.prune import describe_plan
from bksdm.plan.spec import ALL_PRESETS, Plan, PlanError, plan_from_dict
from bksdm.plan.surgery import build_student
from bksdm.world.tiny_dit import build_tiny_dit_pipeline, save_tiny_dit_pipeline, tiny_dit_config

LAYOUTS = ("sd3", "sd3.5", "flux")
PIPELINES = {"sd3": StableDiffusion3Pipeline, "sd3.5": StableDiffusion3Pipeline, "flux": FluxPipeline}
MODELS = {"sd3": SD3Transformer2DModel, "sd3.5": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "plans"

KEEP_0_2_5 = {
    # SD3: kept (0, 2, 5) of 6 joint blocks; FLUX: (0, 2) of 3 double and (0, 2, 5) of 6 single blocks.
    "sd3": Plan("kept", blocks=(("transformer_blocks", (0, 2, 5)),)),
    "sd3.5": Plan("kept", blocks=(("transformer_blocks", (0, 2, 5)),)),
    "flux": Plan("kept", blocks=(("transformer_blocks", (0, 2)), ("single_transformer_blocks", (0, 2, 5)))),
}
REMOVED = {
    "sd3": ["transformer_blocks.1", "transformer_blocks.3", "transformer_blocks.4"],
    "sd3.5": ["transformer_blocks.1", "transformer_blocks.3", "transformer_blocks.4"],
    "flux": [
        "transformer_blocks.1",
        "single_transformer_blocks.1",
        "single_transformer_blocks.3",
        "single_transformer_blocks.4",
    ],
}
# Transformer parameters of the tiny teachers and of their keep-half students (measured; keep-half keeps the same
# blocks as KEEP_0_2_5 on these depths).
PARAMS = {"sd3": (63_072, 33_984), "sd3.5": (69_024, 37_920), "flux": (65_888, 44_064)}


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {layout: build_tiny_dit_pipeline(layout, seed=0) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """A saved tiny pipeline per layout, written on first use (shared: read, never modify)."""
    folders: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in folders:
            folders[layout] = save_tiny_dit_pipeline(tmp_path_factory.mktemp(f"tiny-{layout}"), layout, seed=0)
        return folders[layout]

    return get


def call_inputs(transformer, seed: int = 0):
    """Unit-scale random (noisy latents, timesteps, text states, extra conditioning) for the family's ``call``."""
    config = dict(transformer.config)
    family = family_of(transformer)
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 16, 16, 16, generator=gen)  # (B, 16, h, w)
    timesteps = torch.tensor([250.0, 750.0])
    text = torch.randn(2, 7, config["joint_attention_dim"], generator=gen)
    pooled = torch.randn(2, config["pooled_projection_dim"], generator=gen)
    return noisy, timesteps, text, family.conditioning(pooled, 128, "cpu", config)


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return family_of(model).call(model, *inputs)


# ---- surgery --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_plan_gives_the_teachers_output(pipes: dict, layout: str) -> None:
    teacher = pipes[layout].transformer
    surgery = build_student(teacher, ALL_PRESETS["identity"])
    inputs = call_inputs(teacher)
    expected = run(teacher, inputs)
    assert expected.shape == (2, 16, 16, 16)
    assert torch.equal(run(surgery.student, inputs), expected)
    assert surgery.weights.unused == ()
    # the comparison can fail: a student without blocks answers differently
    assert not torch.allclose(run(build_student(teacher, KEEP_0_2_5[layout]).student, inputs), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_copied_tensor_equals_its_source(pipes: dict, layout: str) -> None:
    teacher = pipes[layout].transformer
    surgery = build_student(teacher, KEEP_0_2_5[layout])
    student_state, teacher_state = surgery.student.state_dict(), teacher.state_dict()
    assert set(surgery.weights.sources) == set(student_state)
    for key, source in surgery.weights.sources.items():
        assert torch.equal(student_state[key], teacher_state[source]), key
    # student block 1 of the joint stack is teacher block 2, not teacher block 1
    key = "transformer_blocks.1.attn.to_q.weight"
    assert surgery.weights.sources[key] == "transformer_blocks.2.attn.to_q.weight"
    assert not torch.equal(student_state[key], teacher_state["transformer_blocks.1.attn.to_q.weight"])
    assert surgery.weights.sources["proj_out.weight"] == "proj_out.weight"
    # the unused teacher tensors are exactly those of the removed blocks
    removed = [address for address, fate in surgery.resolved.block_fates() if fate is None]
    assert removed == REMOVED[layout]
    expected_unused = {k for k in teacher_state if any(k.startswith(a + ".") for a in removed)}
    assert expected_unused and set(surgery.weights.unused) == expected_unused


@pytest.mark.parametrize(
    ("layout", "plan", "expected"),
    [
        ("sd3", KEEP_0_2_5["sd3"], {"num_layers": 3, "dual_attention_layers": []}),
        # teacher dual blocks [0, 1, 2] of 6; kept (0, 2, 5): student blocks 0 and 1 are dual
        ("sd3.5", KEEP_0_2_5["sd3.5"], {"num_layers": 3, "dual_attention_layers": [0, 1]}),
        ("sd3.5", Plan("k", blocks=(("transformer_blocks", (3, 4, 5)),)), {"dual_attention_layers": []}),
        ("sd3.5", Plan("k", blocks=(("transformer_blocks", (1, 2, 3, 5)),)), {"dual_attention_layers": [0, 1]}),
        ("flux", KEEP_0_2_5["flux"], {"num_layers": 2, "num_single_layers": 3}),
    ],
)
def test_student_config_is_stock_and_loads_in_the_stock_class(
    pipes: dict, tmp_path: Path, layout: str, plan: Plan, expected: dict
) -> None:
    teacher = pipes[layout].transformer
    surgery = build_student(teacher, plan)
    config = surgery.resolved.student_config()
    assert {k: config[k] for k in expected} == expected
    surgery.student.save_pretrained(tmp_path)
    loaded = MODELS[layout].from_pretrained(tmp_path)
    assert type(loaded) is MODELS[layout]
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()} == {
        k: list(loaded.config[k]) if isinstance(loaded.config[k], (list, tuple)) else loaded.config[k] for k in expected
    }
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in surgery.student.state_dict().items())
    if layout != "flux":
        dual = set(expected["dual_attention_layers"])
        assert [b.use_dual_attention for b in loaded.transformer_blocks] == [
            j in dual for j in range(len(loaded.transformer_blocks))
        ]
        assert loaded.transformer_blocks[-1].context_pre_only  # SD3's last block, kept and built as such
    assert torch.equal(run(loaded, call_inputs(teacher)), run(surgery.student, call_inputs(teacher)))


# ---- selectors ------------------------------------------------------------------------------------------------


def kept(family, plan: Plan, config: dict) -> list[tuple[int, ...]]:
    return [stack.kept for stack in family.resolve(plan, config).stacks]


def blocks_plan(**rules) -> Plan:
    return Plan("p", blocks=tuple(rules.items()))


@pytest.mark.parametrize(
    ("selector", "depth", "expected"),
    [
        ("every:5", 6, (0, 5)),
        ("every:1", 6, (0, 1, 2, 3, 4, 5)),
        ("spread:3", 6, (0, 2, 5)),
        ("spread:1", 6, (5,)),
        ("spread:50%", 6, (0, 2, 5)),
        ("spread:67%", 6, (0, 2, 3, 5)),
        ("spread:12", 24, (0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23)),
        ("spread:33%", 24, (0, 3, 7, 10, 13, 16, 20, 23)),
        ("last:2", 6, (4, 5)),
        ((0, 3, 5), 6, (0, 3, 5)),
    ],
)
def test_sd3_selectors(selector, depth: int, expected: tuple[int, ...]) -> None:
    config = dict(tiny_dit_config("sd3"), num_layers=depth)
    assert kept(SD3, blocks_plan(transformer_blocks=selector), config) == [expected]


def test_flux_selectors_per_stack_and_globs() -> None:
    config = tiny_dit_config("flux")  # 3 double, 6 single blocks
    assert kept(FLUX, blocks_plan(single_transformer_blocks="every:2"), config) == [(0, 1, 2), (0, 2, 4)]
    assert kept(FLUX, blocks_plan(single_transformer_blocks="every:4"), config) == [(0, 1, 2), (0, 4)]
    assert kept(FLUX, blocks_plan(transformer_blocks="spread:2"), config) == [(0, 2), (0, 1, 2, 3, 4, 5)]
    # a glob reaches both stacks; a later entry wins for its stack
    plan = Plan("p", blocks=(("*", "every:2"), ("transformer_blocks", "all")))
    assert kept(FLUX, plan, config) == [(0, 1, 2), (0, 2, 4)]
    assert kept(FLUX, blocks_plan(**{"*": "spread:50%"}), config) == [(0, 2), (0, 2, 5)]


def test_yaml_lists_take_ranges(tmp_path: Path) -> None:
    path = tmp_path / "ranges.yaml"
    path.write_text('name: ranges\nblocks:\n  transformer_blocks: ["0..1", 3, "4..5"]\n')
    plan = load_plan(path)
    assert plan.blocks == (("transformer_blocks", (0, 1, 3, 4, 5)),)
    assert kept(SD3, plan, tiny_dit_config("sd3")) == [(0, 1, 3, 4, 5)]
    flux = plan_from_dict(yaml.safe_load("name: f\nblocks:\n  single_transformer_blocks: ['0..2', 5]\n"))
    assert kept(FLUX, flux, tiny_dit_config("flux")) == [(0, 1, 2), (0, 1, 2, 5)]
    with pytest.raises(PlanError, match="must be increasing and distinct"):
        SD3.resolve(blocks_plan(transformer_blocks=(3, 1, 5)), tiny_dit_config("sd3"))
    with pytest.raises(PlanError, match="'A..B' ranges"):
        plan_from_dict({"name": "bad", "blocks": {"transformer_blocks": ["2..a"]}})


# ---- feature pairs --------------------------------------------------------------------------------------------

PAIRS = {
    "sd3": [
        ("transformer_blocks.1", "transformer_blocks.0", 1, "image"),
        ("transformer_blocks.1", "transformer_blocks.0", 0, "text"),
        ("transformer_blocks.4", "transformer_blocks.1", 1, "image"),
        ("transformer_blocks.4", "transformer_blocks.1", 0, "text"),
        ("transformer_blocks.5", "transformer_blocks.2", 1, "image"),  # SD3's last block has no text output
    ],
    "flux": [
        ("transformer_blocks.1", "transformer_blocks.0", 1, "image"),
        ("transformer_blocks.1", "transformer_blocks.0", 0, "text"),
        ("transformer_blocks.2", "transformer_blocks.1", 1, "image"),
        ("transformer_blocks.2", "transformer_blocks.1", 0, "text"),
        ("single_transformer_blocks.1", "single_transformer_blocks.0", 1, "image"),
        ("single_transformer_blocks.1", "single_transformer_blocks.0", 0, "text"),
        ("single_transformer_blocks.4", "single_transformer_blocks.1", 1, "image"),
        ("single_transformer_blocks.4", "single_transformer_blocks.1", 0, "text"),
        ("single_transformer_blocks.5", "single_transformer_blocks.2", 1, "image"),
        ("single_transformer_blocks.5", "single_transformer_blocks.2", 0, "text"),
    ],
}


@pytest.mark.parametrize("layout", ["sd3", "sd3.5", "flux"])
def test_feature_pairs_end_each_replaced_run(pipes: dict, layout: str) -> None:
    teacher = pipes[layout].transformer
    surgery = build_student(teacher, KEEP_0_2_5[layout])
    pairs = surgery.resolved.feature_pairs()
    assert [(p.teacher, p.student, p.output, p.stream) for p in pairs] == PAIRS["flux" if layout == "flux" else "sd3"]
    # at run time each pair's tensors exist in both models, of the same shape and the pair's width
    outputs: dict[tuple[str, str], tuple] = {}

    def record(side: str, address: str):
        def hook(module, args, output) -> None:
            outputs[(side, address)] = output

        return hook

    handles = [teacher.get_submodule(p.teacher).register_forward_hook(record("t", p.teacher)) for p in pairs]
    handles += [surgery.student.get_submodule(p.student).register_forward_hook(record("s", p.student)) for p in pairs]
    inputs = call_inputs(teacher)
    run(teacher, inputs), run(surgery.student, inputs)
    for handle in handles:
        handle.remove()
    for p in pairs:
        t, s = outputs[("t", p.teacher)][p.output], outputs[("s", p.student)][p.output]
        assert t.shape == s.shape and t.shape[-1] == p.channels == 16, p
    if layout != "flux":
        assert outputs[("t", "transformer_blocks.5")][0] is None  # why SD3's last block pairs the image only


# ---- bksdm prune ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prune_writes_a_pipeline_the_stock_pipeline_loads_and_runs(
    pipes: dict, saved, tmp_path: Path, layout: str, capsys
) -> None:
    teacher_dir, out = saved(layout), tmp_path / "student"
    assert main(["prune", "--teacher", str(teacher_dir), "--plan", "keep-half", "--out", str(out)]) == 0
    t_params, s_params = PARAMS[layout]
    printed = capsys.readouterr().out
    assert f"transformer params {t_params:,} -> {s_params:,}" in printed
    assert ("1024 px" in printed) == (layout == "flux")  # FLUX's config has no sample_size: the report says so

    pipe = PIPELINES[layout].from_pretrained(out)
    teacher = pipes[layout]
    size = {"height": 128, "width": 128} if layout == "flux" else {}
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **size
    ).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
    assert sum(p.numel() for p in pipe.transformer.parameters()) == s_params
    assert torch.equal(
        pipe.transformer.state_dict()["transformer_blocks.1.ff.net.2.weight"],
        teacher.transformer.state_dict()["transformer_blocks.2.ff.net.2.weight"],
    )
    encoders = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(teacher, n, None)]
    assert len(encoders) == (2 if layout == "flux" else 3)
    for name in encoders:  # every other component is the teacher's
        state = getattr(pipe, name).state_dict()
        assert all(torch.equal(state[k], v) for k, v in getattr(teacher, name).state_dict().items()), name

    report = json.loads((out / "prune_report.json").read_text())
    assert report["family"] == ("flux" if layout == "flux" else "sd3") and "unet" not in report
    denoiser = report["denoiser"]
    assert denoiser["attribute"] == "transformer" and denoiser["class"] == MODELS[layout].__name__
    assert (denoiser["teacher"]["params"], denoiser["student"]["params"]) == (t_params, s_params)
    assert t_params - s_params == sum(r["params"] for r in report["blocks"] if r["student"] is None)
    assert 0 < denoiser["student"]["macs"] < denoiser["teacher"]["macs"]
    others = sum(p.numel() for n in encoders for p in getattr(teacher, n).parameters())
    others += sum(p.numel() for p in teacher.vae.decoder.parameters())
    assert report["whole"] == {"teacher": t_params + others, "student": s_params + others}
    assert report["resolution"] == (1024 if layout == "flux" else 128)
    assert ("resolution_note" in report) == (layout == "flux")
    assert [r["teacher"] for r in report["blocks"] if r["student"] is None] == REMOVED[layout]
    markdown = (out / "prune_report.md").read_text()
    assert "| transformer parameters |" in markdown and "U-Net" not in markdown

    # the folder records the explicit plan, and it round-trips
    recorded = load_plan(out)
    config = dict(teacher.transformer.config)
    assert recorded == family_of(config).resolve(ALL_PRESETS["keep-half"], config).explicit()
    assert recorded.blocks == KEEP_0_2_5[layout].blocks
    assert yaml.safe_load((out / "bksdm_plan.yaml").read_text())["preset"]["blocks"] == {"*": "spread:50%"}


BAD_PLANS = [
    ("sd3", "blocks: {transformer_blocks: every:2}", "drops block 5, SD3's last block"),
    ("sd3", "blocks: {transformer_blocks: [0, 2, 6]}", "indices [6] out of range: there are 6 (0..5)"),
    ("sd3", "blocks: {transformer_blocks: []}", "blocks.transformer_blocks keeps no block"),
    ("sd3.5", "down_layers: first", "down_layers: U-Net rules, but the teacher is a sd3 transformer"),
    ("flux", "blocks: {double_blocks: all}", "unknown block address 'double_blocks'"),
    ("flux", "blocks: {single_transformer_blocks: ['4..6']}", "indices [6] out of range"),
]


@pytest.mark.parametrize(("layout", "rules", "message"), BAD_PLANS)
def test_bad_plans_fail_with_one_message_and_write_nothing(
    saved, tmp_path: Path, layout: str, rules: str, message: str, capsys
) -> None:
    plan = tmp_path / "bad.yaml"
    plan.write_text(f"name: bad\n{rules}\n")
    out = tmp_path / "never"
    assert main(["prune", "--teacher", str(saved(layout)), "--plan", str(plan), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "(1 problem)" in err and err.count("bksdm prune: error") == 1 and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    assert main(["plan", "show", str(plan), "--teacher", str(saved(layout))]) == 2
    assert message in capsys.readouterr().err


# ---- bksdm plan show / list -----------------------------------------------------------------------------------


def test_plan_show_for_an_sd3_teacher(saved, capsys) -> None:
    teacher = str(saved("sd3"))
    assert main(["plan", "show", "keep-half", "--teacher", teacher]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.startswith("  transformer_blocks.")]
    assert [row[:2] if row[1] == "removed" else row[:4] for row in rows] == [
        ["transformer_blocks.0", "kept", "→", "transformer_blocks.0"],
        ["transformer_blocks.1", "removed"],
        ["transformer_blocks.2", "kept", "→", "transformer_blocks.1"],
        ["transformer_blocks.3", "removed"],
        ["transformer_blocks.4", "removed"],
        ["transformer_blocks.5", "kept", "→", "transformer_blocks.2"],
    ]
    assert "3 blocks kept, 3 removed; student: num_layers=3 (of 6)" in text
    assert f"removed parameters: {PARAMS['sd3'][0] - PARAMS['sd3'][1]:,}" in text
    assert "MACs per step at 128 px" in text
    assert "transformer_blocks.5 ↔ transformer_blocks.2 (image)" in text
    assert "transformer_blocks.5 ↔ transformer_blocks.2 (text)" not in text

    assert main(["plan", "show", "keep-half", "--teacher", teacher, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["teacher"], r["student"]) for r in data["blocks"]] == [
        ("transformer_blocks.0", "transformer_blocks.0"),
        ("transformer_blocks.1", None),
        ("transformer_blocks.2", "transformer_blocks.1"),
        ("transformer_blocks.3", None),
        ("transformer_blocks.4", None),
        ("transformer_blocks.5", "transformer_blocks.2"),
    ]
    assert sum(r["params"] for r in data["blocks"] if r["student"] is None) == PARAMS["sd3"][0] - PARAMS["sd3"][1]
    assert all(r["macs"] > 0 for r in data["blocks"])
    assert (data["family"], data["resolution"]) == ("sd3", 128)
    assert data["resolved"]["blocks"] == {"transformer_blocks": [0, 2, 5]}
    assert data["student_config"]["num_layers"] == 3
    assert len(data["feature_pairs"]) == 5


def test_plan_show_for_a_flux_teacher_and_a_student_folder(saved, tmp_path: Path) -> None:
    teacher = str(saved("flux"))
    described = describe_plan("keep-half", teacher=teacher)
    assert [(r["teacher"], r["student"]) for r in described.rows] == [
        ("transformer_blocks.0", "transformer_blocks.0"),
        ("transformer_blocks.1", None),
        ("transformer_blocks.2", "transformer_blocks.1"),
        ("single_transformer_blocks.0", "single_transformer_blocks.0"),
        ("single_transformer_blocks.1", None),
        ("single_transformer_blocks.2", "single_transformer_blocks.1"),
        ("single_transformer_blocks.3", None),
        ("single_transformer_blocks.4", None),
        ("single_transformer_blocks.5", "single_transformer_blocks.2"),
    ]
    data = described.to_dict()
    assert data["resolution"] == 1024 and "no sample_size" in data["resolution_note"]
    assert "MACs per step at 1024 px (1024 px: the FluxTransformer2DModel config has no sample_size" in (
        described.to_text()
    )
    # a student folder's recorded plan shows the same blocks
    out = tmp_path / "student"
    assert main(["prune", "--teacher", teacher, "--plan", "keep-half", "--out", str(out)]) == 0
    again = describe_plan(out, teacher=teacher)
    assert again.rows == described.rows and again.plan.blocks == KEEP_0_2_5["flux"].blocks


def test_plan_list_groups_unet_and_transformer_presets(capsys) -> None:
    assert main(["plan", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headings = [i for i, line in enumerate(lines) if line.endswith(":") and not line.startswith(" ")]
    assert [lines[i].split(" ")[0] for i in headings] == ["U-Net", "transformer"]
    unet = [line.split()[0] for line in lines[headings[0] + 1 : headings[1]] if line.strip()]
    transformer = [line.split()[0] for line in lines[headings[1] + 1 :] if line.strip()]
    assert unet == ["identity", "bk-base", "bk-small", "bk-tiny"]
    assert transformer == ["keep-half", "keep-two-thirds", "keep-third"]


# ---- example plan files ---------------------------------------------------------------------------------------

EXAMPLES = {
    # file: (family, teacher depths, kept blocks per stack, config updates)
    "sd3-drop-middle.yaml": (SD3, {"num_layers": 24}, [(*range(8), *range(16, 24))], [*range(8)]),
    "sd3-keep-dual-blocks.yaml": (SD3, {"num_layers": 24}, [(*range(13), 14, 16, 18, 20, 22, 23)], [*range(13)]),
    "flux-half-single.yaml": (
        FLUX,
        {"num_layers": 19, "num_single_layers": 38},
        [tuple(range(19)), tuple(range(0, 38, 2))],
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_plans_resolve_on_the_real_depths(name: str) -> None:
    path = CONFIGS / name
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# bksdm plan show configs/plans/{name}")
    assert lines[1].startswith("# bksdm prune ") and f"--plan configs/plans/{name}" in lines[1]
    family, depths, expected, dual = EXAMPLES[name]
    # the tiny layouts at the published depths (SD3.5-medium: 24 blocks, dual attention in 0-12)
    config = dict(tiny_dit_config("sd3.5" if family is SD3 else "flux"), **depths)
    if family is SD3:
        config["dual_attention_layers"] = list(range(13))
    resolved = family.resolve(load_plan(path), config)
    assert [s.kept for s in resolved.stacks] == expected
    if dual is not None:
        assert resolved.student_config()["dual_attention_layers"] == dual


def test_example_plan_files_are_all_listed() -> None:
    files = {p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("sd3", "flux"))}
    assert files == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_plan_parameter_counts_on_the_published_configs(name: str) -> None:
    """The counts in each example's header, recomputed on the published configs (``--arch``, meta device)."""
    counts = re.findall(r"^#\s+(\S+)\s+([\d,]+) -> ([\d,]+)$", (CONFIGS / name).read_text(), re.M)
    assert counts
    for arch, teacher, student in counts:
        try:
            get_arch(arch.lower())
        except ValueError:
            pytest.skip(f"{arch} is not an architecture preset yet")
        described = describe_plan(CONFIGS / name, arch=arch.lower())
        removed = sum(r["params"] for r in described.rows if r["student"] is None)
        assert removed == int(teacher.replace(",", "")) - int(student.replace(",", "")), arch
