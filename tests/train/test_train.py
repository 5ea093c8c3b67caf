"""The distillation recipe end to end on tiny SD-shaped teachers: CLI runs, resume after SIGKILL, two
processes, cache equivalence, bad data and bad configs."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import kill_at_checkpoint, make_shapes, run_cli, run_two_processes, sigterm_after_first_log
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from bksdm.cli import main
from bksdm.plan.resolved import resolve
from bksdm.plan.spec import PRESETS
from bksdm.plan.surgery import build_student
from bksdm.train.checkpoints import find_checkpoint
from bksdm.train.config import load_config
from bksdm.train.kd import LossWeights, draw_noise, kd_step


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def overrides(teacher: Path, data: Path, out: Path, **extra) -> list[str]:
    settings = {
        "model.teacher": teacher,
        "model.plan": "bk-tiny",
        "data.train": data,
        "data.resolution": 128,
        "data.num_workers": 0,
        "train.output_dir": out,
        "train.max_steps": 4,
        "train.batch_size": 2,
        "train.gradient_accumulation_steps": 1,
        "train.mixed_precision": "no",
        "train.gradient_checkpointing": False,
        "train.validate_every": 0,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "train.use_ema": False,
    }
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in settings.items()]


def held_out_loss(unet, teacher, pipe, data: Path, plan: str = "bk-tiny") -> float:
    """KD loss on 8 fixed images with fixed noise: the same yardstick before and after training."""
    from bksdm.train.encoders import TextEncoders, encode_images, encode_text, sample_latents

    images, captions = [], []
    with (data / "metadata.csv").open() as f:
        for row in list(csv.DictReader(f))[:8]:
            image = Image.open(data / row["file_name"]).convert("RGB").resize((128, 128))
            images.append(torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1)
            captions.append(row["text"])
    mean, std = encode_images(pipe.vae, torch.stack(images))
    text, _ = encode_text(captions, TextEncoders.from_pipeline(pipe), "cpu")
    t, noise, eps = draw_noise(99, 0, range(8), tuple(mean.shape[1:]), 1000, "cpu")
    latents = sample_latents(mean, std, eps, pipe.vae.config.scaling_factor)
    pairs = resolve(PRESETS[plan], dict(teacher.config)).feature_pairs()
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return kd_step(unet, teacher, scheduler, latents, text, t, noise, pairs, LossWeights())["loss"].item()


def test_short_run_lowers_the_loss_and_writes_a_stock_pipeline(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["distill", *overrides(tiny_sd_dir, shapes_dir, out, train__max_steps=12, optim__lr=1e-3)]
    assert main(argv) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out / "student")
    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = held_out_loss(build_student(teacher.unet, PRESETS["bk-tiny"]).student, teacher.unet, teacher, shapes_dir)
    after = held_out_loss(pipe.unet, teacher.unet, teacher, shapes_dir)
    assert after < 0.9 * before, (before, after)
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()

    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all({"loss_task", "loss_kd_out", "loss_kd_feat", "lr", "samples_per_s"} <= set(r) for r in records)
    assert (out / "loss_curve.png").is_file() and (out / "config.yaml").is_file()
    assert load_config(out / "config.yaml").optim.lr == 1e-3
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-0000008", "checkpoint-0000010", "checkpoint-0000012"]  # keep the last 3
    assert (out / "checkpoints" / "checkpoint-0000012" / "config.yaml").is_file()


def test_bf16_mixed_precision_trains_on_the_cpu(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    """bf16 autocast works without a GPU (and is fast on CPUs with AVX-512 BF16 or AMX, see the README): the
    frozen teacher, VAE and text encoder run in bf16, the student keeps fp32 weights and learns."""
    out = tmp_path / "run"
    extra = {"train__max_steps": 12, "optim__lr": 1e-3, "train__mixed_precision": "bf16", "train__checkpoint_every": 0}
    assert main(["distill", *overrides(tiny_sd_dir, shapes_dir, out, **extra)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out / "student")
    assert pipe.unet.dtype == torch.float32  # the student is saved in full precision
    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = held_out_loss(build_student(teacher.unet, PRESETS["bk-tiny"]).student, teacher.unet, teacher, shapes_dir)
    after = held_out_loss(pipe.unet, teacher.unet, teacher, shapes_dir)
    assert after < 0.9 * before, (before, after)
    assert load_config(out / "config.yaml").train.mixed_precision == "bf16"


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    common = dict(
        train__max_steps=10, train__checkpoint_every=2, train__use_ema=True, train__gradient_accumulation_steps=2
    )
    straight = run_cli(["distill", *overrides(tiny_sd_dir, shapes_dir, tmp_path / "a", **common)])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    args = ["distill", *overrides(tiny_sd_dir, shapes_dir, tmp_path / "b", **common)]
    kill_at_checkpoint(args, tmp_path / "b")
    assert not (tmp_path / "b" / "student").exists()

    resumed = run_cli([*args, "--resume", "latest"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    for name in ("student/unet", "checkpoints/checkpoint-0000010/unet"):  # the EMA weights, the raw ones
        a, b = unet_weights(tmp_path / "a" / name), unet_weights(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    lines = (tmp_path / "b" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 10


@pytest.mark.slow
def test_sigterm_checkpoints_stops_and_resumes_exactly(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    """SIGTERM (a cluster's preemption, ``kill``) ends the run at the end of the optimizer step in progress with a
    checkpoint of that step, whatever ``checkpoint_every`` says; ``--resume latest`` then ends with exactly the
    weights of an uninterrupted run."""
    common = dict(train__max_steps=10, train__checkpoint_every=0, train__gradient_accumulation_steps=2)
    straight = run_cli(["distill", *overrides(tiny_sd_dir, shapes_dir, tmp_path / "a", **common)])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    args = ["distill", *overrides(tiny_sd_dir, shapes_dir, tmp_path / "b", **common)]
    returncode, log = sigterm_after_first_log(args, tmp_path / "b")
    assert returncode == 128 + signal.SIGTERM, log
    assert "stopped by SIGTERM at step" in log and "--resume latest" in log, log
    checkpoints = [p for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1, checkpoints  # none were due: this one is SIGTERM's
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 10 and not (tmp_path / "b" / "student").exists()

    resumed = run_cli([*args, "--resume", "latest"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    a, b = unet_weights(tmp_path / "a" / "student" / "unet"), unet_weights(tmp_path / "b" / "student" / "unet")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_two_processes_take_the_same_step_as_one(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    one = run_cli(
        ["distill", *overrides(tiny_sd_dir, shapes_dir, tmp_path / "one", train__batch_size=4, train__max_steps=2)]
    )
    assert one.wait(timeout=300) == 0, one.stdout.read()
    two = run_two_processes(
        ["distill", *overrides(tiny_sd_dir, shapes_dir, tmp_path / "two", train__batch_size=2, train__max_steps=2)]
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = unet_weights(tmp_path / "one" / "student" / "unet"), unet_weights(tmp_path / "two" / "student" / "unet")
    teacher = build_student(UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet"), PRESETS["bk-tiny"])
    start = teacher.student.state_dict()
    update_a = torch.cat([(a[k] - start[k]).flatten() for k in a])
    update_b = torch.cat([(b[k] - start[k]).flatten() for k in a])
    # Float tolerance: the gradients are all-reduced sums of other partial sums; Adam's first steps scale
    # each update to about lr, so a gradient near zero can move by ~1e-6 either way.
    assert (update_a - update_b).abs().max() < 1e-5
    assert (update_a - update_b).norm() < 1e-3 * update_a.norm()
    assert (update_a != 0).float().mean() > 0.5  # the steps really moved the weights
    # The logged losses are means over the processes: two halves of a batch log what the whole batch does.
    logs = [(tmp_path / run / "logs" / "metrics.jsonl").read_text().splitlines() for run in ("one", "two")]
    for line_one, line_two in zip(*logs, strict=True):
        one_record, two_record = json.loads(line_one), json.loads(line_two)
        for key in ("loss", "loss_task", "loss_kd_out", "loss_kd_feat"):
            assert two_record[key] == pytest.approx(one_record[key], rel=1e-4), key


def test_the_loop_synchronises_once_per_log_window(tiny_sd_dir, shapes_dir, tmp_path, monkeypatch) -> None:
    """Loss terms stay on the device between log steps: one reduction across processes per ``log_every`` optimizer
    steps (plus each checkpoint's), not one per loss term per micro step, and the logged numbers are the same as
    reading every micro step's losses: their mean over the window."""
    from accelerate import Accelerator

    import bksdm.train.distill as recipe

    syncs: list[str] = []

    def counting(name: str):
        original = getattr(Accelerator, name)

        def wrapper(self, *args, **kwargs):
            syncs.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("reduce", "gather", "gather_for_metrics"):
        monkeypatch.setattr(Accelerator, name, counting(name))
    micro_losses: list[dict[str, float]] = []

    def recording(*args, _original=recipe.kd_step, **kwargs):
        losses = _original(*args, **kwargs)
        micro_losses.append({k: v.item() for k, v in losses.items()})
        return losses

    monkeypatch.setattr(recipe, "kd_step", recording)
    out, steps, log_every, accum = tmp_path / "run", 7, 3, 2
    settings = overrides(
        tiny_sd_dir,
        shapes_dir,
        out,
        train__max_steps=steps,
        train__log_every=log_every,
        train__gradient_accumulation_steps=accum,
        train__checkpoint_every=0,  # one checkpoint, at the end
    )
    recipe.distill(load_config(None, settings))

    assert len(micro_losses) == steps * accum
    assert len(syncs) <= steps // log_every + 1 + 1, syncs  # the windows, the last partial one, the checkpoint
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 7]
    for record, (first, last) in zip(records, [(0, 3), (3, 6), (6, 7)], strict=True):
        window = micro_losses[first * accum : last * accum]
        for key in ("loss", "loss_task", "loss_kd_out", "loss_kd_feat"):
            assert record[key] == pytest.approx(sum(m[key] for m in window) / len(window), rel=1e-12, abs=0)
        assert record["skipped_samples"] == 0


def test_several_processes_vote_to_stop_in_the_log_steps_all_reduce() -> None:
    """With several processes the SIGTERM stop vote adds no synchronisation: it travels in the log step's one
    all-reduce, so no process stops before that step, and all stop there even if only one was signalled."""
    from bksdm.train.runtime import LossWindow, StopRequest

    class TwoProcesses:  # the other process was not signalled and had the same losses
        num_processes, device = 2, torch.device("cpu")
        calls = 0

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            self.calls += 1
            other = tensor.clone()
            other[-1] = 0  # the other process's stop flag
            return tensor + other

    accelerator, stop, window = TwoProcesses(), StopRequest(), LossWindow(accumulation=1)
    stop.signals.append(signal.SIGTERM)  # this process was signalled
    window.add({"loss": torch.tensor(2.0)})
    window.step_done()
    assert stop.requested(accelerator) is False and accelerator.calls == 0  # between log steps: no vote, no sync
    assert window.flush(accelerator, stop) == {"loss": 2.0}
    assert accelerator.calls == 1 and stop.requested(accelerator) is True

    quiet = StopRequest()
    window.add({"loss": torch.tensor(1.0)})
    window.flush(accelerator, quiet)
    assert quiet.requested(accelerator) is False


def test_cache_gives_the_same_batches_and_loss(tiny_sd_dir, shapes_dir, tmp_path, capsys) -> None:
    from bksdm.train.batches import make_loader, prepare_batch
    from bksdm.train.distill import load_models

    cache = tmp_path / "cache"
    args = [
        "cache",
        "--out",
        str(cache),
        "--dtype",
        "fp32",
        "--shard-size",
        "10",
        *overrides(tiny_sd_dir, shapes_dir, tmp_path / "unused")[:5],
    ]
    assert main(args) == 0
    assert "cached 24 samples (0 skipped) in 3 shards" in capsys.readouterr().out
    raw_cfg = load_config(None, overrides(tiny_sd_dir, shapes_dir, tmp_path / "x", train__batch_size=4))
    cached_cfg = load_config(
        None, overrides(tiny_sd_dir, shapes_dir, tmp_path / "x", train__batch_size=4, data__cache=cache)
    )
    models = load_models(raw_cfg, torch.device("cpu"), torch.float32)
    models.student.eval()
    raw = iter(make_loader(raw_cfg, 0, 1, start_micro_step=5))
    cached = iter(make_loader(cached_cfg, 0, 1, start_micro_step=5))
    flips = set()
    for _ in range(3):
        batch_raw, batch_cached = next(raw), next(cached)
        flips |= set(batch_raw["flipped"].tolist())
        a = prepare_batch(batch_raw, models, raw_cfg, torch.device("cpu"))
        b = prepare_batch(batch_cached, models, cached_cfg, torch.device("cpu"))
        assert a["micro_step"] == b["micro_step"] and torch.equal(a["positions"], b["positions"])
        for key in ("mean", "std", "text"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
        losses = []
        for prepared in (a, b):
            t, noise, eps = draw_noise(
                1, prepared["micro_step"], prepared["positions"], tuple(prepared["mean"].shape[1:]), 1000, "cpu"
            )
            latents = (prepared["mean"] + prepared["std"] * eps) * models.pipe.vae.config.scaling_factor
            with torch.no_grad():
                losses.append(
                    kd_step(
                        models.student,
                        models.teacher,
                        models.scheduler,
                        latents,
                        prepared["text"],
                        t,
                        noise,
                        models.feature_pairs,
                        LossWeights(),
                    )["loss"].item()
                )
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert flips == {True, False}  # both flip variants were exercised


def test_bad_data_is_skipped_and_counted(tiny_sd_dir, tmp_path) -> None:
    data = make_shapes(tmp_path / "messy", n=10)
    (data / "003.png").write_bytes(b"not an image")  # undecodable
    truncated = (data / "004.png").read_bytes()
    (data / "004.png").write_bytes(truncated[: len(truncated) // 3])
    Image.new("LA", (40, 30), (120, 200)).save(data / "005.png")  # grayscale + alpha, tiny
    with (data / "metadata.csv").open("a", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["missing.png", "a ghost"])
        writer.writerow(["006.png", ""])  # empty caption
    out = tmp_path / "run"
    assert main(["distill", *overrides(tiny_sd_dir, data, out, train__max_steps=6, train__batch_size=4)]) == 0
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_samples"] for r in records) > 0
    assert all(np.isfinite(r["loss"]) for r in records)


def test_bad_config_fails_before_any_work(tiny_sd_dir, shapes_dir, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "never"
    args = ["distill", *overrides(tiny_sd_dir, shapes_dir, out), "train.max_step=3", "optim.lr=fast"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.max_step: unknown key; did you mean 'max_steps'" in err and "optim.lr" in err
    assert not out.exists()
    import bksdm.loading

    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tmp_path / "missing")  # no teacher given, none bundled
    assert main(["distill", *overrides(tiny_sd_dir, shapes_dir, out, model__teacher="null")]) == 2
    assert "bundled shapes teacher is missing" in capsys.readouterr().err
    assert not out.exists()


def test_partial_checkpoints_are_never_resumed(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    (root / "checkpoint-0000002").mkdir(parents=True)
    (root / "checkpoint-0000002" / "trainer_state.json").write_text('{"step": 2}')
    (root / ".checkpoint-0000004.partial").mkdir()
    (root / "checkpoint-0000006").mkdir()  # no state file: a crash before completion
    assert find_checkpoint(tmp_path, "latest") == root / "checkpoint-0000002"
    assert find_checkpoint(tmp_path / "empty", "latest") is None


@pytest.mark.parametrize("layout", ["sd-v2-v", "sdxl"])
def test_v_prediction_and_sdxl_teachers_train(layout, shapes_dir, tmp_path) -> None:
    from bksdm.world.tiny import save_tiny_pipeline

    teacher = save_tiny_pipeline(tmp_path / "teacher", layout)
    out = tmp_path / "run"
    assert main(["distill", *overrides(teacher, shapes_dir, out, model__plan="bk-small", train__max_steps=2)]) == 0
    cls = StableDiffusionXLPipeline if layout == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(out / "student")
    assert pipe.unet.config.mid_block_type is None
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_kd_feat"] > 0 for r in records)


def test_webdataset_shards_and_hf_datasets_feed_the_recipe(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    import datasets
    import webdataset

    rows = list(csv.DictReader((shapes_dir / "metadata.csv").open()))
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with webdataset.TarWriter(str(shards / f"{shard:05d}.tar")) as sink:
            for i, row in enumerate(rows[shard::2]):
                sink.write(
                    {"__key__": f"{shard}-{i}", "png": (shapes_dir / row["file_name"]).read_bytes(), "txt": row["text"]}
                )
    out = tmp_path / "wds"
    spec = str(shards / "{00000..00001}.tar")
    assert main(["distill", *overrides(tiny_sd_dir, shapes_dir, out, data__train=spec, train__max_steps=2)]) == 0
    assert len((out / "logs" / "metrics.jsonl").read_text().splitlines()) == 2

    table = datasets.Dataset.from_dict(
        {
            "image": [Image.open(shapes_dir / r["file_name"]).convert("RGB") for r in rows[:8]],
            "text": [r["text"] for r in rows[:8]],
        }
    )
    table.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "hf-run"
    assert (
        main(
            [
                "distill",
                *overrides(tiny_sd_dir, shapes_dir, out, data__train=f"hf:{tmp_path / 'hf'}", train__max_steps=2),
            ]
        )
        == 0
    )
    assert (out / "student" / "model_index.json").is_file()


def test_validation_grid_shows_teacher_and_student(tiny_sd_dir, shapes_dir, tmp_path) -> None:
    out = tmp_path / "run"
    args = overrides(
        tiny_sd_dir,
        shapes_dir,
        out,
        train__max_steps=2,
        train__validate_every=2,
        train__validation_steps=2,
        train__validation_prompts='["a red circle", "a blue square"]',
    )
    assert main(["distill", *args]) == 0
    grid = Image.open(out / "validation" / "step-0000002.png")
    assert grid.size == (2 * 128, 2 * (128 + 14))  # two prompts; a teacher row and a student row with labels


def test_recipes_in_one_process_may_use_different_mixed_precisions(tmp_path) -> None:
    """A second run in the same process (the demo's students, a notebook) gets the precision it asks for.

    accelerate keeps a process-wide state and used to refuse the second Accelerator: found on a GPU, where
    a bf16 run followed by an fp16 one failed with "AcceleratorState has already been initialized". bf16
    autocast also exists on the CPU, so the switch is checked here.
    """
    from bksdm.train.runtime import make_accelerator

    first, mixed = make_accelerator(tmp_path / "a", "no")
    assert (first.mixed_precision, mixed) == ("no", "no")
    second, mixed = make_accelerator(tmp_path / "b", "bf16")
    assert (second.mixed_precision, mixed) == ("bf16", "bf16")
    third, _ = make_accelerator(tmp_path / "c", "no")
    assert third.mixed_precision == "no"
