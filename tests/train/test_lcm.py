"""``bksdm lcm``: the pure consistency-distillation step, then the recipe through the CLI on the bundled shapes
teacher (it really draws shapes, and the shapes classifier reads them back) and on tiny SD pipelines: few-step
quality, stock loading of both outputs, cache, resume after SIGKILL / SIGTERM, and configs refused before work."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import kill_at_checkpoint, make_shapes, run_cli, sigterm_after_first_log
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from bksdm.cli import main
from bksdm.eval.generate import generate_images
from bksdm.loading import BUNDLED_TEACHER
from bksdm.train.lcm_config import LcmModelConfig, load_lcm_config
from bksdm.train.lcm_models import build_lcm_student
from bksdm.train.lcm_step import (
    DDIMSolver,
    LcmObjective,
    boundary_scalings,
    consistency_loss,
    draw_guidance,
    guidance_embedding,
    lcm_step,
    predicted_noise,
    predicted_original,
)
from bksdm.world import classifier, shapes

# ------------------------------------------------------------------------------------------------ the pure step


def test_boundary_condition_makes_f_the_identity_at_time_zero() -> None:
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t)
    assert c_skip[0] == 1 and c_out[0] == 0
    x, x0 = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    f = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0
    assert torch.equal(f[0], x[0])  # f(x, 0) = x whatever the network predicts
    # The scalings LCMScheduler samples with, and c_skip² + c_out² = 1 / (...): c_skip → 0, c_out → 1 far from 0.
    scheduler = LCMScheduler()
    for i, step in enumerate(t.tolist()):
        expected = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert (c_skip[i].item(), c_out[i].item()) == pytest.approx(expected, rel=1e-6)
    assert c_skip[-1] < 1e-6 and c_out[-1] == pytest.approx(1.0, abs=1e-6)
    assert boundary_scalings(torch.tensor([19]))[0].item() == pytest.approx(0.25 / (190**2 + 0.25))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_clean_latent_and_noise_invert_the_forward_process(prediction_type) -> None:
    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    t = torch.tensor([0, 250, 999])
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0  # v = α ε - σ x_0
    torch.testing.assert_close(predicted_original(output, x_t, t, prediction_type, alphas), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(predicted_noise(output, x_t, t, prediction_type, alphas), eps, atol=2e-4, rtol=1e-4)


def test_ddim_solver_steps_k_timesteps_as_hand_computed_and_as_diffusers() -> None:
    train = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    solver = DDIMSolver.from_alphas(train.alphas_cumprod, 50)
    assert solver.skip == 20 and solver.timesteps[:3].tolist() == [19, 39, 59] and solver.timesteps[-1] == 999
    start, end = solver.interval(torch.tensor([0, 1, 49]))
    assert start.tolist() == [19, 39, 999] and end.tolist() == [0, 19, 979]
    # By hand, one number: x_end = sqrt(ᾱ_979) x0 + sqrt(1 - ᾱ_979) ε.
    a = float(train.alphas_cumprod[979])
    got = solver.step(torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -2.0), torch.tensor([979]))
    assert got.item() == pytest.approx(a**0.5 * 0.5 + (1 - a) ** 0.5 * -2.0, rel=1e-6)
    # The same step as diffusers' DDIMScheduler on the 50-step trailing grid (999, 979, ..., 19), epsilon model.
    ddim = DDIMScheduler.from_config(
        train.config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    ddim.set_timesteps(50)
    assert ddim.timesteps.flip(0).tolist() == solver.timesteps.tolist()
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for index in (49, 20, 0):
        t = solver.timesteps[[index, index]]
        x0 = predicted_original(eps, x, t, "epsilon", train.alphas_cumprod)
        ours = solver.step(
            x0, predicted_noise(eps, x, t, "epsilon", train.alphas_cumprod), solver.interval(t * 0 + index)[1]
        )
        theirs = ddim.step(eps, int(t[0]), x).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_guidance_embedding_is_the_one_stock_pipelines_feed(tiny_sd_pipe) -> None:
    omega = torch.tensor([0.0, 2.0, 14.0])
    for dim in (256, 7):
        ours = guidance_embedding(omega, dim)
        assert ours.shape == (3, dim) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, tiny_sd_pipe.get_guidance_scale_embedding(omega, embedding_dim=dim))
    zero = guidance_embedding(torch.zeros(1), 8)
    assert zero[0].tolist() == [0.0] * 4 + [1.0] * 4  # sin(0), cos(0)
    assert guidance_embedding(omega, 7)[:, -1].abs().max() == 0  # odd widths pad one zero column
    with pytest.raises(ValueError, match="one per sample"):
        guidance_embedding(torch.zeros(2, 1), 8)


def test_huber_is_quadratic_near_zero_and_linear_far_out_while_l2_is_squared() -> None:
    c = 0.001
    zero = torch.zeros(4)
    assert consistency_loss(zero, zero, "huber", c) == 0 and consistency_loss(zero, zero, "l2") == 0
    near, far = torch.full((4,), 1e-4), torch.full((4,), 10.0)
    assert consistency_loss(near, zero, "huber", c).item() == pytest.approx(1e-8 / (2 * c), rel=1e-2)  # d²/2c
    assert consistency_loss(far, zero, "huber", c).item() == pytest.approx(10.0 - c, rel=1e-6)  # |d| - c
    assert consistency_loss(far, zero, "l2").item() == pytest.approx(100.0)
    d = torch.tensor([3 * c])
    assert consistency_loss(d, torch.zeros(1), "huber", c).item() == pytest.approx(c * (10**0.5 - 1), rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        consistency_loss(torch.zeros(2), torch.zeros(3))


def test_guidance_scales_are_drawn_per_sample_position_within_the_range() -> None:
    whole = draw_guidance(7, 3, [0, 1, 2, 3], 2.0, 4.0)
    assert whole.shape == (4,) and bool(((whole >= 2) & (whole <= 4)).all()) and len(set(whole.tolist())) == 4
    assert torch.equal(draw_guidance(7, 3, [2, 3], 2.0, 4.0), whole[2:])  # a process's slice draws the same
    assert not torch.equal(draw_guidance(7, 4, [0, 1, 2, 3], 2.0, 4.0), whole)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_untrained_student_is_the_teacher(tiny_sd_pipe, mode) -> None:
    teacher = tiny_sd_pipe.unet
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_lcm_student(teacher, LcmModelConfig(mode=mode, time_cond_proj_dim=16, lora_rank=4), torch.float32)
    x, t, text = (
        torch.randn(2, 4, 16, 16),
        torch.tensor([999, 19]),
        torch.randn(2, 77, teacher.config.cross_attention_dim),
    )
    with torch.no_grad():
        expected = teacher(x, t, encoder_hidden_states=text).sample
        cond = guidance_embedding(torch.tensor([2.0, 9.0]), 16) if mode == "full" else None
        got = student(x, t, encoder_hidden_states=text, timestep_cond=cond).sample
    torch.testing.assert_close(got, expected)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is untouched
    trained = [n for n, p in student.named_parameters() if p.requires_grad]
    if mode == "full":
        assert student.config.time_cond_proj_dim == 16 and len(trained) == len(list(student.parameters()))
    else:
        assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_student_checkpointed_with_the_kernels_takes_the_same_step(tiny_sd_pipe, mode) -> None:
    from bksdm.train.cpu_kernels import kernel_checkpointing

    teacher = tiny_sd_pipe.unet
    config = LcmModelConfig(mode=mode, time_cond_proj_dim=8, lora_rank=4)
    student = build_lcm_student(teacher, config, torch.float32).train()
    objective = LcmObjective(
        DDIMSolver.from_alphas(DDPMScheduler.from_config(tiny_sd_pipe.scheduler.config).alphas_cumprod),
        "epsilon", "l2", embed_dim=8 if mode == "full" else None,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    text, uncond = torch.randn(2, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    index, guidance = torch.tensor([3, 7]), torch.tensor([3.0, 6.0])
    other = {name: p.detach().clone() for name, p in student.named_parameters()}

    def step() -> tuple[float, list]:
        student.zero_grad(set_to_none=True)
        losses = lcm_step(student, teacher, other, objective, latents, text, uncond, index, noise, guidance)
        losses["loss"].backward()  # a checkpointed student's blocks are recomputed here, on the same kernels
        return losses["loss"].item(), [p.grad.clone() for p in student.parameters() if p.requires_grad]

    plain_loss, plain_grads = step()
    student.enable_gradient_checkpointing(kernel_checkpointing())
    loss, grads = step()
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_at_the_first_solver_step_the_target_is_the_teachers_ddim_step(tiny_sd_pipe) -> None:
    """At n = 0 the solver lands on t = 0, where f(x, 0) = x: the target is the teacher's guided DDIM step itself,
    whatever the target network's weights; the teacher gets no gradient, the student does."""
    teacher = tiny_sd_pipe.unet
    student = build_lcm_student(teacher, LcmModelConfig(time_cond_proj_dim=8), torch.float32)
    config = tiny_sd_pipe.scheduler.config
    objective = LcmObjective(
        DDIMSolver.from_alphas(DDPMScheduler.from_config(config).alphas_cumprod), "epsilon", "l2", embed_dim=8
    )
    torch.manual_seed(0)
    latents, noise, text = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    uncond, index, guidance = torch.randn(1, 77, 32), torch.zeros(2, dtype=torch.long), torch.tensor([3.0, 6.0])
    other = {name: p.detach() + 0.1 * torch.randn_like(p) for name, p in student.named_parameters()}  # any weights
    losses = lcm_step(student, teacher, other, objective, latents, text, uncond, index, noise, guidance)
    losses["loss"].backward()
    assert teacher.conv_in.weight.grad is None and student.conv_in.weight.grad is not None

    alphas = objective.solver.alphas_cumprod
    t19 = torch.tensor([19, 19])
    a = alphas[19].float()
    x = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.no_grad():
        out_u = teacher(x, t19, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        out_c = teacher(x, t19, encoder_hidden_states=text).sample
        eps = out_u + guidance.view(-1, 1, 1, 1) * (out_c - out_u)  # the pipelines' guidance
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        goal = alphas[0].float().sqrt() * x0 + (1 - alphas[0].float()).sqrt() * eps
        out_s = student(x, t19, encoder_hidden_states=text, timestep_cond=guidance_embedding(guidance - 1, 8)).sample
    c_skip, c_out = boundary_scalings(t19)
    f = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * (x - (1 - a).sqrt() * out_s) / a.sqrt()
    assert losses["loss"].item() == pytest.approx(torch.mean((f - goal) ** 2).item(), rel=1e-4)
    assert losses["loss_l2"].item() == pytest.approx(losses["loss"].item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ the recipe


def lcm_args(teacher, data, out: Path, **extra) -> list[str]:
    settings = {
        "model.teacher": teacher,
        "data.train": data,
        "data.resolution": 128,
        "data.num_workers": 0,
        "train.output_dir": out,
        "train.max_steps": 4,
        "train.batch_size": 2,
        "train.mixed_precision": "no",
        "train.gradient_checkpointing": False,
        "train.validate_every": 0,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "lcm.num_ddim_timesteps": 10,
        "optim.lr": 1e-4,
        "model.time_cond_proj_dim": 8,
        "model.lora_rank": 4,
        "model.lora_alpha": 4,
    }
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["lcm", *(f"{k}={v}" for k, v in settings.items())]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def shapes_accuracy(pipe, steps: int, guidance: float) -> float:
    """Prompt accuracy over every shapes scene once (the demo's held-out seeds), as the shapes classifier reads it."""
    prompts = [scene.caption for scene in shapes.all_scenes()]
    images = generate_images(
        pipe, prompts, [50_000 + i for i in range(96)], steps=steps, guidance_scale=guidance, batch_size=96
    )
    return classifier.prompt_accuracy(classifier.load_classifier(), images, prompts)


def test_lcm_on_the_shapes_teacher_draws_in_two_and_four_steps_what_the_teacher_cannot(tmp_path) -> None:
    """Ten LCM steps (160 samples, from a `bksdm cache`) on the bundled shapes teacher, guidance 2-4 around its
    own 3. Measured (train seeds 1-3, 10 or 20 steps, prompt accuracy over 96 scenes): the LCM student 1.000 at 4
    steps, 0.969 at 2, 0.41-0.44 at 1; the teacher as shipped at 4 steps (PNDM, guidance 3) 0.271, with 2 DDIM steps
    0.198; the teacher at 25 steps 1.000."""
    data = shapes.export(tmp_path / "data", 160, seed=1234)
    cache = tmp_path / "cache"
    cache_args = ["cache", "--out", str(cache), "--dtype", "fp32", f"model.teacher={BUNDLED_TEACHER}"]
    assert main([*cache_args, f"data.train={data}", "data.resolution=64", "data.num_workers=0"]) == 0
    out = tmp_path / "run"
    args = lcm_args(BUNDLED_TEACHER, data, out, data__resolution=64, data__cache=cache, train__batch_size=16)
    args += ["train.max_steps=10", "train.checkpoint_every=0", "train.validate_every=10", "lcm.num_ddim_timesteps=50"]
    args += ["model.time_cond_proj_dim=256", "lcm.guidance_min=2", "lcm.guidance_max=4", "train.seed=1"]
    args += ['train.validation_prompts=["a small red circle at the top left"]']
    assert main(args) == 0

    lcm = StableDiffusionPipeline.from_pretrained(out / "student")  # stock diffusers, no bksdm code
    assert isinstance(lcm.scheduler, LCMScheduler) and lcm.unet.config.time_cond_proj_dim == 256
    lcm.set_progress_bar_config(disable=True)
    record = json.loads((out / "student" / "bksdm_toy.json").read_text())["sampling"]
    assert record["num_inference_steps"] == 4 and record["guidance_scale"] == 3.0  # the teacher's recorded scale
    four, two = shapes_accuracy(lcm, 4, 3.0), shapes_accuracy(lcm, 2, 3.0)

    teacher = StableDiffusionPipeline.from_pretrained(BUNDLED_TEACHER)
    teacher.set_progress_bar_config(disable=True)
    ordinary_four = shapes_accuracy(teacher, 4, 3.0)  # its own scheduler (PNDM), classifier-free guidance at 3
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    ddim_two = shapes_accuracy(teacher, 2, 3.0)
    assert four >= 0.9 and four >= ordinary_four + 0.4, (four, ordinary_four)
    assert two >= 0.85 and two >= ddim_two + 0.4, (two, ddim_two)

    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11)) and all(np.isfinite(r["loss"]) for r in records)
    assert load_lcm_config(out / "config.yaml").lcm.guidance_max == 4.0
    assert (out / "validation" / "step-0000010.png").is_file()  # teacher row + 4, 2 and 1 steps


def test_lcm_lora_loads_with_stock_load_lora_weights(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(lcm_args(tiny_sd_dir, shapes_dir, out, model__mode="lora", train__max_steps=3)) == 0
    folder = out / "student"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 10
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    own, source = pipe.unet.state_dict(), base.unet.state_dict()
    assert own.keys() == source.keys() and all(torch.equal(own[k], source[k]) for k in own)  # the base, exactly
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(folder)  # stock diffusers
        adapted = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert not torch.allclose(plain, adapted)  # the adapters learned something
    stored = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    loaded = {n.replace(".default_0", ""): p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(stored) == len(loaded) and any(".attn1.to_q." in k for k in loaded)  # every adapter, attention too
    assert all(torch.equal(loaded[k.removeprefix("unet.")], v) for k, v in stored.items())
    ema = load_file(str(out / "checkpoints" / "checkpoint-0000003" / "lora_ema.safetensors"))
    assert ema.keys() == {k.removeprefix("unet.").replace(".weight", ".default.weight") for k in stored}
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np").images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


def test_training_on_a_cache_equals_training_on_the_images(tiny_sd2_dir, shapes_dir, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    base = [f"model.teacher={tiny_sd2_dir}", f"data.train={shapes_dir}", "data.resolution=128", "data.num_workers=0"]
    assert main(["cache", "--out", str(cache), "--dtype", "fp32", *base]) == 0
    assert main(lcm_args(tiny_sd2_dir, shapes_dir, tmp_path / "a", train__max_steps=2)) == 0
    assert main(lcm_args(tiny_sd2_dir, shapes_dir, tmp_path / "b", train__max_steps=2, data__cache=cache)) == 0
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "logs" / "metrics.jsonl").read_text().splitlines()]
        for run in ("a", "b")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4) and losses[0][0] > 0


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    common = {"train__max_steps": 8, "train__gradient_accumulation_steps": 2}
    straight = run_cli(lcm_args(tiny_sd_dir, shapes_dir, tmp_path / "a", **common))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    args = lcm_args(tiny_sd_dir, shapes_dir, tmp_path / "b", **common)
    kill_at_checkpoint(args, tmp_path / "b")
    resumed = run_cli([*args, "--resume", "latest"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    unet = "diffusion_pytorch_model.safetensors"
    for name in ("student/unet", "checkpoints/checkpoint-0000008/unet", "checkpoints/checkpoint-0000008/unet_ema"):
        a, b = weights(tmp_path / "a" / name, unet), weights(tmp_path / "b" / name, unet)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "b" / "logs" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_resumes_exactly_for_a_lora(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    common = {"train__max_steps": 8, "train__checkpoint_every": 0, "model__mode": "lora"}
    straight = run_cli(lcm_args(tiny_sd_dir, shapes_dir, tmp_path / "a", **common))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    args = lcm_args(tiny_sd_dir, shapes_dir, tmp_path / "b", **common)
    returncode, log = sigterm_after_first_log(args, tmp_path / "b")
    assert returncode == 128 + signal.SIGTERM and "stopped by SIGTERM at step" in log, log
    (checkpoint,) = (tmp_path / "b" / "checkpoints").iterdir()  # none was due: this one is SIGTERM's
    assert 1 <= json.loads((checkpoint / "trainer_state.json").read_text())["step"] < 8
    resumed = run_cli([*args, "--resume", "latest"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    lora = "pytorch_lora_weights.safetensors"
    a, b = weights(tmp_path / "a" / "student", lora), weights(tmp_path / "b" / "student", lora)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LCM_RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "lcm").glob("*.yaml"))


@pytest.mark.parametrize("path", LCM_RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_load_round_trip_and_are_headed_by_their_command(path, tmp_path) -> None:
    from bksdm.train.lcm_config import save_lcm_config

    cfg = load_lcm_config(path)
    assert save_lcm_config(cfg, tmp_path / "c.yaml") and load_lcm_config(tmp_path / "c.yaml") == cfg
    header = path.read_text().split("\n\n")[0]
    assert f"bksdm lcm --config configs/lcm/{path.name}" in header
    assert (cfg.lcm.num_ddim_timesteps, cfg.lcm.loss, cfg.lcm.ema_decay) == (50, "huber", 0.95)  # the paper's
    shapes_world = cfg.data.resolution == 64
    assert (cfg.lcm.guidance_min, cfg.lcm.guidance_max) == ((2.0, 4.0) if shapes_world else (3.0, 15.0))
    assert cfg.train.output_dir == f"runs/{path.stem}"
    assert {p.stem for p in LCM_RECIPES} == {"sd-v1.4-bk-tiny-lcm", "shapes-bk-tiny-lcm"}


def test_bad_configs_fail_before_any_work(tiny_sd_dir, tiny_sdxl_dir, shapes_dir, tmp_path, capsys) -> None:
    import shutil

    from bksdm.world.tiny_dit import save_tiny_dit_pipeline

    out = tmp_path / "never"
    assert (
        main([*lcm_args(tiny_sd_dir, shapes_dir, out), "lcm.guidance_min=9", "lcm.guidance_max=4", "lcm.los=l2"]) == 2
    )
    err = capsys.readouterr().err
    assert "lcm.los: unknown key; did you mean 'loss'" in err and "lcm.guidance_min: 9.0 is above" in err
    assert main([*lcm_args(tiny_sd_dir, shapes_dir, out), "data.train=null", "model.mode=lcm"]) == 2
    err = capsys.readouterr().err
    assert "no training data" in err and "model.mode (override): 'lcm' is not one of full, lora" in err
    sd3 = save_tiny_dit_pipeline(tmp_path / "sd3", "sd3")
    assert main(lcm_args(sd3, shapes_dir, out)) == 2
    assert "SD3Transformer2DModel pipeline; bksdm lcm distils U-Net pipelines" in capsys.readouterr().err
    assert main(lcm_args(tiny_sdxl_dir, shapes_dir, out)) == 2
    assert "SDXL-style U-Net" in capsys.readouterr().err
    lcm_folder = shutil.copytree(tiny_sd_dir, tmp_path / "an-lcm")
    config = json.loads((lcm_folder / "unet" / "config.json").read_text())
    (lcm_folder / "unet" / "config.json").write_text(json.dumps({**config, "time_cond_proj_dim": 8}))
    assert main(lcm_args(lcm_folder, shapes_dir, out)) == 2
    assert "already has a guidance embedding" in capsys.readouterr().err
    assert main(lcm_args(tmp_path / "missing", shapes_dir, out)) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not out.exists()
