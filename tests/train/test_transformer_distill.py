"""Distillation of diffusion-transformer teachers (SD3, SD3.5 with dual attention, FLUX.1) on tiny stock pipelines:
the KD step's terms against hand-computed MSEs, a short ``bksdm distill`` through the CLI, cached = uncached,
SIGKILL + resume = uninterrupted, and two processes = one."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import kill_at_checkpoint, make_shapes, run_cli, run_two_processes
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import overrides
from torch import nn

from bksdm.cli import main
from bksdm.families import denoiser_of, family_of
from bksdm.plan.spec import ALL_PRESETS
from bksdm.plan.surgery import build_student
from bksdm.train.kd import LossWeights, draw_noise, kd_step
from bksdm.world.tiny_dit import build_tiny_dit_pipeline, save_tiny_dit_pipeline

LAYOUTS = ("sd3", "sd3.5", "flux")
PIPELINES = {"sd3": StableDiffusion3Pipeline, "sd3.5": StableDiffusion3Pipeline, "flux": FluxPipeline}
BATCH = 2
LATENT = (16, 16, 16)  # (C, h, w) of a 128-px image: 16 latent channels, the VAE downsamples by 8
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {layout: build_tiny_dit_pipeline(layout, seed=1) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit-teachers")
    return {layout: save_tiny_dit_pipeline(root / layout, layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def dit_overrides(teacher: Path, data: Path, out: Path, **extra) -> list[str]:
    """The U-Net recipe tests' settings with a transformer plan (128 px, batch 2, fp32, no EMA unless asked)."""
    return overrides(teacher, data, out, **{"model__plan": "keep-half", **extra})


def forward_hooks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ------------------------------------------------------------------------------------------ kd_step


def setup(pipe, preset: str) -> tuple:
    """Teacher, student, the flow scheduler, the feature pairs and fixed inputs for one tiny pipeline."""
    teacher = denoiser_of(pipe)
    family = family_of(teacher)
    resolved = family.resolve(ALL_PRESETS[preset], dict(teacher.config))
    student = build_student(teacher, resolved).student
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = teacher.config
    timesteps, noise, _ = draw_noise(
        0, 0, range(BATCH), LATENT, 1000, "cpu", lambda g: family.sample_timestep(g, scheduler.config, LATENT)
    )
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "latents": torch.randn(BATCH, *LATENT, generator=gen),
        "encoder_hidden_states": torch.randn(BATCH, 12, config.joint_attention_dim, generator=gen),  # (B, L, D)
        "timesteps": timesteps,  # (B,) float: sigma * 1000
        "noise": noise,
        "added_cond_kwargs": family.conditioning(
            torch.randn(BATCH, config.pooled_projection_dim, generator=gen), 128, "cpu", config
        ),
    }
    return family, teacher, student, scheduler, resolved.feature_pairs(), inputs


def hand_forward(model: nn.Module, noisy: torch.Tensor, inputs: dict, addresses: list[str]) -> tuple:
    """The denoiser called as its stock pipeline calls it, with this test's own hooks: (prediction, outputs)."""
    outputs: dict[str, tuple] = {}
    handles = [
        model.get_submodule(a).register_forward_hook(lambda _m, _i, out, a=a: outputs.__setitem__(a, out))
        for a in dict.fromkeys(addresses)
    ]
    cond, t, text = inputs["added_cond_kwargs"], inputs["timesteps"], inputs["encoder_hidden_states"]
    try:
        if isinstance(model, FluxTransformer2DModel):
            b, c, h, w = noisy.shape
            out = model(
                hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),  # (B, h/2 * w/2, 4C)
                timestep=t / 1000,
                guidance=cond.get("guidance"),
                pooled_projections=cond["pooled_projections"],
                encoder_hidden_states=text,
                txt_ids=torch.zeros(text.shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            ).sample
            pred = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # (B, C, h, w)
        else:
            pred = model(
                hidden_states=noisy,
                timestep=t,
                encoder_hidden_states=text,
                pooled_projections=cond["pooled_projections"],
            ).sample
    finally:
        for handle in handles:
            handle.remove()
    return pred, outputs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kd_terms_equal_hand_computed_mse(pipes, layout, monkeypatch) -> None:
    monkeypatch.setenv("BKSDM_ONEDNN", "0")  # PyTorch's own kernels, as in the hand computation
    family, teacher, student, scheduler, pairs, inputs = setup(pipes[layout], "keep-half")
    student.train()
    grad_mode = []  # no_grad keeps the teacher from storing activations
    handle = teacher.register_forward_pre_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))
    try:
        losses = kd_step(
            student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights(), family=family
        )
    finally:
        handle.remove()
    assert grad_mode == [False]

    # Rectified flow (SD3, FLUX.1): x_t = (1 - s) x_0 + s n with s = t / 1000; the target is n - x_0.
    latents, noise = inputs["latents"], inputs["noise"]
    sigma = (inputs["timesteps"] / 1000).view(-1, 1, 1, 1)
    assert sigma.min() > 0 and sigma.max() < 1
    noisy, target = (1 - sigma) * latents + sigma * noise, noise - latents
    with torch.no_grad():
        t_pred, t_out = hand_forward(teacher, noisy, inputs, [p.teacher for p in pairs])
        s_pred, s_out = hand_forward(student, noisy, inputs, [p.student for p in pairs])
    expected_feat = sum(((s_out[p.student][p.output] - t_out[p.teacher][p.output]) ** 2).mean() for p in pairs)
    expected = {
        "loss_task": ((s_pred - target) ** 2).mean(),
        "loss_kd_out": ((s_pred - t_pred) ** 2).mean(),
        "loss_kd_feat": expected_feat,
    }
    for key, value in expected.items():
        torch.testing.assert_close(losses[key].detach(), value, rtol=1e-5, atol=0, msg=key)
        assert value > 0, key
    torch.testing.assert_close(losses["loss"].detach(), sum(expected.values()), rtol=1e-5, atol=0)
    # both streams of every joint block are compared (SD3's last block has only the image stream)
    streams = {(p.student, p.stream) for p in pairs}
    assert {s for _, s in streams} == {"image", "text"}
    assert len(pairs) == {"sd3": 5, "sd3.5": 5, "flux": 10}[layout]

    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert sum(g.abs().sum().item() for g in grads.values()) > 0
    assert forward_hooks(teacher) == [] and forward_hooks(student) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_student_has_zero_kd_terms(pipes, layout, monkeypatch) -> None:
    monkeypatch.setenv("BKSDM_ONEDNN", "0")
    family, teacher, student, scheduler, pairs, inputs = setup(pipes[layout], "identity")
    assert len(pairs) == {"sd3": 11, "sd3.5": 11, "flux": 18}[layout]  # 2 streams a block, 1 for SD3's last
    losses = kd_step(student, teacher, scheduler, **inputs, feature_pairs=pairs, weights=LossWeights(), family=family)
    assert losses["loss_task"].item() > 0.1
    assert losses["loss_kd_out"].item() == 0.0 and losses["loss_kd_feat"].item() == 0.0
    assert losses["loss"].item() == losses["loss_task"].item()
    assert forward_hooks(teacher) == [] and forward_hooks(student) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_teacher_with_fp32_student(pipes, layout) -> None:
    family, teacher, student, scheduler, pairs, inputs = setup(pipes[layout], "keep-half")
    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    kwargs = dict(feature_pairs=pairs, weights=LossWeights(), family=family)
    losses = kd_step(student, teacher_bf16, scheduler, **inputs, **kwargs)
    reference = kd_step(student, teacher, scheduler, **inputs, **kwargs)
    for key, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    assert torch.equal(losses["loss_task"], reference["loss_task"])  # the task term never sees the teacher
    # The KD terms see the teacher at bf16's precision. Measured kd_out / kd_feat, bf16 vs fp32 teacher: sd3 0.00508
    # / 0.00510 and 0.03517 / 0.0351; sd3.5 0.01105 / 0.01103; flux 0.00993 / 0.00853 and 0.0409 / 0.0370 (FLUX casts
    # its timestep and guidance to the model's dtype, as in its bf16 pipeline); the total within 0.3%.
    for key in ("loss_kd_out", "loss_kd_feat"):
        assert losses[key].item() != reference[key].item()
        assert math.isclose(losses[key].item(), reference[key].item(), rel_tol=0.25), key
    assert math.isclose(losses["loss"].item(), reference["loss"].item(), rel_tol=1e-2)
    assert next(teacher_bf16.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ the recipe


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_short_run_lowers_the_loss_and_writes_a_stock_pipeline(teacher_dirs, shapes_dir, tmp_path, layout) -> None:
    out = tmp_path / "run"
    extra = dict(
        train__max_steps=16,
        train__log_every=4,
        train__checkpoint_every=8,
        train__use_ema=True,
        optim__lr=1e-3,
        train__validate_every=16,
        train__validation_steps=2,
        train__validation_prompts='["a red circle"]',
    )
    assert main(["distill", *dit_overrides(teacher_dirs[layout], shapes_dir, out, **extra)]) == 0
    records = records_of(out)
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    assert all(r["loss_kd_out"] > 0 and r["loss_kd_feat"] > 0 for r in records)
    # Measured (seed 1234, 16 steps of 2 images, lr 1e-3): last / first window 0.966 (sd3), 0.952 (sd3.5),
    # 0.906 (flux); the same runs at lr 1e-9, which learn nothing, gave 0.995, 0.988 and 0.999.
    assert records[-1]["loss"] < 0.98 * records[0]["loss"], [r["loss"] for r in records]

    teacher = PIPELINES[layout].from_pretrained(teacher_dirs[layout])
    pipe = PIPELINES[layout].from_pretrained(out / "student")
    assert type(pipe.transformer) is type(teacher.transformer)
    assert pipe.transformer.config.num_layers < teacher.transformer.config.num_layers
    if layout == "sd3.5":  # dual-attention blocks remapped to the student's indices
        assert pipe.transformer.config.dual_attention_layers == [0, 1]
    image = pipe(
        "a red circle", num_inference_steps=2, height=128, width=128, output_type="np", generator=torch.manual_seed(0)
    ).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()

    checkpoint = out / "checkpoints" / "checkpoint-0000016"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.yaml",
        "trainer_state.json",
        "training_state.safetensors",
        "transformer",
        "transformer_ema",
    ]
    ema = type(teacher.transformer).from_pretrained(checkpoint / "transformer_ema")  # a stock folder too
    final = load_file(str(out / "student" / "transformer" / WEIGHTS))
    assert all(torch.equal(p, final[n]) for n, p in ema.state_dict().items())  # student/ holds the EMA weights
    assert Image.open(out / "validation" / "step-0000016.png").size == (128, 2 * (128 + 14))
    assert (out / "loss_curve.png").is_file()

    # A student folder continues training (its plan given again: a preset is not recorded in student/).
    again = tmp_path / "again"
    more = dict(model__student=out / "student", train__max_steps=1, train__checkpoint_every=0)
    assert main(["distill", *dit_overrides(teacher_dirs[layout], shapes_dir, again, **more)]) == 0
    assert len(records_of(again)) == 1


@pytest.mark.parametrize("layout", ["sd3.5", "flux", "sd-v1"])
def test_a_bf16_teacher_trains_and_draws_validation_grids(teacher_dirs, tiny_sd_dir, shapes_dir, tmp_path, layout):
    """``train.teacher_dtype=bf16`` runs the teacher, VAE and text encoders in bf16 with an fp32 student; the
    validation grid runs both rows under bf16 autocast (an fp32 student given the bf16 encoders' states outside it
    failed with "mat1 and mat2 must have the same dtype", U-Net students too)."""
    out = tmp_path / "run"
    extra = dict(
        train__teacher_dtype="bf16",
        train__max_steps=2,
        train__validate_every=2,
        train__validation_steps=2,
        train__validation_prompts='["a red circle"]',
    )
    teacher = tiny_sd_dir if layout == "sd-v1" else teacher_dirs[layout]
    if layout == "sd-v1":
        extra.update(model__plan="bk-small", data__resolution=64)
    assert main(["distill", *dit_overrides(teacher, shapes_dir, out, **extra)]) == 0
    assert all(math.isfinite(r["loss"]) and r["loss_kd_out"] > 0 for r in records_of(out))
    side = 64 if layout == "sd-v1" else 128
    assert Image.open(out / "validation" / "step-0000002.png").size == (side, 2 * (side + 14))
    folder = "unet" if layout == "sd-v1" else "transformer"
    assert {t.dtype for t in load_file(str(out / "student" / folder / WEIGHTS)).values()} == {torch.float32}


def test_u_net_only_settings_are_refused_for_transformers(teacher_dirs, shapes_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = dit_overrides(teacher_dirs["flux"], shapes_dir, out, train__attention="default")
    assert main(["distill", *args]) == 2
    assert "train.attention=default" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "student").exists()
    args = dit_overrides(teacher_dirs["sd3"], shapes_dir, out, model__plan="bk-small")
    assert main(["distill", *args]) == 2
    assert "U-Net rules, but the teacher is a sd3 transformer" in capsys.readouterr().err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_training_equals_training_from_images(teacher_dirs, shapes_dir, tmp_path, layout, capsys) -> None:
    teacher = teacher_dirs[layout]
    cache = tmp_path / "cache"
    settings = dit_overrides(teacher, shapes_dir, tmp_path / "unused")[:5]  # teacher, plan, data, resolution, workers
    assert main(["cache", "--out", str(cache), "--dtype", "fp32", "--shard-size", "10", *settings]) == 0
    assert "cached 24 samples (0 skipped) in 3 shards, " in capsys.readouterr().out
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["family"] == family_of(denoiser_of(PIPELINES[layout].from_pretrained(teacher))).name
    assert meta["pooled"] is True and meta["shift_factor"] == pytest.approx({"flux": 0.1159}.get(layout, 0.0609))
    with safe_open(str(cache / "shard-00000.safetensors"), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    # SD3: CLIP-L + CLIP-G (77 tokens, padded to T5's width) and T5's 32 tokens; FLUX: T5's 32 tokens alone
    text_tokens, pooled = {"flux": (32, 16)}.get(layout, (77 + 32, 32))
    assert shapes == {
        **{key: (10, *LATENT) for key in ("mean", "std", "mean_flip", "std_flip")},
        "text": (10, text_tokens, 32),
        "pooled": (10, pooled),
    }
    sizes = meta["bytes"]
    assert sizes["per_sample_by_key"] == {key: 4 * math.prod(shape[1:]) for key, shape in shapes.items()}
    files = [p for p in cache.iterdir() if p.name.startswith("shard-")]
    assert sizes["total"] == sum(p.stat().st_size for p in files)
    assert sizes["per_sample"] == pytest.approx(sizes["total"] / 24)

    runs = {}
    for name, extra in (("images", {}), ("cache", {"data__cache": cache})):
        out = tmp_path / name
        assert main(["distill", *dit_overrides(teacher, shapes_dir, out, optim__lr=1e-3, **extra)]) == 0
        runs[name] = out
    a, b = records_of(runs["images"]), records_of(runs["cache"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss_task", "loss_kd_out", "loss_kd_feat"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    wa = load_file(str(runs["images"] / "student" / "transformer" / WEIGHTS))
    wb = load_file(str(runs["cache"] / "student" / "transformer" / WEIGHTS))
    assert wa.keys() == wb.keys()
    # Adam's first steps move each weight by about lr, whatever its gradient: a gradient near zero that the
    # encoders' batching changes in its last bits may move by ~1e-6 either way.
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_a_cache_of_another_family_is_refused(tiny_sd_dir, teacher_dirs, shapes_dir, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    args = ["cache", "--out", str(cache), f"model.teacher={tiny_sd_dir}", f"data.train={shapes_dir}"]
    assert main([*args, "data.resolution=128", "data.num_workers=0"]) == 0
    assert json.loads((cache / "cache.json").read_text())["family"] == "unet"
    capsys.readouterr()
    assert main(["distill", *dit_overrides(teacher_dirs["flux"], shapes_dir, tmp_path / "run", data__cache=cache)]) == 2
    err = capsys.readouterr().err
    assert "text states of a unet teacher, but this teacher is a flux one" in err and "Traceback" not in err


def test_the_default_cache_stores_fp16_and_reports_its_size(teacher_dirs, shapes_dir, tmp_path, caplog, capsys):
    """T5-XXL's states are 4096 wide (4.2 MB a FLUX.1-dev sample in fp16): a transformer cache stores fp16 unless
    asked otherwise, and says how big it is."""
    cache = tmp_path / "cache"
    settings = dit_overrides(teacher_dirs["flux"], shapes_dir, tmp_path / "unused")[:5]
    with caplog.at_level(logging.INFO, logger="bksdm.train.cache"):
        assert main(["cache", "--out", str(cache), *settings]) == 0
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["dtype"] == "fp16"
    with safe_open(str(cache / "shard-00000.safetensors"), framework="pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}  # noqa: SIM118
    assert meta["bytes"]["per_sample_by_key"]["text"] == 32 * 32 * 2  # 32 T5 tokens x 32 wide x 2 bytes
    logged = [r.getMessage() for r in caplog.records if "on disk" in r.getMessage()]
    assert logged and "a sample (text 2.1KB" in logged[0], logged
    assert "on disk" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ resume, processes


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigkill_then_resume_gives_the_same_weights(teacher_dirs, shapes_dir, tmp_path, layout) -> None:
    common = dict(
        train__max_steps=10, train__checkpoint_every=2, train__use_ema=True, train__gradient_accumulation_steps=2
    )
    straight = run_cli(["distill", *dit_overrides(teacher_dirs[layout], shapes_dir, tmp_path / "a", **common)])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    args = ["distill", *dit_overrides(teacher_dirs[layout], shapes_dir, tmp_path / "b", **common)]
    kill_at_checkpoint(args, tmp_path / "b")
    assert not (tmp_path / "b" / "student").exists()

    resumed = run_cli([*args, "--resume", "latest"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    for name in ("student/transformer", "checkpoints/checkpoint-0000010/transformer_ema"):  # EMA weights
        a = load_file(str(tmp_path / "a" / name / WEIGHTS))
        b = load_file(str(tmp_path / "b" / name / WEIGHTS))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    a = load_file(str(tmp_path / "a" / "checkpoints" / "checkpoint-0000010" / "transformer" / WEIGHTS))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "checkpoint-0000010" / "transformer" / WEIGHTS))
    assert all(torch.equal(a[key], b[key]) for key in a)  # the raw weights
    assert [r["step"] for r in records_of(tmp_path / "b")] == list(range(1, 11))
    assert [r["loss"] for r in records_of(tmp_path / "b")] == [r["loss"] for r in records_of(tmp_path / "a")]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_take_the_same_step_as_one(teacher_dirs, shapes_dir, tmp_path, layout) -> None:
    teacher = teacher_dirs[layout]
    one = run_cli(["distill", *dit_overrides(teacher, shapes_dir, tmp_path / "one", train__batch_size=4)])
    assert one.wait(timeout=300) == 0, one.stdout.read()
    two = run_two_processes(["distill", *dit_overrides(teacher, shapes_dir, tmp_path / "two", train__batch_size=2)])
    assert two.returncode == 0, two.stdout + two.stderr
    a = load_file(str(tmp_path / "one" / "student" / "transformer" / WEIGHTS))
    b = load_file(str(tmp_path / "two" / "student" / "transformer" / WEIGHTS))
    pipe = PIPELINES[layout].from_pretrained(teacher)
    start = build_student(pipe.transformer, ALL_PRESETS["keep-half"]).student.state_dict()
    update_a = torch.cat([(a[k] - start[k]).flatten() for k in a])
    update_b = torch.cat([(b[k] - start[k]).flatten() for k in a])
    # Float tolerance, as for the U-Net: all-reduced gradient sums, and Adam's first steps scale each update to lr.
    assert (update_a - update_b).abs().max() < 1e-5
    assert (update_a - update_b).norm() < 1e-3 * update_a.norm()
    assert (update_a != 0).float().mean() > 0.5  # the steps really moved the weights
    for one_record, two_record in zip(records_of(tmp_path / "one"), records_of(tmp_path / "two"), strict=True):
        for key in ("loss", "loss_task", "loss_kd_out", "loss_kd_feat"):
            assert two_record[key] == pytest.approx(one_record[key], rel=1e-4), key
