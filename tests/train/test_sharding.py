"""Sharded training (``train.sharding=fsdp``, FSDP2): what is sharded, whole tensors back out, and two CPU processes
with a sharded student (FLUX, SD3.5, U-Net) take the same steps as one unsharded process, checkpoints included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import make_shapes, run_cli, run_two_processes
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from test_train import overrides

from bksdm.plan.spec import ALL_PRESETS
from bksdm.plan.surgery import build_student
from bksdm.train.sharding import (
    full_state,
    is_sharded,
    placed_like,
    plain_model,
    shard_model,
    shard_units,
    wants_sharding,
)
from bksdm.world.tiny import save_tiny_pipeline
from bksdm.world.tiny_dit import build_tiny_dit_pipeline, save_tiny_dit_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_the_units_are_every_block_of_the_top_level_lists_then_the_model() -> None:
    flux = build_tiny_dit_pipeline("flux", seed=1).transformer
    units = shard_units(flux)
    assert units == [*flux.transformer_blocks, *flux.single_transformer_blocks, flux]
    from bksdm.world.tiny import build_tiny_pipeline  # the U-Net: down and up blocks, then the rest

    unet = build_tiny_pipeline().unet
    assert shard_units(unet) == [*unet.down_blocks, *unet.up_blocks, unet]


def test_the_settings_sharding_cannot_take_fail_before_any_work() -> None:
    assert wants_sharding("fsdp", 2, "no", False) and wants_sharding("fsdp", 8, "bf16", False)
    assert not wants_sharding("none", 8, "fp16", True)
    with pytest.warns(UserWarning, match="one process: nothing to shard"):
        assert not wants_sharding("fsdp", 1, "no", False)
    with pytest.raises(ValueError, match="not fp16"):
        wants_sharding("fsdp", 2, "fp16", False)
    with pytest.raises(ValueError, match="use_8bit_adam=false"):
        wants_sharding("fsdp", 2, "bf16", True)


def test_unsharded_tensors_pass_through_and_one_process_cannot_shard() -> None:
    model = build_tiny_dit_pipeline("flux", seed=1).transformer
    weights = full_state(model)
    assert not is_sharded(model.parameters())
    assert all(weights[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())  # no copies
    assert plain_model(model, weights, type(model)) is model
    reference = next(model.parameters())
    assert placed_like(reference, reference.detach() * 2) is not reference
    with pytest.raises(ValueError, match="several processes"):
        shard_model(model, torch.device("cpu"))


def test_a_plain_model_holds_the_given_tensors_without_copying_them() -> None:
    model = build_tiny_dit_pipeline("flux", seed=1).transformer
    other = {k: v.clone() + 1 for k, v in model.state_dict().items()}  # e.g. the EMA weights
    plain = plain_model(model, other, type(model))
    assert plain is not model and type(plain) is type(model) and plain.config == model.config
    state = plain.state_dict()
    assert all(state[k].data_ptr() == other[k].data_ptr() for k in other)
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])


TEACHERS = {  # layout -> (tiny teacher writer, plan, denoiser folder)
    "flux": (lambda path: save_tiny_dit_pipeline(path, "flux"), "keep-half", "transformer"),
    "sd3.5": (lambda path: save_tiny_dit_pipeline(path, "sd3.5"), "keep-half", "transformer"),
    "sd-v1": (lambda path: save_tiny_pipeline(path, "sd-v1"), "bk-small", "unet"),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", TEACHERS)
def test_two_sharded_processes_take_the_same_steps_as_one_and_write_the_same_checkpoints(tmp_path, layout) -> None:
    write_teacher, plan, folder = TEACHERS[layout]
    teacher = write_teacher(tmp_path / "teacher")
    shapes = make_shapes(tmp_path / "shapes")
    common = dict(
        model__plan=plan, train__max_steps=4, train__checkpoint_every=2, train__use_ema=True,
        train__ema_decay=0.5, optim__max_grad_norm=1.0,
    )  # fmt: skip
    one = run_cli(["distill", *overrides(teacher, shapes, tmp_path / "one", train__batch_size=4, **common)])
    assert one.wait(timeout=300) == 0, one.stdout.read()

    def two(out: Path, *extra: str) -> None:
        args = overrides(teacher, shapes, out, train__batch_size=2, train__sharding="fsdp", **common)
        args += ["train.validate_every=4", "train.validation_steps=2"]  # drawn by both processes, written by one
        done = run_two_processes(["distill", *args, *extra])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "distill, sharded: 100%" in done.stderr  # the progress bar says so

    two(tmp_path / "two")
    assert (tmp_path / "two" / "validation" / "step-0000004.png").is_file()
    student = build_student(getattr(DiffusionPipeline.from_pretrained(teacher), folder), ALL_PRESETS[plan]).student
    start = student.state_dict()

    def assert_same_update(a: dict, b: dict) -> None:
        assert a.keys() == b.keys() == start.keys()
        update_a = torch.cat([(a[k] - start[k]).flatten() for k in a])
        update_b = torch.cat([(b[k] - start[k]).flatten() for k in a])
        assert (update_a != 0).float().mean() > 0.5  # the steps really moved the weights
        assert (update_a - update_b).abs().max() < 1e-5  # float tolerance: gradients reduced in another order
        assert (update_a - update_b).norm() < 1e-3 * update_a.norm()

    for name in (f"student/{folder}", f"checkpoints/checkpoint-0000002/{folder}_ema"):  # EMA weights
        assert_same_update(load_file(tmp_path / "one" / name / WEIGHTS), load_file(tmp_path / "two" / name / WEIGHTS))
    raw = f"checkpoints/checkpoint-0000004/{folder}"
    assert_same_update(load_file(tmp_path / "one" / raw / WEIGHTS), load_file(tmp_path / "two" / raw / WEIGHTS))
    # The optimizer state is stored whole, as an unsharded run stores it: same keys, same shapes, same values.
    state = "checkpoints/checkpoint-0000002/training_state.safetensors"
    a, b = load_file(tmp_path / "one" / state), load_file(tmp_path / "two" / state)
    moments = sorted(k for k in a if k.startswith("optimizer.") and not k.endswith(".step"))
    assert moments and sorted(k for k in b if k in moments) == moments
    for key in moments:
        assert a[key].shape == b[key].shape
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-7)

    # Sharded processes resume the unsharded run's checkpoint (whole tensors placed back as shards) and finish it.
    resumed = tmp_path / "resumed"
    two(resumed, "--resume", str(tmp_path / "one" / "checkpoints" / "checkpoint-0000002"))
    for name in (f"student/{folder}", raw):
        assert_same_update(load_file(tmp_path / "one" / name / WEIGHTS), load_file(resumed / name / WEIGHTS))
    pipe = DiffusionPipeline.from_pretrained(resumed / "student")  # a stock pipeline, no bksdm code
    saved = {k: v for k, v in getattr(pipe, folder).config.items() if not k.startswith("_")}
    assert saved == {k: v for k, v in student.config.items() if not k.startswith("_")}
