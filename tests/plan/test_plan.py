"""Plans against the real SD architectures (built on the meta device, no download) and bad-plan handling."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from bksdm.loading import load_plan
from bksdm.plan.archs import get_arch
from bksdm.plan.prune import describe_plan, unet_macs
from bksdm.plan.resolved import resolve
from bksdm.plan.spec import PRESETS, Plan, PlanError, plan_from_dict, plan_to_dict, select
from bksdm.plan.surgery import shapes_of, weight_map

# REFERENCE.md, "Sizes": U-Net parameters (exact) and conv+linear MACs per step at 512 px (published).
PUBLISHED = {
    ("sd-v1.4", "identity"): (859_520_964, 338.7e9),
    ("sd-v1.4", "bk-base"): (579_384_964, 223.8e9),
    ("sd-v1.4", "bk-small"): (482_346_884, 217.7e9),
    ("sd-v1.4", "bk-tiny"): (323_384_964, 205.0e9),
    ("sd-v2.1-base", "identity"): (865_910_724, 339.2e9),
    ("sd-v2.1-base", "bk-base"): (583_480_964, 224.1e9),
    ("sd-v2.1-base", "bk-small"): (485_787_524, 218.0e9),
    ("sd-v2.1-base", "bk-tiny"): (326_825_604, 205.3e9),
}


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize(("arch", "preset"), sorted(PUBLISHED))
def test_published_params_and_macs(arch: str, preset: str) -> None:
    params, macs = PUBLISHED[arch, preset]
    config = resolve(PRESETS[preset], get_arch(arch).unet_config).student_config()
    student = meta_unet(config)
    assert sum(p.numel() for p in student.parameters()) == params
    measured = unet_macs(config, 512).conv_linear
    assert abs(measured - macs) / macs < 0.005, f"{measured / 1e9:.2f}G vs published {macs / 1e9:.1f}G"


def test_describe_plan_counts_the_removed_blocks_without_weights() -> None:
    """``bksdm plan show``'s library job: rows per teacher block with params and MACs, on a meta-device teacher."""
    described = describe_plan("bk-small", arch="sd-v1.4")
    assert described.teacher == "sd-v1.4 (architecture preset)" and described.plan == PRESETS["bk-small"]
    removed = [r for r in described.rows if r["student"] is None]
    assert sum(r["params"] for r in removed) == 859_520_964 - 482_346_884
    assert {r["teacher"] for r in removed} >= {"mid_block", "down_blocks.0.resnets.1", "up_blocks.3.attentions.1"}
    total = unet_macs(dict(get_arch("sd-v1.4").unet_config), 512).conv_linear
    assert 0 < sum(r["macs"] for r in described.rows) <= total
    data = described.to_dict()
    assert plan_from_dict(data["plan"]) == PRESETS["bk-small"]
    assert data["student_config"]["mid_block_type"] is None and len(data["feature_pairs"]) == 8
    assert "removed parameters: 377,174,080" in described.to_text()
    with pytest.raises(ValueError, match="not both"):
        describe_plan("bk-small", arch="sd-v1.4", teacher="some/teacher")


def published_config(arch: str, preset: str) -> dict:
    """The published BK-SDM U-Net configs as REFERENCE.md describes them, written out by hand."""
    config = dict(get_arch(arch).unet_config)
    config["layers_per_block"] = 1
    if preset in ("bk-small", "bk-tiny"):
        config["mid_block_type"] = None
    if preset == "bk-tiny":
        config["block_out_channels"] = config["block_out_channels"][:3]
        config["down_block_types"] = ["CrossAttnDownBlock2D"] * 3
        config["up_block_types"] = ["CrossAttnUpBlock2D"] * 3
        if isinstance(config["attention_head_dim"], list):
            config["attention_head_dim"] = config["attention_head_dim"][:3]
    return config


@pytest.mark.parametrize("arch", ["sd-v1.4", "sd-v2.1-base"])
@pytest.mark.parametrize("preset", ["bk-base", "bk-small", "bk-tiny"])
def test_student_matches_published_checkpoint_layout(arch: str, preset: str) -> None:
    ours = meta_unet(resolve(PRESETS[preset], get_arch(arch).unet_config).student_config())
    published = meta_unet(published_config(arch, preset))
    for key in (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "mid_block_type",
        "attention_head_dim",
        "cross_attention_dim",
        "use_linear_projection",
        "sample_size",
        "transformer_layers_per_block",
        "upcast_attention",
    ):
        assert ours.config[key] == published.config[key], key
    assert shapes_of(ours) == shapes_of(published)


def test_identity_plan_keeps_every_teacher_tensor_in_place() -> None:
    config = get_arch("sd-v1.4").unet_config
    resolved = resolve(PRESETS["identity"], config)
    teacher = shapes_of(meta_unet(config))
    wm = weight_map(resolved, shapes_of(meta_unet(resolved.student_config())), teacher)
    assert wm.problems == [] and wm.unused == ()
    assert wm.sources == {k: k for k in teacher}


@pytest.mark.parametrize("arch", ["sd-v1.4", "sd-v2.1-base", "sd-v2.1", "sdxl-base"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_fills_the_student_exactly_once(arch: str, preset: str) -> None:
    config = get_arch(arch).unet_config
    resolved = resolve(PRESETS[preset], config)
    wm = weight_map(resolved, shapes_of(meta_unet(resolved.student_config())), shapes_of(meta_unet(config)))
    if arch == "sdxl-base" and preset == "bk-tiny":
        # SDXL's two innermost stages differ in width (1280 vs 640), so the new innermost up stage's first
        # ResNet sees 640 + 640 input channels instead of 1280 + 640: exactly its input-side tensors mismatch.
        assert sorted(m[0] for m in wm.mismatched) == [
            "up_blocks.0.resnets.0.conv1.weight",
            "up_blocks.0.resnets.0.conv_shortcut.weight",
            "up_blocks.0.resnets.0.norm1.bias",
            "up_blocks.0.resnets.0.norm1.weight",
        ]
        assert not wm.missing and not wm.reused
    else:
        assert wm.problems == []


def test_base_up_layer_one_comes_from_teacher_layer_two() -> None:
    resolved = resolve(PRESETS["bk-base"], get_arch("sd-v1.4").unet_config)
    assert resolved.teacher_key("up_blocks.1.resnets.1.conv1.weight") == "up_blocks.1.resnets.2.conv1.weight"
    assert resolved.teacher_key("up_blocks.3.attentions.1.proj_in.weight") == "up_blocks.3.attentions.2.proj_in.weight"
    assert resolved.teacher_key("down_blocks.2.resnets.0.conv1.weight") == "down_blocks.2.resnets.0.conv1.weight"
    assert resolved.teacher_key("mid_block.resnets.1.conv2.bias") == "mid_block.resnets.1.conv2.bias"
    assert resolved.teacher_key("conv_in.weight") == "conv_in.weight"


def test_tiny_up_stage_k_comes_from_teacher_stage_k_plus_one() -> None:
    resolved = resolve(PRESETS["bk-tiny"], get_arch("sd-v1.4").unet_config)
    assert resolved.teacher_key("up_blocks.0.resnets.1.conv1.weight") == "up_blocks.1.resnets.2.conv1.weight"
    assert resolved.teacher_key("up_blocks.2.upsamplers.0.conv.weight") == "up_blocks.3.upsamplers.0.conv.weight"
    assert resolved.teacher_key("up_blocks.1.upsamplers.0.conv.weight") == "up_blocks.2.upsamplers.0.conv.weight"
    fates = dict(resolved.block_fates())
    assert fates["down_blocks.2.downsamplers.0"] is None
    assert fates["down_blocks.3.resnets.0"] is None and fates["up_blocks.0.resnets.2"] is None
    assert fates["mid_block"] is None
    assert fates["up_blocks.1.attentions.2"] == "up_blocks.0.attentions.1"


def test_feature_pairs_follow_the_paper() -> None:
    config = get_arch("sd-v1.4").unet_config
    for preset in ("bk-base", "bk-small"):
        pairs = resolve(PRESETS[preset], config).feature_pairs()
        expected = [f"down_blocks.{i}" for i in range(4)] + [f"up_blocks.{i}" for i in range(4)]
        assert [(p.teacher, p.student) for p in pairs] == [(a, a) for a in expected]
    pairs = resolve(PRESETS["bk-tiny"], config).feature_pairs()
    assert [(p.teacher, p.student) for p in pairs] == [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
        ("up_blocks.1", "up_blocks.0"),
        ("up_blocks.2", "up_blocks.1"),
        ("up_blocks.3", "up_blocks.2"),
    ]
    # channels and downscale at 512 px: 64x64 latents -> 32, 16, 16 (tiny's innermost), 16, 32, 64
    assert [(p.channels, p.downscale) for p in pairs] == [
        (320, 2),
        (640, 4),
        (1280, 4),
        (1280, 2),
        (640, 1),
        (320, 1),
    ]


def test_sdxl_presets_resolve_with_three_stages_and_transformer_depths() -> None:
    config = get_arch("sdxl-base").unet_config
    base = resolve(PRESETS["bk-base"], config).student_config()
    assert base["layers_per_block"] == 1
    assert base["transformer_layers_per_block"] == [1, 2, 10]
    assert base["addition_embed_type"] == "text_time"
    small = resolve(PRESETS["bk-small"], config).student_config()
    assert small["mid_block_type"] is None
    tiny = resolve(PRESETS["bk-tiny"], config).student_config()
    assert tiny["block_out_channels"] == [320, 640]
    assert tiny["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]


def test_partial_transformer_stack_gives_nested_depths_and_maps_blocks() -> None:
    config = get_arch("sdxl-base").unet_config
    plan = plan_from_dict(
        {
            "name": "half-depth",
            "base": "bk-base",
            "transformer_blocks": {
                "down_blocks.2.attentions.*": "first:5",
                "mid_block.attentions.0": [0, 2, 4, 6, 8],
                "up_blocks.0.attentions.2": "last:3",
            },
        }
    )
    resolved = resolve(plan, config)
    student = resolved.student_config()
    assert student["transformer_layers_per_block"] == [[1], [2], [5]]
    assert student["reverse_transformer_layers_per_block"] == [[10, 3], [2, 2], [1, 1]]
    assert resolved.teacher_key("mid_block.attentions.0.transformer_blocks.3.attn1.to_q.weight") == (
        "mid_block.attentions.0.transformer_blocks.6.attn1.to_q.weight"
    )
    assert resolved.teacher_key("up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2.weight") == (
        "up_blocks.0.attentions.2.transformer_blocks.7.ff.net.2.weight"
    )
    wm = weight_map(resolved, shapes_of(meta_unet(student)), shapes_of(meta_unet(config)))
    assert wm.problems == []
    assert any(".transformer_blocks.9." in k for k in wm.unused)


def test_mid_depth_must_match_last_down_stage_in_diffusers() -> None:
    plan = Plan("mismatch", transformer_blocks=(("mid_block.attentions.0", "first:4"),))
    with pytest.raises(PlanError, match="diffusers sizes the mid block"):
        resolve(plan, get_arch("sdxl-base").unet_config)


def test_bad_plan_lists_every_problem_at_once() -> None:
    plan = Plan(
        "broken",
        down_layers="first",
        up_layers="all",  # 3 up layers against 1 down layer
        drop_innermost_stages=1,
        layers=(("down_blocks.7", "first"), ("down_blocks.1", ()), ("up_blocks.0", "first")),
        transformer_blocks=(("down_blocks.0.attentions.1", "first"), ("up_blocks.9.attentions.0", "all")),
    )
    with pytest.raises(PlanError) as info:
        resolve(plan, get_arch("sd-v1.4").unet_config)
    problems = info.value.problems
    text = str(info.value)
    assert "unknown block address 'down_blocks.7'" in text
    assert "down_blocks.1 keeps no layer" in text
    assert "up_blocks.0 is removed by drop_innermost_stages=1" in text
    assert "up_blocks.1 keeps 3 layers but its mirror down_blocks.2 keeps 1" in text
    assert "down_blocks.0.attentions.1 is removed by this plan" in text
    assert "unknown block address 'up_blocks.9.attentions.0'" in text
    assert len(problems) >= 6


def test_plan_that_does_not_fit_the_teacher() -> None:
    config = dict(get_arch("sd-v1.4").unet_config)
    config["down_block_types"] = ["SimpleCrossAttnDownBlock2D"] + config["down_block_types"][1:]
    with pytest.raises(PlanError, match="SimpleCrossAttnDownBlock2D"):
        resolve(PRESETS["bk-base"], config)
    with pytest.raises(PlanError, match="this teacher has 4 stages, so use 0..3"):
        resolve(Plan("too-deep", drop_innermost_stages=4), get_arch("sd-v1.4").unet_config)


def test_yaml_form_validates_keys_and_types() -> None:
    with pytest.raises(PlanError) as info:
        plan_from_dict(
            {
                "name": "x",
                "down_layer": "first",
                "up_layers": "sometimes",
                "mid_block": "maybe",
                "drop_innermost_stages": "1",
                "layers": ["up_blocks.1"],
                "base": "bk-huge",
            }
        )
    text = str(info.value)
    for fragment in (
        "unknown keys ['down_layer']",
        "unknown selector 'sometimes'",
        "mid_block must be",
        "drop_innermost_stages must be a whole number",
        "layers must map",
        "unknown preset 'bk-huge'",
    ):
        assert fragment in text


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_plan_round_trips_and_explicit_form_resolves_identically(preset: str) -> None:
    plan = PRESETS[preset]
    assert plan_from_dict(plan_to_dict(plan)) == plan
    for arch in ("sd-v1.4", "sdxl-base"):
        config = get_arch(arch).unet_config
        resolved = resolve(plan, config)
        again = resolve(plan_from_dict(plan_to_dict(resolved.explicit())), config)
        assert again.student_config() == resolved.student_config()
        assert (again.down, again.up, again.mid) == (resolved.down, resolved.up, resolved.mid)


def test_load_plan_from_yaml_file(tmp_path) -> None:
    path = tmp_path / "up01.yaml"
    path.write_text("name: up01\nbase: bk-base\nlayers:\n  up_blocks.*: [0, 1]\n")
    plan = load_plan(path)
    assert plan.layers == (("up_blocks.*", (0, 1)),) and plan.down_layers == "first"
    resolved = resolve(plan, get_arch("sd-v1.4").unet_config)
    assert resolved.teacher_key("up_blocks.2.resnets.1.conv1.weight") == "up_blocks.2.resnets.1.conv1.weight"
    with pytest.raises(PlanError, match="not a preset"):
        load_plan(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_plan(tmp_path / "bad.yaml")


def test_selectors() -> None:
    assert select("all", 3) == (0, 1, 2)
    assert select("first", 3) == (0,)
    assert select("last", 3) == (2,)
    assert select("first_and_last", 3) == (0, 2)
    assert select("first:2", 10) == (0, 1)
    assert select("last:3", 10) == (7, 8, 9)
    assert select((0, 2), 3) == (0, 2)
    for bad, message in [
        ((3,), "out of range"),
        ((2, 0), "increasing"),
        ("middle", "unknown selector"),
        ("first:11", "asks for 11"),
        ("first:x", "whole number"),
    ]:
        with pytest.raises(ValueError, match=message):
            select(bad, 10 if isinstance(bad, str) else 3)


def test_prune_report_counts_macs_at_the_latent_size_the_pipeline_samples(tmp_path) -> None:
    """The shapes teacher's VAE downsamples by 4, not SD's 8: its 64-px images are 16x16 latents, and the prune
    report's MACs are those of a 16x16 step (they were an 8x8 step's, a quarter, before)."""
    from bksdm.plan.prune import prune
    from bksdm.profiling import count_macs
    from bksdm.world.teacher import load_teacher

    report = prune(None, "bk-tiny", tmp_path / "student")
    teacher = load_teacher()
    assert teacher.vae_scale_factor == 4 and report["resolution"] == 64
    side = 64 // 4
    config = teacher.unet.config
    step = {
        "sample": torch.zeros(1, config.in_channels, side, side),
        "timestep": torch.full((1,), 999, dtype=torch.long),
        "encoder_hidden_states": torch.zeros(1, 77, config.cross_attention_dim),
    }
    assert report["unet"]["teacher"]["macs"] == count_macs(teacher.unet, **step).conv_linear
