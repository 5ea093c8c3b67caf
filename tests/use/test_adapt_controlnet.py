"""``bksdm adapt controlnet``: a teacher's ControlNet pruned with the student's plan, ``controlnet_from_student``, and
the brief output distillation.

Mechanics run on the tiny SD-v1 pipeline (SD's block layout, 16x16 latents) and students pruned from it, with a
ControlNet made from its U-Net whose every weight (the zero convolutions too) is perturbed, so that a wrong mapping
shows. The shapes-world figures (a ControlNet trained on the bundled teacher, carried to the distilled bk-small
student) are measured by ``benchmarks/adapt_controlnet_shapes.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from bksdm.cli import main
from bksdm.families import family_of
from bksdm.loading import load_plan
from bksdm.plan.archs import get_arch
from bksdm.plan.prune import OutputExistsError, prune
from bksdm.use.adapters.controlnet import (
    ControlNetMismatchError,
    check_controlnet_fits,
    controlnet_from_student,
    controlnet_skips,
    prune_controlnet,
    residual_shapes,
)
from bksdm.use.adapters.controlnet_job import adapt_controlnet
from bksdm.use.adapters.controlnet_kd import ControlNetKDSettings, KDSettingsError
from bksdm.use.adapters.student import StudentError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE = 128  # the tiny pipelines' image side (16x16 latents, VAE factor 8)


def perturbed_controlnet(unet: UNet2DConditionModel, seed: int = 1) -> ControlNetModel:
    """``ControlNetModel.from_unet`` with every weight moved (zero convolutions included): a stand-in for a trained
    one in which every tensor differs from every other."""
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return controlnet.eval()


def residuals(controlnet: ControlNetModel, config, seed: int = 0):
    """The ControlNet's residuals on one fixed random input: (down tuple, mid)."""
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, config["cross_attention_dim"], generator=g)
    control = torch.rand(1, 3, SIDE, SIDE, generator=g)
    with torch.no_grad():
        return controlnet(x, torch.tensor([500]), text, control, return_dict=False)


@pytest.fixture(scope="module")
def world(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny teacher, its perturbed ControlNet, and its bk-small, bk-tiny and identity students (pruned)."""
    root = tmp_path_factory.mktemp("adapt-controlnet")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    perturbed_controlnet(unet).save_pretrained(root / "controlnet")
    folders = {"teacher": tiny_sd_dir, "controlnet": root / "controlnet", "root": root}
    for plan in ("bk-small", "bk-tiny", "identity"):
        prune(str(tiny_sd_dir), plan, root / plan)
        folders[plan] = root / plan
    return folders


def resolved_of(world: dict[str, Path], plan: str):
    unet = UNet2DConditionModel.from_pretrained(world["teacher"] / "unet")
    config = dict(unet.config)
    return family_of(config).resolve(load_plan(plan), config)


# ------------------------------------------------------------------------------------------------ pruning


def test_residual_shapes_of_the_real_sd_architecture() -> None:
    """SD-v1.4's 12 skips + mid, and bk-small's / bk-tiny's, from the configs alone (channels, downscale)."""
    config = dict(get_arch("sd-v1.4").unet_config)
    assert residual_shapes(config) == (
        (320, 1), (320, 1), (320, 1), (320, 2), (640, 2), (640, 2), (640, 4),
        (1280, 4), (1280, 4), (1280, 8), (1280, 8), (1280, 8), (1280, 8),
    )  # fmt: skip
    small = family_of(config).resolve(load_plan("bk-small"), config).student_config()
    tiny = family_of(config).resolve(load_plan("bk-tiny"), config).student_config()
    assert residual_shapes(small) == (
        (320, 1), (320, 1), (320, 2), (640, 2), (640, 4), (1280, 4), (1280, 8), (1280, 8), (1280, 8),
    )  # fmt: skip
    assert residual_shapes(tiny) == ((320, 1), (320, 1), (320, 2), (640, 2), (640, 4), (1280, 4), (1280, 4))


@pytest.mark.parametrize(
    ("plan", "zero_convs"),
    [("identity", list(range(12))), ("bk-small", [0, 1, 3, 4, 6, 7, 9, 10]), ("bk-tiny", [0, 1, 3, 4, 6, 7])],
)
def test_zero_convolutions_follow_the_kept_skips(world, plan: str, zero_convs: list[int]) -> None:
    teacher, student = controlnet_skips(resolved_of(world, plan))
    assert [teacher.index(s) for s in student] == zero_convs
    assert teacher[:4] == ("conv_in", "down_blocks.0.attentions.0", "down_blocks.0.attentions.1",
                           "down_blocks.0.downsamplers.0")  # fmt: skip


def test_identity_plan_gives_the_teacher_controlnet(world) -> None:
    teacher = ControlNetModel.from_pretrained(world["controlnet"])
    carried = prune_controlnet(teacher, resolved_of(world, "identity"))
    want, have = teacher.state_dict(), carried.controlnet.state_dict()
    assert have.keys() == want.keys()
    assert all(torch.equal(have[k], want[k]) for k in want)
    assert carried.dropped_skips == () and carried.weights.unused == () and carried.mid_block == "plan"
    (down, mid), (ref_down, ref_mid) = residuals(carried.controlnet, teacher.config), residuals(teacher, teacher.config)
    assert len(down) == 12 and all(torch.equal(a, b) for a, b in zip(down, ref_down, strict=True))
    assert torch.equal(mid, ref_mid)


def test_bk_small_every_carried_tensor_is_its_source(world) -> None:
    teacher = ControlNetModel.from_pretrained(world["controlnet"])
    carried = prune_controlnet(teacher, resolved_of(world, "bk-small"))
    want, have = teacher.state_dict(), carried.controlnet.state_dict()
    assert set(carried.weights.sources) == set(have)  # every tensor has a source: nothing left at its init
    for key, source in carried.weights.sources.items():
        assert torch.equal(have[key], want[source]), key
    # the layer kept in each stage is the teacher's layer 0; the downsampler's skip moves from residual 3 to 2
    assert carried.weights.sources["down_blocks.1.attentions.0.proj_out.weight"] == (
        "down_blocks.1.attentions.0.proj_out.weight"
    )
    assert carried.weights.sources["controlnet_down_blocks.2.weight"] == "controlnet_down_blocks.3.weight"
    assert carried.weights.sources["controlnet_down_blocks.7.bias"] == "controlnet_down_blocks.10.bias"
    assert carried.weights.sources["mid_block.attentions.0.proj_in.weight"] == "mid_block.attentions.0.proj_in.weight"
    assert not any(k.startswith("down_blocks.0.attentions.1.") for k in have)
    assert carried.dropped_skips == (
        "down_blocks.0.attentions.1", "down_blocks.1.attentions.1", "down_blocks.2.attentions.1",
        "down_blocks.3.resnets.1",
    )  # fmt: skip
    assert carried.mid_block == "keep"


@pytest.mark.parametrize(("plan", "count", "mid_side"), [("bk-small", 8, 2), ("bk-tiny", 6, 4)])
@pytest.mark.parametrize("mid_block", ["keep", "resnet"])
def test_residuals_fit_the_student_skips(world, plan: str, count: int, mid_side: int, mid_block: str) -> None:
    """The carried residuals have the shapes of the student's own skip connections (read from its forward)."""
    teacher = ControlNetModel.from_pretrained(world["controlnet"])
    carried = prune_controlnet(teacher, resolved_of(world, plan), mid_block=mid_block)
    down, mid = residuals(carried.controlnet, teacher.config)
    student = UNet2DConditionModel.from_pretrained(world[plan] / "unet")
    stored: list[torch.Tensor] = []
    hooks = [student.conv_in.register_forward_hook(lambda m, i, o: stored.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: stored.extend(o[1])) for b in student.down_blocks]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, student.config.cross_attention_dim)
    with torch.no_grad():
        student(x, torch.tensor([500]), text)
    for h in hooks:
        h.remove()
    assert [tuple(d.shape) for d in down] == [tuple(s.shape) for s in stored] and len(down) == count
    assert tuple(mid.shape) == (1, 96, mid_side, mid_side)
    if mid_block == "resnet":
        assert carried.controlnet.config.mid_block_type == "UNetMidBlock2D"
        assert carried.weights.sources["mid_block.resnets.0.conv1.weight"] == "mid_block.resnets.0.conv1.weight"


def test_a_narrower_innermost_stage_gets_a_fresh_mid_block() -> None:
    """SDXL-like widths (32, 64, 96) with bk-tiny: the student's innermost stage is 64 wide, the ControlNet's mid block
    96. ``keep`` cannot hold the mid block's 3 transformer blocks after a stage of depth 2 and is refused; ``resnet``
    starts the mid block afresh, its residual at zero."""
    from bksdm.world.tiny import tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config("sdxl"))
    config = dict(unet.config)
    resolved = family_of(config).resolve(load_plan("bk-tiny"), config)
    teacher = perturbed_controlnet(unet)
    with pytest.raises(ControlNetMismatchError, match="transformer depth \\(2\\).*has 3 transformer blocks"):
        prune_controlnet(teacher, resolved)
    carried = prune_controlnet(teacher, resolved, mid_block="resnet")
    assert residual_shapes(dict(carried.controlnet.config)) == residual_shapes(resolved.student_config())
    assert "controlnet_mid_block.weight" in carried.fresh and "mid_block.resnets.0.conv1.weight" in carried.fresh
    assert not carried.controlnet.controlnet_mid_block.weight.any()
    assert not any(k.startswith("down_blocks.") for k in carried.fresh)


# ------------------------------------------------------------------------------------------------ the job


def test_adapt_writes_a_controlnet_that_stock_diffusers_runs_with_the_student(world, tmp_path: Path) -> None:
    out = tmp_path / "carried"
    report = adapt_controlnet(world["bk-small"], world["controlnet"], out)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapt_report.json", "adapt_report.md", "config.json", "diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert json.loads((out / "adapt_report.json").read_text()) == report
    assert len(report["residuals"]["skips"]) == 8 and len(report["residuals"]["dropped_skips"]) == 4
    assert report["params"]["carried"] + report["params"]["dropped"] == report["params"]["teacher_controlnet"]
    loaded = ControlNetModel.from_pretrained(out)
    expected = prune_controlnet(ControlNetModel.from_pretrained(world["controlnet"]), resolved_of(world, "bk-small"))
    assert all(torch.equal(v, expected.controlnet.state_dict()[k]) for k, v in loaded.state_dict().items())

    pipe = StableDiffusionControlNetPipeline.from_pretrained(world["bk-small"], controlnet=loaded)
    pipe.set_progress_bar_config(disable=True)
    control = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    run = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(0)}
    image = pipe("a red circle", image=control, **run).images
    assert image.shape == (1, SIDE, SIDE, 3) and np.isfinite(image).all()

    # Without pruning, the teacher's ControlNet does not fit the student: the stock pipeline fails on shapes.
    pipe.controlnet = ControlNetModel.from_pretrained(world["controlnet"])
    with pytest.raises(RuntimeError, match="size of tensor"):
        pipe("a red circle", image=control, **run)


def test_the_command_writes_the_chosen_mid_block(world, tmp_path: Path) -> None:
    out = tmp_path / "carried"
    args = ["adapt", "controlnet", "--student", str(world["bk-tiny"]), "--controlnet", str(world["controlnet"])]
    assert main([*args, "--out", str(out), "--controlnet-mid", "resnet"]) == 0
    report = json.loads((out / "adapt_report.json").read_text())
    assert report["residuals"]["mid"] == {"channels": 96, "downscale": 4, "block": "resnet"}
    assert len(report["residuals"]["skips"]) == 6 and report["tensors"]["fresh"] == []
    assert ControlNetModel.from_pretrained(out).config.mid_block_type == "UNetMidBlock2D"


def test_an_sdxl_student_runs_with_its_carried_controlnet(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLControlNetPipeline

    prune(str(tiny_sdxl_dir), "bk-small", tmp_path / "student")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    perturbed_controlnet(unet).save_pretrained(tmp_path / "controlnet")
    report = adapt_controlnet(tmp_path / "student", tmp_path / "controlnet", tmp_path / "out")
    assert len(report["residuals"]["skips"]) == 6 and report["residuals"]["mid"]["block"] == "keep"
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tmp_path / "student", controlnet=ControlNetModel.from_pretrained(tmp_path / "out")
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", image=Image.new("RGB", (SIDE, SIDE)), num_inference_steps=2, output_type="np",
        height=SIDE, width=SIDE, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, SIDE, SIDE, 3) and np.isfinite(image).all()


def test_a_controlnet_of_another_teacher_is_refused_before_writing(world, tiny_sd2_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "sd2-controlnet"
    perturbed_controlnet(UNet2DConditionModel.from_pretrained(tiny_sd2_dir / "unet")).save_pretrained(other)
    out = tmp_path / "out"
    with pytest.raises(ControlNetMismatchError, match="was not made for the student's teacher") as err:
        adapt_controlnet(world["bk-small"], other, out)
    assert "cross_attention_dim" in str(err.value)
    assert not out.exists()
    code = main(["adapt", "controlnet", "--student", str(world["bk-small"]), "--controlnet", str(other),
                 "--out", str(out)])  # fmt: skip
    assert code == 2 and not out.exists()


def test_a_controlnet_pruned_for_another_plan_is_refused(world, tmp_path: Path) -> None:
    tiny = tmp_path / "for-bk-tiny"
    adapt_controlnet(world["bk-tiny"], world["controlnet"], tiny)
    with pytest.raises(ControlNetMismatchError, match="not one already pruned for a student") as err:
        adapt_controlnet(world["bk-small"], tiny, tmp_path / "out")
    assert "down_block_types" in str(err.value) and "layers_per_block [1, 1, 1]" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_fit_check_lists_every_difference() -> None:
    config = dict(get_arch("sd-v1.4").unet_config)
    with pytest.raises(ControlNetMismatchError, match="is a UNet2DConditionModel, not a ControlNetModel"):
        check_controlnet_fits(config, config, "cn", "sd")
    wider = {**config, "_class_name": "ControlNetModel", "block_out_channels": [320, 640, 1280, 2560],
             "layers_per_block": [2, 2, 2, 2]}  # fmt: skip
    with pytest.raises(ControlNetMismatchError) as err:
        check_controlnet_fits(wider, config, "cn", "sd")
    assert "block_out_channels [320, 640, 1280, 2560] (teacher: [320, 640, 1280, 1280])" in str(err.value)
    assert "layers_per_block" not in str(err.value)  # 2 and [2, 2, 2, 2] are the same layout


def test_a_student_without_a_plan_file_is_refused(world, tmp_path: Path) -> None:
    planless = tmp_path / "planless"
    shutil.copytree(world["bk-small"], planless)
    (planless / "bksdm_plan.yaml").unlink()
    with pytest.raises(StudentError, match="has no bksdm_plan.yaml"):
        adapt_controlnet(planless, world["controlnet"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_student_of_another_teacher_is_refused(world, tiny_sd2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not what its plan makes from the teacher"):
        adapt_controlnet(world["bk-small"], world["controlnet"], tmp_path / "out", teacher=tiny_sd2_dir)
    assert not (tmp_path / "out").exists()


def test_a_transformer_student_is_refused(tmp_path: Path) -> None:
    from bksdm.world.tiny_dit import save_tiny_dit_pipeline

    teacher = save_tiny_dit_pipeline(tmp_path / "sd3", "sd3")
    prune(str(teacher), "keep-half", tmp_path / "student")
    with pytest.raises(StudentError, match="SD3 / FLUX.1 students is not supported yet"):
        adapt_controlnet(tmp_path / "student", tmp_path / "missing-controlnet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_occupied_out_is_refused_and_kept(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        adapt_controlnet(world["bk-small"], world["controlnet"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_distill_options_go_together(world, tmp_path: Path, capsys) -> None:
    code = main(["adapt", "controlnet", "--student", str(world["bk-small"]), "--controlnet", str(world["controlnet"]),
                 "--out", str(tmp_path / "out"), "--distill-steps", "5"])  # fmt: skip
    assert code == 2 and "--distill-steps N and --data DIR go together" in capsys.readouterr().err
    with pytest.raises(KDSettingsError, match="steps must be >= 1"):
        ControlNetKDSettings(data="x", steps=0).check()


# ------------------------------------------------------------------------------------------------ from a student


@pytest.mark.parametrize("plan", ["bk-small", "bk-tiny"])
def test_controlnet_from_student_runs_in_the_stock_pipeline(world, plan: str) -> None:
    """Stock ``from_unet`` refuses the mid-block-less student; ours mirrors it, and with its zero convolutions the
    stock ControlNet pipeline draws exactly the student's own image."""
    student = UNet2DConditionModel.from_pretrained(world[plan] / "unet")
    with pytest.raises(ValueError, match="unknown mid_block_type : None"):
        ControlNetModel.from_unet(student)
    controlnet = controlnet_from_student(student)
    assert controlnet.config.mid_block_type == "UNetMidBlock2D"
    assert residual_shapes(dict(controlnet.config)) == residual_shapes(dict(student.config))
    want = student.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in controlnet.state_dict().items() if k.startswith("down_blocks."))
    base = StableDiffusionPipeline.from_pretrained(world[plan])
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    for p in (base, pipe):
        p.set_progress_bar_config(disable=True)
    run = {"num_inference_steps": 2, "output_type": "np"}
    plain = base("a red circle", generator=torch.Generator().manual_seed(3), **run).images
    controlled = pipe(
        "a red circle", image=Image.new("RGB", (SIDE, SIDE)), generator=torch.Generator().manual_seed(3), **run
    ).images
    assert np.array_equal(plain, controlled)


# ------------------------------------------------------------------------------------------------ distillation


def control_data(folder: Path, count: int = 8) -> Path:
    """Images, captions and control images (a white square where a red one is) in the layout the KD reads."""
    folder.mkdir(parents=True)
    rows = ["file_name,text,conditioning_image"]
    for i in range(count):
        image, control = Image.new("RGB", (SIDE, SIDE), "white"), Image.new("RGB", (SIDE, SIDE), "black")
        box = (8 * i, 8 * i, 8 * i + 40, 8 * i + 40)
        image.paste((220, 40, 40), box)
        control.paste((255, 255, 255), box)
        image.save(folder / f"{i}.png")
        control.save(folder / f"{i}-control.png")
        rows.append(f"{i}.png,a red square,{i}-control.png")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_a_short_distillation_lowers_the_kd_loss(world, tmp_path: Path) -> None:
    settings = ControlNetKDSettings(
        data=str(control_data(tmp_path / "data")), steps=6, batch_size=4, lr=1e-3, log_every=2, probe_size=8
    )
    out = tmp_path / "carried"
    report = adapt_controlnet(world["bk-small"], world["controlnet"], out, distill=settings)
    d = report["distillation"]
    assert d["steps"] == 6 and [r["step"] for r in d["log"]] == [2, 4, 6]
    assert d["probe_loss_kd_out"]["after"] < 0.9 * d["probe_loss_kd_out"]["before"]
    run = tmp_path / "carried-kd"
    assert (run / "checkpoints" / "checkpoint-0000006" / "controlnet" / "config.json").is_file()
    assert len((run / "logs" / "metrics.jsonl").read_text().splitlines()) == 3
    pruned = prune_controlnet(ControlNetModel.from_pretrained(world["controlnet"]), resolved_of(world, "bk-small"))
    trained = ControlNetModel.from_pretrained(out).state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in pruned.controlnet.state_dict().items())


def test_the_probe_loss_does_not_depend_on_the_chunks_it_runs_in(world, tmp_path: Path) -> None:
    """The probe runs in chunks of the training batch size (memory of one training forward): 8 samples in chunks of
    3 (3 + 3 + 2) give the loss of one batch of 8, to float rounding."""
    data = str(control_data(tmp_path / "data"))
    before = {}
    for batch in (3, 8):
        settings = ControlNetKDSettings(data=data, steps=1, batch_size=batch, lr=1e-3, probe_size=8)
        report = adapt_controlnet(world["bk-small"], world["controlnet"], tmp_path / f"b{batch}", distill=settings)
        before[batch] = report["distillation"]["probe_loss_kd_out"]["before"]
    assert before[8] > 0
    assert before[3] == pytest.approx(before[8], rel=1e-5)


def test_a_resumed_distillation_ends_with_the_uninterrupted_weights(world, tmp_path: Path) -> None:
    data = str(control_data(tmp_path / "data"))
    whole = ControlNetKDSettings(data=data, steps=4, batch_size=4, lr=1e-3, probe_size=4)
    adapt_controlnet(world["bk-small"], world["controlnet"], tmp_path / "whole", distill=whole)
    first = ControlNetKDSettings(data=data, steps=2, batch_size=4, lr=1e-3, probe_size=4, run_dir=str(tmp_path / "run"))
    adapt_controlnet(world["bk-small"], world["controlnet"], tmp_path / "half", distill=first)
    with pytest.raises(ValueError, match="holds another run"):  # the run folder is not silently reused
        adapt_controlnet(world["bk-small"], world["controlnet"], tmp_path / "again", distill=first)
    rest = ControlNetKDSettings(
        data=data, steps=4, batch_size=4, lr=1e-3, probe_size=4, run_dir=str(tmp_path / "run"), resume=True, log_every=1
    )
    report = adapt_controlnet(world["bk-small"], world["controlnet"], tmp_path / "resumed", distill=rest)
    assert [r["step"] for r in report["distillation"]["log"]] == [3, 4]
    want = ControlNetModel.from_pretrained(tmp_path / "whole").state_dict()
    have = ControlNetModel.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(have[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------ the shapes ControlNet


def test_control_images_mark_where_the_shape_is(tmp_path: Path) -> None:
    from bksdm.train.data.batch_sampling import SampleRef
    from bksdm.use.adapters.controlnet_kd import ControlPairs
    from bksdm.world.train_controlnet import (
        CONTROL_RADIUS,
        TRAIN_SEED,
        control_pairs,
        export_control_data,
        shape_centre,
    )

    images, controls, scenes = control_pairs(TRAIN_SEED, 0, 64)
    for image, control, scene in zip(images, controls, scenes, strict=True):
        x, y = shape_centre(image)
        assert f"{'top' if y < 32 else 'bottom'} {'left' if x < 32 else 'right'}" == scene.position
        disc = np.asarray(control)[..., 0] > 127  # (64, 64)
        ys, xs = np.nonzero(disc)
        assert abs(xs.mean() - x) < 1 and abs(ys.mean() - y) < 1
        assert abs(disc.sum() - np.pi * CONTROL_RADIUS**2) < 25
    data = export_control_data(tmp_path / "data", 6, seed=TRAIN_SEED)
    lines = (data / "metadata.csv").read_text().splitlines()
    assert lines[0] == "file_name,text,conditioning_image" and lines[1].endswith(",000000-control.png")
    assert lines[1].split(",")[1] == f"a {scenes[0].size} {scenes[0].color} {scenes[0].shape}"
    sample = ControlPairs(ControlNetKDSettings(data=str(data)), 64)[SampleRef(0, 0, 0)]
    assert sample["control"].shape == (3, 64, 64) and sample["control"].min() == 0 and sample["control"].max() == 1


def test_train_controlnet_writes_a_stock_controlnet_with_its_record(tmp_path: Path) -> None:
    from bksdm.world.train_controlnet import ControlNetRecipe, train_controlnet

    record = train_controlnet(ControlNetRecipe(out=str(tmp_path / "cn"), steps=2, batch=4), "the command")
    controlnet = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert tuple(controlnet.config.conditioning_embedding_out_channels) == (16, 32, 64)  # 64 px -> 16x16 latents
    assert json.loads((tmp_path / "cn" / "bksdm_toy.json").read_text()) == record
    assert record["training"]["command"] == "the command" and record["training"]["settings"]["steps"] == 2
    assert "CPU cores" in record["training"]["machine"]
