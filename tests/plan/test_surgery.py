"""Student surgery on tiny SD-shaped teachers: exact copies, identity equivalence, feature pairs at run time."""

from __future__ import annotations

import pytest
import torch

from bksdm.plan.resolved import resolve
from bksdm.plan.spec import PRESETS, plan_from_dict
from bksdm.plan.surgery import SurgeryError, build_student
from bksdm.profiling import unet_inputs
from bksdm.world.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def teachers() -> dict:
    return {layout: build_tiny_pipeline(layout, seed=1).unet for layout in ("sd-v1", "sd-v2", "sdxl")}


def random_inputs(config: dict, seed: int = 0) -> dict:
    """Unit-scale random inputs (zeros would hide wiring mistakes)."""
    inputs = unet_inputs(config, config["sample_size"] * 8, batch=2)
    gen = torch.Generator().manual_seed(seed)
    inputs["sample"] = torch.randn(inputs["sample"].shape, generator=gen)
    inputs["encoder_hidden_states"] = torch.randn(inputs["encoder_hidden_states"].shape, generator=gen)
    inputs["timestep"] = torch.tensor([10, 700])
    if "added_cond_kwargs" in inputs:
        extra = inputs["added_cond_kwargs"]
        extra["text_embeds"] = torch.randn(extra["text_embeds"].shape, generator=gen)
        extra["time_ids"] = torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)
    return inputs


@pytest.mark.parametrize("layout", ["sd-v1", "sd-v2", "sdxl"])
def test_identity_student_equals_teacher(teachers: dict, layout: str) -> None:
    teacher = teachers[layout]
    surgery = build_student(teacher, PRESETS["identity"])
    inputs = random_inputs(dict(teacher.config))
    with torch.no_grad():
        expected = teacher(**inputs).sample
        got = surgery.student(**inputs).sample
    assert torch.equal(got, expected)
    assert surgery.weights.unused == ()


@pytest.mark.parametrize("layout", ["sd-v1", "sd-v2", "sdxl"])
@pytest.mark.parametrize("preset", ["bk-base", "bk-small", "bk-tiny"])
def test_every_copied_tensor_equals_its_source(teachers: dict, layout: str, preset: str) -> None:
    teacher = teachers[layout]
    partial = layout == "sdxl" and preset == "bk-tiny"  # see test_plan: SDXL's inner widths differ
    surgery = build_student(teacher, PRESETS[preset], allow_mismatched=partial)
    student_state, teacher_state = surgery.student.state_dict(), teacher.state_dict()
    assert set(surgery.weights.sources) | {m[0] for m in surgery.weights.mismatched} == set(student_state)
    for key, source in surgery.weights.sources.items():
        assert torch.equal(student_state[key], teacher_state[source]), key
    assert len(surgery.weights.mismatched) == (4 if partial else 0)
    # the student is a stock diffusers model that runs (SDXL: with its added conditioning)
    with torch.no_grad():
        out = surgery.student(**random_inputs(dict(teacher.config))).sample
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_removed_blocks_are_the_unused_teacher_tensors(teachers: dict) -> None:
    surgery = build_student(teachers["sd-v1"], PRESETS["bk-tiny"])
    unused = set(surgery.weights.unused)
    assert any(k.startswith("down_blocks.3.") for k in unused)
    assert any(k.startswith("mid_block.") for k in unused)
    assert any(k.startswith("down_blocks.2.downsamplers.0.") for k in unused)
    assert any(k.startswith("up_blocks.1.resnets.1.") for k in unused)
    assert not any(k.startswith(("up_blocks.1.resnets.2.", "conv_in.", "time_embedding.")) for k in unused)
    n_teacher = len(teachers["sd-v1"].state_dict())
    assert len(unused) + len(surgery.weights.sources) == n_teacher


def test_plan_with_shape_gaps_fails_with_every_gap_listed(teachers: dict) -> None:
    plan = plan_from_dict({"name": "up01", "base": "bk-base", "layers": {"up_blocks.*": [0, 1]}})
    with pytest.raises(SurgeryError) as info:
        build_student(teachers["sd-v1"], plan)
    text = str(info.value)
    # at layer 1, up stages 1 and 2 now take the skip of the downsampler below, which is narrower; stages 0
    # and 3 see skips of one width throughout, so they are filled
    for stage in (1, 2):
        for tensor in ("norm1.weight", "norm1.bias", "conv1.weight", "conv_shortcut.weight"):
            assert f"up_blocks.{stage}.resnets.1.{tensor}: shape" in text
    assert "up_blocks.0.resnets.1" not in text and "up_blocks.3.resnets.1" not in text
    assert "--allow-partial-init" in text
    surgery = build_student(teachers["sd-v1"], plan, allow_mismatched=True)
    assert len(surgery.weights.mismatched) == 8


def test_random_init_copies_nothing_and_is_seeded(teachers: dict) -> None:
    teacher = teachers["sd-v1"]
    a = build_student(teacher, PRESETS["bk-small"], init="random", seed=3).student.state_dict()
    b = build_student(teacher, PRESETS["bk-small"], init="random", seed=3).student.state_dict()
    c = build_student(teacher, PRESETS["bk-small"], init="random", seed=4).student.state_dict()
    key = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert not torch.equal(a[key], teacher.state_dict()[key])


@pytest.mark.parametrize("layout", ["sd-v1", "sd-v2", "sdxl"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_feature_pairs_have_equal_shapes_at_run_time(teachers: dict, layout: str, preset: str) -> None:
    teacher = teachers[layout]
    resolved = resolve(PRESETS[preset], dict(teacher.config))
    student = build_student(teacher, resolved, allow_mismatched=True).student
    shapes: dict[tuple[str, str], tuple] = {}

    def tap(model, name: str, role: str):
        def hook(_module, _args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            shapes[role, name] = tuple(tensor.shape)

        return model.get_submodule(name).register_forward_hook(hook)

    pairs = resolved.feature_pairs()
    handles = [tap(teacher, p.teacher, "t") for p in pairs] + [tap(student, p.student, "s") for p in pairs]
    inputs = random_inputs(dict(teacher.config))
    try:
        with torch.no_grad():
            teacher(**inputs)
            student(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    side = teacher.config.sample_size
    for p in pairs:
        assert shapes["t", p.teacher] == shapes["s", p.student], p
        shape = shapes["t", p.teacher]
        # (B, C, H, W) for conv outputs, (B, H*W, C) for linear projections
        if len(shape) == 4:
            assert shape[1:] == (p.channels, side // p.downscale, side // p.downscale), p
        else:
            assert shape[1:] == ((side // p.downscale) ** 2, p.channels), p
