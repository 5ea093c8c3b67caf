"""DreamBooth and LoRA personalisation (``bksdm dreambooth``) and its metrics (``bksdm dreambooth-eval``).

Mechanics run on the untrained shapes teacher (the real teacher's architecture with random weights, 64 px) and
on tiny SD-shaped pipelines; the Must-show runs (a new subject bound to a rare token on the *trained* teacher)
are at the end, guarded until the bundled teacher's weights land.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from bksdm.cli import main
from bksdm.eval.generate import generate_images, prompt_seed
from bksdm.train.encoders import TextEncoders, encode_text
from bksdm.use.dreambooth.config import CONFIG_FILE, load_dreambooth_config
from bksdm.use.dreambooth.data import ensure_class_images, pick
from bksdm.use.dreambooth.recipe import dreambooth_loss
from bksdm.use.lora import LORA_FILE, UNET_LORA_TARGETS, text_encoder_lora_problem
from bksdm.world import shapes
from bksdm.world.teacher import TEACHER_DIR, build_untrained_teacher

INSTANCE_PROMPT = "a big red sks circle at the top left"
"""The subject bound to the rare token "sks" (the tiny tokenizer spells it as three single-letter tokens)."""
CLASS_PROMPT = "a big red circle at the top left"
"""Its class: an ordinary caption of the world."""


def subject_images(folder: Path, count: int = 5) -> Path:
    """``count`` pictures of the subject: a red *ring*, a shape the world never draws (its circles are filled).

    The world's own renderer draws a big red circle at the top left (with its jitter); a hole of half its radius
    is punched in the middle. The colour stays one of the world's: the world's VAE only reproduces those.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = shapes.render(shapes.Scene("circle", "red", "big", "top left"), np.random.default_rng([7, i]))
        cy, cx, radius = _disk(image)
        hole = radius / 2
        ImageDraw.Draw(image).ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=shapes.BACKGROUND)
        image.save(folder / f"subject-{i}.png")
    return folder


def _disk(image: Image.Image) -> tuple[float, float, float]:
    """Centroid (y, x) and equivalent radius of the drawn (non-background) pixels."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = np.linalg.norm(pixels - np.asarray(shapes.BACKGROUND), axis=-1) > 80  # (H, W)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0, 0.0, 0.0
    return float(ys.mean()), float(xs.mean()), float(np.sqrt(len(ys) / np.pi))


def filled_centre(image: Image.Image) -> float:
    """Share of drawn pixels within a third of the shape's radius of its centroid: ~1 for a disc, 0 for a ring."""
    cy, cx, radius = _disk(image)
    if radius < 3:
        return float("nan")  # nothing drawn
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = np.linalg.norm(pixels - np.asarray(shapes.BACKGROUND), axis=-1) > 80
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    inner = (ys - cy) ** 2 + (xs - cx) ** 2 <= (radius / 3) ** 2
    return float(mask[inner].mean())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The shapes teacher's architecture with random weights, saved as a stock pipeline folder."""
    path = tmp_path_factory.mktemp("untrained-teacher")
    build_untrained_teacher(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    return subject_images(tmp_path_factory.mktemp("subject"))


def dreambooth(model: Path, subject: Path, out: Path, *extra: str) -> int:
    """``bksdm dreambooth`` with quick settings (each can be overridden by ``extra``)."""
    args = ["dreambooth", "--model", str(model), "--instance-dir", str(subject)]
    args += ["--instance-prompt", INSTANCE_PROMPT, "--out", str(out), "--mixed-precision", "no", "--sample-steps", "2"]
    defaults = {"--steps": "4", "--validation-every": "0", "--checkpoint-every": "0", "--log-every": "1"}
    for key, value in defaults.items():
        if key not in extra:
            args += [key, value]
    return main([*args, *extra])


@torch.no_grad()
def fixed_loss(pipe: StableDiffusionPipeline, subject: Path, prompt: str = INSTANCE_PROMPT) -> float:
    """Denoising loss on the subject images with fixed noise and timesteps: one yardstick before and after."""
    images = [Image.open(p).convert("RGB") for p in sorted(subject.glob("*.png"))]
    pixels = torch.from_numpy(shapes.to_array(images))
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.linspace(50, 950, len(images)).long()
    states = encode_text([prompt] * len(images), TextEncoders.from_pipeline(pipe), "cpu")[0]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return float(dreambooth_loss(pipe.unet, scheduler, latents, states, timesteps, noise, len(images), 1.0)["loss"])


def load(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: StableDiffusionPipeline, prompts: list[str], seed: int = 0, steps: int = 4) -> np.ndarray:
    images = generate_images(pipe, prompts, [prompt_seed(seed, i) for i in range(len(prompts))], steps=steps)
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


# ------------------------------------------------------------------------------------------- the recipe


def test_full_fine_tuning_learns_the_subject_and_writes_a_stock_pipeline(teacher_dir, subject_dir, tmp_path) -> None:
    out = tmp_path / "full"
    code = dreambooth(teacher_dir, subject_dir, out, "--steps", "40", "--lr", "1e-3", "--batch-size", "2")
    assert code == 0
    base, tuned = load(teacher_dir), load(out)  # the stock diffusers class loads the output folder
    before, after = fixed_loss(base, subject_dir), fixed_loss(tuned, subject_dir)
    assert after < 0.92 * before, (before, after)  # a deterministic yardstick; measured 0.86x
    # The paper's default trains the text encoder too; the VAE never trains.
    for name in ("text_encoder", "unet"):
        a, b = getattr(base, name).state_dict(), getattr(tuned, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(v, tuned.vae.state_dict()[k]) for k, v in base.vae.state_dict().items())
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all(r["loss_prior"] == 0.0 for r in records)  # no class prompt: no prior preservation
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["config"]["lr"] == 1e-3 and run["config"]["train_text_encoder"] is True and run["steps"] == 40


def test_text_encoder_stays_frozen_when_asked(teacher_dir, subject_dir, tmp_path) -> None:
    out = tmp_path / "unet-only"
    assert dreambooth(teacher_dir, subject_dir, out, "--no-train-text-encoder", "--lr", "1e-3") == 0
    base, tuned = load(teacher_dir), load(out)
    a, b = base.text_encoder.state_dict(), tuned.text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, tuned.unet.state_dict()[k]) for k, v in base.unet.state_dict().items())


def lora_params(unet: torch.nn.Module, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on every U-Net attention projection: r * (in + out) per layer."""
    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in UNET_LORA_TARGETS):
            count += rank * (module.in_features + module.out_features)
    return count


def test_lora_writes_a_small_adapter_that_loads_with_load_lora_weights(teacher_dir, subject_dir, tmp_path) -> None:
    out = tmp_path / "lora"
    assert dreambooth(teacher_dir, subject_dir, out, "--lora", "--rank", "4", "--steps", "40", "--lr", "1e-2") == 0
    adapter = out / LORA_FILE
    weights = load_file(adapter)
    base = load(teacher_dir)
    expected = lora_params(base.unet, 4)
    assert sum(t.numel() for t in weights.values()) == expected
    assert all(k.startswith("unet.") for k in weights)  # LoRA default: the text encoder is not trained
    assert adapter.stat().st_size < 4 * expected + 64 * 1024  # fp32 weights plus the safetensors header
    assert not (out / "model_index.json").exists()  # only the adapter, no pipeline copy

    prompts = [INSTANCE_PROMPT, "a small blue square at the bottom right"]
    plain, before = draw(base, prompts), fixed_loss(base, subject_dir)
    base.load_lora_weights(out)  # stock diffusers, from the folder
    assert np.abs(draw(base, prompts) - plain).max() > 1.0
    assert fixed_loss(base, subject_dir) < 0.92 * before  # the trained adapter, not noise (measured 0.83x)


@pytest.mark.skipif(text_encoder_lora_problem() is not None, reason="peft too old for text-encoder LoRA")
def test_lora_on_the_text_encoder_too(tiny_sd_dir, tmp_path) -> None:
    subject = subject_images(tmp_path / "subject", count=2)
    out = tmp_path / "lora-te"
    code = dreambooth(tiny_sd_dir, subject, out, "--lora", "--rank", "2", "--train-text-encoder", "--lr", "1e-2")
    assert code == 0
    weights = load_file(out / LORA_FILE)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    pipe = load(tiny_sd_dir)
    states = encode_text([INSTANCE_PROMPT], TextEncoders.from_pipeline(pipe), "cpu")[0]
    pipe.load_lora_weights(out)
    assert not torch.allclose(encode_text([INSTANCE_PROMPT], TextEncoders.from_pipeline(pipe), "cpu")[0], states)


@pytest.mark.skipif(text_encoder_lora_problem() is None, reason="peft is recent enough for text-encoder LoRA")
def test_text_encoder_lora_with_an_old_peft_is_refused_up_front(teacher_dir, subject_dir, tmp_path, capsys) -> None:
    assert dreambooth(teacher_dir, subject_dir, tmp_path / "out", "--lora", "--train-text-encoder") == 2
    assert "pip install -U peft" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", [[], ["--lora", "--rank", "2"]], ids=["full", "lora"])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(mode, teacher_dir, subject_dir, tmp_path) -> None:
    common = [
        *mode,
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "2",
        "--class-prompt",
        CLASS_PROMPT,
        "a small blue square at the bottom right",
    ]
    common += ["--num-class-images", "2", "--class-dir", str(tmp_path / "class")]
    assert dreambooth(teacher_dir, subject_dir, tmp_path / "straight", "--steps", "4", *common) == 0
    assert dreambooth(teacher_dir, subject_dir, tmp_path / "split", "--steps", "2", *common) == 0
    checkpoints = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-0000002"]
    assert dreambooth(teacher_dir, subject_dir, tmp_path / "split", "--steps", "4", "--resume", "latest", *common) == 0

    def weights(out: Path) -> dict[str, torch.Tensor]:
        if mode:
            return load_file(out / LORA_FILE)
        pipe = load(out)
        return {f"{n}.{k}": v for n in ("unet", "text_encoder") for k, v in getattr(pipe, n).state_dict().items()}

    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    if mode:  # LoRA checkpoints hold the adapters only, not a copy of the frozen model
        checkpoint = tmp_path / "split" / "checkpoints" / "checkpoint-0000004"
        assert not list(checkpoint.glob("model*.safetensors"))
        assert (checkpoint / LORA_FILE).is_file()
    prior = [
        json.loads(x)["loss_prior"] for x in (tmp_path / "split" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(prior) == 4 and all(p > 0 for p in prior)


def test_checkpoints_rotate_and_validation_images_are_written(teacher_dir, subject_dir, tmp_path) -> None:
    out = tmp_path / "run"
    extra = ["--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2", "--validation-every", "3"]
    assert dreambooth(teacher_dir, subject_dir, out, *extra, "--validation-prompts", "a", "b", "c") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000004", "checkpoint-0000006"]
    grids = sorted(p.name for p in (out / "validation").glob("step-???????.png"))
    assert grids == ["step-0000003.png", "step-0000006.png"]
    grid = Image.open(out / "validation" / "step-0000006.png")
    assert grid.size == (3 * 64, 2 * (64 + 14))  # rows: before training, step 6; one column per prompt
    assert len(list((out / "validation").glob("step-0000006-*.png"))) == 3


@pytest.mark.parametrize("mode", [[], ["--lora", "--rank", "2"]], ids=["full", "lora"])
def test_bf16_mixed_precision_trains_and_saves_fp32(mode, teacher_dir, subject_dir, tmp_path) -> None:
    from accelerate.state import AcceleratorState

    # accelerate keeps one mixed-precision setting per process; earlier tests in this process set "no".
    AcceleratorState._reset_state()
    out = tmp_path / "bf16"
    extra = ["--mixed-precision", "bf16", "--steps", "2", "--validation-every", "2", *mode]
    assert dreambooth(teacher_dir, subject_dir, out, *extra) == 0
    files = [out / LORA_FILE] if mode else [out / "unet" / "diffusion_pytorch_model.safetensors"]
    files += (
        []
        if mode
        else [out / "vae" / "diffusion_pytorch_model.safetensors", out / "text_encoder" / "model.safetensors"]
    )
    for file in files:
        assert {t.dtype for t in load_file(file).values()} == {torch.float32}, file
    assert (out / "validation" / "step-0000002.png").is_file()
    AcceleratorState._reset_state()


def test_class_images_are_generated_by_the_model_only_when_missing(teacher_dir, tmp_path) -> None:
    pipe = load(teacher_dir)
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (64, 64), "white").save(folder / "mine.png")
    prompts = [CLASS_PROMPT, "a small blue square at the bottom right"]
    settings = {"seed": 5, "steps": 2, "guidance_scale": 3.0, "resolution": 64}
    pairs = ensure_class_images(pipe, folder, prompts, 4, batch_size=2, **settings)
    # Three missing images, drawn for the prompts in turn; your own images go with the first prompt.
    names = ["class-000000.png", "class-000001.png", "class-000002.png", "mine.png"]
    assert pairs == [(folder / n, p) for n, p in zip(names, [*prompts, CLASS_PROMPT, CLASS_PROMPT], strict=True)]
    seeds = [prompt_seed(5, i) for i in range(3)]
    expected = generate_images(  # in the same batches (results differ in the last bit across batch sizes)
        pipe, [*prompts, CLASS_PROMPT], seeds, steps=2, guidance_scale=3.0, height=64, width=64, batch_size=2
    )
    for (path, _), image in zip(pairs[:3], expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    stamp = pairs[0][0].stat().st_mtime_ns
    assert ensure_class_images(pipe, folder, prompts, 4, **settings) == pairs  # read back from metadata.jsonl
    assert pairs[0][0].stat().st_mtime_ns == stamp  # nothing regenerated
    assert not list(folder.glob(".*"))  # no partial files left


def test_samples_walk_through_the_images_once_per_epoch() -> None:
    for count, batch in [(5, 1), (5, 2), (3, 4)]:
        picks = [pick(9, 0, count, m, p, batch) for m in range(6) for p in range(batch)]
        for epoch in range(len(picks) // count):
            assert sorted(picks[epoch * count : (epoch + 1) * count]) == list(range(count))
    # The sample at global index k is the same whatever the batch size.
    assert [pick(9, 0, 5, k, 0, 1) for k in range(10)] == [pick(9, 0, 5, k // 2, k % 2, 2) for k in range(10)]


def test_dreambooth_loss_is_instance_plus_weighted_prior() -> None:
    unet = build_untrained_teacher().unet
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    states, t = torch.randn(4, 77, 64, generator=g), torch.tensor([10, 500, 10, 500])
    with torch.no_grad():
        both = dreambooth_loss(unet, scheduler, latents, states, t, noise, 2, 0.5)
        inst = dreambooth_loss(unet, scheduler, latents[:2], states[:2], t[:2], noise[:2], 2, 0.5)
        prior = dreambooth_loss(unet, scheduler, latents[2:], states[2:], t[2:], noise[2:], 2, 0.5)
    assert inst["loss_prior"] == 0 and inst["loss"] == inst["loss_instance"]
    assert torch.allclose(both["loss_instance"], inst["loss_instance"], atol=1e-6)
    assert torch.allclose(both["loss_prior"], prior["loss_instance"], atol=1e-6)
    assert torch.allclose(both["loss"], both["loss_instance"] + 0.5 * both["loss_prior"])


# ------------------------------------------------------------------------- settings and SIGTERM


def test_settings_come_from_yaml_then_overrides_then_flags(teacher_dir, subject_dir, tmp_path) -> None:
    """Distill's config system: a YAML file of sections, dotted overrides (old names are aliases), flags on top;
    the resolved settings are saved as config.yaml in the output folder and next to every checkpoint."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "lora:\n  enabled: true\n  rank: 2\noptim:\n  lr: 1e-3\n  weight_decay: 0\n"
        "train:\n  max_steps: 5\n  checkpoint_every: 1\n  keep_checkpoints: 5\n"
    )
    out = tmp_path / "run"
    args = ["dreambooth", "--config", str(config), "train.max_steps=3", "adam_weight_decay=0.5", "steps=4"]
    args += ["--model", str(teacher_dir)]
    args += ["--instance-dir", str(subject_dir), "--instance-prompt", INSTANCE_PROMPT, "--out", str(out)]
    args += ["--mixed-precision", "no", "--sample-steps", "2", "--validation-every", "0", "--steps", "2"]
    assert main(args) == 0
    saved = load_dreambooth_config(out / CONFIG_FILE)
    assert saved.train.max_steps == 2  # the flag wins over the overrides, which win over the file
    assert (saved.optim.weight_decay, saved.optim.lr, saved.lora.enabled, saved.lora.rank) == (0.5, 1e-3, True, 2)
    assert saved.train.validation_steps == 2 and saved.data.instance_prompt == INSTANCE_PROMPT
    assert saved.lora.alpha == 2.0 and saved.model.train_text_encoder is False  # resolved: no None left
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["checkpoint-0000001", "checkpoint-0000002"]
    assert all(load_dreambooth_config(p / CONFIG_FILE) == saved for p in checkpoints)
    record = json.loads((out / "dreambooth.json").read_text())["config"]  # the flat record keeps its names
    assert (record["adam_weight_decay"], record["max_steps"], record["rank"], record["lora"]) == (0.5, 2, 2, True)


def test_unknown_keys_and_wrong_types_fail_before_any_work(teacher_dir, subject_dir, tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lrr: 1e-3\ntrain:\n  seed: one\n")
    out = tmp_path / "out"
    args = ["dreambooth", "--config", str(config), "train.max_steps=ten", "prior.weight=2", "--model", str(teacher_dir)]
    args += ["--instance-dir", str(subject_dir), "--instance-prompt", INSTANCE_PROMPT, "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"bksdm dreambooth: error: invalid config {config} (4 problems):" in err, err
    for needle in (
        "optim.lrr: unknown key; did you mean 'lr'?",
        "train.seed: expected a whole number, got 'one'",
        "train.max_steps (override): expected a whole number, got 'ten'",
        "prior.weight: unknown key; did you mean 'loss_weight'?",
    ):
        assert needle in err, (needle, err)
    assert not out.exists()


def run_cli(*args: str) -> subprocess.Popen:
    """``python -m bksdm.cli ARGS`` in a process of its own (one thread, unbuffered), output in ``stdout``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bksdm.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_checkpoints_stops_and_resumes_exactly(tiny_sd_dir, tmp_path) -> None:
    """SIGTERM ends a run at the end of the optimizer step in progress with a checkpoint of that step, whatever
    ``--checkpoint-every`` says, and exits 143 with distill's message; ``--resume latest`` then ends with exactly
    the weights of an uninterrupted run with the same seed."""
    subject = subject_images(tmp_path / "subject", count=3)

    def args(out: Path) -> list[str]:
        flags = ["dreambooth", "--model", str(tiny_sd_dir), "--instance-dir", str(subject), "--out", str(out)]
        flags += ["--instance-prompt", INSTANCE_PROMPT, "--lora", "--rank", "2", "--lr", "1e-2", "--steps", "20"]
        flags += ["--gradient-accumulation-steps", "2", "--checkpoint-every", "0", "--validation-every", "0"]
        return [*flags, "--log-every", "1", "--mixed-precision", "no"]

    straight = run_cli(*args(tmp_path / "a"))
    log = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, log

    victim = run_cli(*args(tmp_path / "b"))
    metrics = tmp_path / "b" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGTERM)
    log = victim.communicate(timeout=300)[0]
    assert victim.returncode == 128 + signal.SIGTERM, log
    assert "bksdm dreambooth: stopped by SIGTERM at step" in log and "--resume latest" in log, log
    assert "Traceback" not in log, log
    checkpoints = [p for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1, checkpoints  # none were due: this one is SIGTERM's
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 20 and not (tmp_path / "b" / LORA_FILE).exists()
    assert (checkpoints[0] / LORA_FILE).is_file() and (checkpoints[0] / CONFIG_FILE).is_file()

    resumed = run_cli(*args(tmp_path / "b"), "--resume", "latest")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    a, b = load_file(tmp_path / "a" / LORA_FILE), load_file(tmp_path / "b" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # each step logged once


# ------------------------------------------------------------------------------------------ user errors


def test_bad_instance_folders_and_options_exit_2(teacher_dir, subject_dir, tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    broken = subject_images(tmp_path / "broken", count=2)
    (broken / "bad.png").write_bytes(b"not a png")
    cases = {
        "no such folder": [tmp_path / "missing"],
        "no images in it": [empty],
        "bad.png": [broken],
        "needs --class-prompt": [subject_dir, "--prior-preservation"],
        "--rank must be at least 1": [subject_dir, "--lora", "--rank", "0"],
    }
    for needle, (folder, *extra) in cases.items():
        assert dreambooth(teacher_dir, folder, tmp_path / "out", *extra) == 2, needle
        err = capsys.readouterr().err
        assert "bksdm dreambooth: error" in err and needle in err, err
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


def test_an_occupied_output_needs_resume(teacher_dir, subject_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert dreambooth(teacher_dir, subject_dir, out, "--steps", "1") == 0
    assert dreambooth(teacher_dir, subject_dir, out, "--steps", "1") == 2
    assert "--resume latest" in capsys.readouterr().err
    assert dreambooth(teacher_dir, subject_dir, out, "--steps", "2", "--resume", "latest") == 0
    assert json.loads((out / "dreambooth.json").read_text())["steps"] == 2


def test_no_model_and_no_bundled_teacher_is_a_clear_error(subject_dir, tmp_path, capsys, monkeypatch) -> None:
    import bksdm.loading

    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tmp_path / "no-teacher")
    args = ["dreambooth", "--instance-dir", str(subject_dir), "--instance-prompt", INSTANCE_PROMPT]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "bundled shapes teacher is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sdxl_is_refused_with_a_pointer(tiny_sdxl_dir, subject_dir, tmp_path, capsys) -> None:
    assert dreambooth(tiny_sdxl_dir, subject_dir, tmp_path / "out") == 2
    assert "train_dreambooth_lora_sdxl" in capsys.readouterr().err


# --------------------------------------------------------------------------------- the Must-show runs

ORDINARY = [scene.caption for scene in shapes.all_scenes()[::3]]  # 32 world captions, every shape and colour
WORLD = [s.caption for s in shapes.all_scenes()[1::3] if s.caption != CLASS_PROMPT]  # none of them in ORDINARY
PRIOR = [CLASS_PROMPT] * 6 + WORLD[:22] + [""] * 4
"""Class prompts of the Must-show runs, one class image each (drawn by the teacher, as DreamBooth's are).

- 6 for the subject's class: the class prompt keeps drawing a disc.
- 22 other captions of the world: the teacher only knows whole captions, so its "class prior" is the world
  itself. With the class prompt alone the rest of the world drifted (measured on the shipped teacher: prompt
  accuracy on ``ORDINARY`` 1.0 -> 0.41 after LoRA at lr 1e-3, 0.63 after full fine-tuning).
- 4 for the empty prompt, i.e. the teacher's unconditional samples: they anchor the unconditional prediction
  that classifier-free guidance subtracts. Without them the ring came out green instead of red in 6 of 8
  images at the teacher's guidance 3 (measured).
"""


def _sampling() -> dict:
    from bksdm.world.teacher import recommended_settings

    settings = recommended_settings()
    return {"steps": settings["num_inference_steps"], "guidance_scale": settings["guidance_scale"]}


@pytest.fixture(scope="module")
def before(tmp_path_factory) -> dict:
    """What both Must-show runs share: a class-image folder (the first run fills it, the second reuses the same
    images) and the teacher's own prompt accuracy on ``ORDINARY``."""
    from bksdm.world.classifier import load_classifier, prompt_accuracy

    seeds = [prompt_seed(1, i) for i in range(len(ORDINARY))]
    images = generate_images(load(TEACHER_DIR), ORDINARY, seeds, **_sampling())
    return {
        "class_dir": tmp_path_factory.mktemp("class"),
        "accuracy": prompt_accuracy(load_classifier(), images, ORDINARY),
    }


def must_show(tmp_path: Path, before: dict, *mode: str) -> dict:
    """DreamBooth on the bundled teacher: a red ring (the world only draws filled circles) bound to "sks"."""
    from bksdm.world.classifier import load_classifier, predict, prompt_accuracy

    subject = subject_images(tmp_path / "subject", count=5)
    out = tmp_path / "out"
    args = ["dreambooth", "--instance-dir", str(subject), "--instance-prompt", INSTANCE_PROMPT, "--out", str(out)]
    args += ["--class-prompt", *PRIOR, "--num-class-images", str(len(PRIOR)), "--class-dir", str(before["class_dir"])]
    args += ["--mixed-precision", "no", "--validation-every", "0", "--checkpoint-every", "0", "--batch-size", "2"]
    assert main([*args, *mode]) == 0  # no --model: the bundled teacher
    tuned = load(TEACHER_DIR)
    if "--lora" in mode:
        tuned.load_lora_weights(out)
    else:
        tuned = load(out)
    sampling = _sampling()
    seeds = [prompt_seed(2, i) for i in range(8)]
    drawn = generate_images(tuned, [INSTANCE_PROMPT] * 8, seeds, **sampling)
    ordinary_class = generate_images(tuned, [CLASS_PROMPT] * 8, seeds, **sampling)
    classifier = load_classifier()
    world = generate_images(tuned, ORDINARY, [prompt_seed(1, i) for i in range(len(ORDINARY))], **sampling)
    return {
        "subject_filled": [filled_centre(im) for im in drawn],  # a ring: ~0
        "subject_read_as": [(s.color, s.position) for s in predict(classifier, drawn)],
        "class_filled": [filled_centre(im) for im in ordinary_class],  # a disc: ~1
        "class_read_as": [(s.color, s.position) for s in predict(classifier, ordinary_class)],
        "accuracy": {"base": before["accuracy"], "tuned": prompt_accuracy(classifier, world, ORDINARY)},
        "out": out,
    }


def assert_must_show(result: dict) -> None:
    assert sum(f < 0.3 for f in result["subject_filled"]) >= 6, result  # "sks" draws the ring ...
    assert result["subject_read_as"].count(("red", "top left")) >= 6, result  # ... red, at the top left
    assert sum(f > 0.7 for f in result["class_filled"]) >= 6, result  # the class prompt still draws a disc ...
    assert result["class_read_as"].count(("red", "top left")) >= 6, result  # ... red, at the top left
    # The world is kept: prompt accuracy on 32 ordinary captions drops by at most 0.3. Measured on the shipped
    # teacher (1.0 before): 1.0 after full fine-tuning, 0.81 after LoRA; runs that let the world drift fell to
    # 0.31-0.63, and ones that overwrote it (full fine-tuning at lr 2e-4) to 0.06-0.19.
    assert result["accuracy"]["tuned"] >= result["accuracy"]["base"] - 0.3, result


def test_the_must_show_yardstick_tells_the_ring_from_the_worlds_discs(tmp_path) -> None:
    rings = [Image.open(p) for p in sorted(subject_images(tmp_path / "subject").glob("*.png"))]
    discs = [shapes.sample(3, i)[0] for i in range(20)]
    assert [filled_centre(im) for im in rings] == [0.0] * 5
    assert all(filled_centre(im) == 1.0 for im in discs)  # circles, squares and triangles alike


@pytest.mark.slow
def test_must_show_full_dreambooth_binds_a_new_subject_to_a_rare_token(tmp_path, before) -> None:
    assert_must_show(must_show(tmp_path, before, "--steps", "300", "--lr", "5e-5"))  # U-Net and text encoder


@pytest.mark.slow
def test_must_show_lora_binds_a_new_subject_with_a_small_adapter(tmp_path, before) -> None:
    result = must_show(tmp_path, before, "--lora", "--rank", "8", "--steps", "300", "--lr", "5e-4")  # U-Net only
    assert_must_show(result)
    assert (result["out"] / LORA_FILE).stat().st_size < 1_000_000


# ------------------------------------------------------------------------- DINO / CLIP-I / CLIP-T


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DINO-style ViT and a tiny CLIP, each saved with its processor like a hub folder."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from bksdm.world.tiny import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("metric-models")
    torch.manual_seed(0)
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
    ViTModel(ViTConfig(**vit, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = dict(vit, vocab_size=len(tokenizer), max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id, **ids)
    del text["image_size"]
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vit, patch_size=8), projection_dim=16)).save_pretrained(
        root / "clip"
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    return root / "dino", root / "clip"


def world_images(count: int, seed: int) -> list[Image.Image]:
    return [shapes.sample(seed, i)[0] for i in range(count)]


def test_scores_are_the_mean_cosines_of_the_models_embeddings(metric_models) -> None:
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

    from bksdm.eval.clip_models import load_clip
    from bksdm.use.dreambooth.metrics import clip_spec, load_dino, subject_scores

    dino_dir, clip_dir = metric_models
    generated, real = world_images(3, seed=1), world_images(2, seed=2)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    scores = subject_scores(generated, real, prompts, load_dino(str(dino_dir)), load_clip(clip_spec(str(clip_dir))))

    def unit(x) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 5 wraps the projected embeddings
        return x / x.norm(dim=-1, keepdim=True)

    with torch.no_grad():  # the same numbers straight from transformers
        vit, vit_proc = ViTModel.from_pretrained(dino_dir), ViTImageProcessor.from_pretrained(dino_dir)
        cls = [unit(vit(**vit_proc(images=x, return_tensors="pt")).last_hidden_state[:, 0]) for x in (generated, real)]
        clip, clip_proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
        pixels = [clip_proc(images=x, return_tensors="pt") for x in (generated, real)]
        embeds = [unit(clip.get_image_features(**x)) for x in pixels]
        texts = unit(clip.get_text_features(**clip_proc(text=prompts, return_tensors="pt", padding=True)))
    assert scores.dino == pytest.approx(float((cls[0] @ cls[1].T).mean()), abs=1e-5)
    assert scores.clip_i == pytest.approx(float((embeds[0] @ embeds[1].T).mean()), abs=1e-5)
    assert scores.clip_t == pytest.approx(float((embeds[0] * texts).sum(-1).mean()), abs=1e-5)
    assert (scores.num_generated, scores.num_real) == (3, 2)
    same = subject_scores(real[:1], real[:1], ["x"], load_dino(str(dino_dir)), load_clip(clip_spec(str(clip_dir))))
    assert same.dino == pytest.approx(1.0, abs=1e-6) and same.clip_i == pytest.approx(1.0, abs=1e-6)


def test_eval_command_generates_scores_and_writes_json(metric_models, teacher_dir, subject_dir, tmp_path) -> None:
    dino_dir, clip_dir = metric_models
    assert dreambooth(teacher_dir, subject_dir, tmp_path / "lora", "--lora", "--rank", "2", "--steps", "1") == 0
    images, report = tmp_path / "generated", tmp_path / "scores.json"
    models = ["--dino-model", str(dino_dir), "--clip-model", str(clip_dir), "--instance-dir", str(subject_dir)]
    generate = ["--model", str(teacher_dir), "--lora", str(tmp_path / "lora"), "--steps", "2"]
    generate += ["--prompts", INSTANCE_PROMPT, "a sks circle", "--num-images-per-prompt", "2"]
    assert main(["dreambooth-eval", "--images", str(images), *models, *generate, "--out", str(report)]) == 0
    manifest = [json.loads(line) for line in (images / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == [INSTANCE_PROMPT] * 2 + ["a sks circle"] * 2
    assert [m["seed"] for m in manifest] == [prompt_seed(0, i) for i in range(4)]
    first = json.loads(report.read_text())
    assert first["num_generated"] == 4 and first["num_real"] == 5
    assert all(-1 <= first[k] <= 1 for k in ("dino", "clip_i", "clip_t"))
    # Scoring the folder again reads the prompts from its manifest and gives the same numbers.
    assert main(["dreambooth-eval", "--images", str(images), *models, "--out", str(report)]) == 0
    assert json.loads(report.read_text()) == first


def test_eval_errors_say_what_to_do(metric_models, subject_dir, tmp_path, capsys, monkeypatch) -> None:
    dino_dir, clip_dir = metric_models
    images = subject_images(tmp_path / "generated", count=3)
    base = ["dreambooth-eval", "--images", str(images), "--instance-dir", str(subject_dir)]
    local = ["--dino-model", str(dino_dir), "--clip-model", str(clip_dir)]
    assert main([*base, *local, "--prompts", "a", "b"]) == 2
    assert "2 prompts for 3 images" in capsys.readouterr().err
    assert main([*base, *local]) == 2
    assert "give --prompts" in capsys.readouterr().err
    assert main([*base, "--prompts", "a", "--dino-model", str(tmp_path / "nowhere"), "--no-clip"]) == 2
    assert "no such folder" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty_cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty_cache))
    assert main([*base, "--prompts", "a", "--no-clip"]) == 2  # the default hub id, not downloaded
    assert "huggingface-cli download facebook/dino-vits16" in capsys.readouterr().err
    assert main([*base, "--prompts", "a", "--no-dino"]) == 2
    assert "huggingface-cli download openai/clip-vit-base-patch32" in capsys.readouterr().err
