"""Fault injection on the training side (issue: real scale and faults): frozen encoders build no graph, a
checkpoint holds every tensor once and nothing that unpickles, a crafted checkpoint runs no code, an output folder
of another run is refused, a full disk leaves the last checkpoint intact, and SIGTERM ends the demo cleanly."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import make_shapes, overrides

import bksdm.train.checkpoints
from bksdm.cli import main
from bksdm.train.checkpoints import STATE_FILE, complete_checkpoints
from bksdm.train.encoders import TextEncoders, encode_images, encode_text


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=8)


def run(teacher: Path, data: Path, out: Path, *args: str, **extra) -> int:
    settings = dict(train__max_steps=4, train__checkpoint_every=2, data__resolution=64)
    settings.update(extra)
    return main(["distill", *overrides(teacher, data, out, **settings), *args])


# ------------------------------------------------------------------------------------------------ encoders


def test_frozen_encoders_build_no_graph_even_when_their_weights_require_grad(tiny_sd_pipe) -> None:
    """A graph kept through the cached tensors took `bksdm cache` to 24 GB at SD size."""
    vae, text = tiny_sd_pipe.vae, TextEncoders.from_pipeline(tiny_sd_pipe)
    for module in (vae, *text.encoders):
        module.requires_grad_(True)
    try:
        mean, std = encode_images(vae, torch.zeros(2, 3, 64, 64))
        states, _ = encode_text(["a red circle", "a blue square"], text, "cpu")
        for tensor in (mean, std, states):
            assert tensor.grad_fn is None and not tensor.requires_grad
    finally:
        for module in (vae, *text.encoders):
            module.requires_grad_(False)


def test_cache_loads_no_unet(tiny_sd_dir, data, tmp_path) -> None:
    """The cache encodes with the VAE and text encoder only: a teacher folder without U-Net weights suffices."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd_dir, teacher)
    for weights in (teacher / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    args = ["cache", "--out", str(tmp_path / "cache"), f"model.teacher={teacher}", f"data.train={data}"]
    assert main([*args, "data.resolution=64", "data.num_workers=0"]) == 0
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert meta["complete"] and meta["num_samples"] == 8


# ------------------------------------------------------------------------------------------------ checkpoints


def stored_tensors(folder: Path) -> dict[str, tuple[int, torch.Size]]:
    """Every tensor of every file under ``folder``: file/key -> (bytes, shape)."""
    found = {}
    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = f.get_tensor(key)
                found[f"{file.relative_to(folder)}/{key}"] = (t.numel() * t.element_size(), t.shape)
    return found


def test_a_checkpoint_holds_each_tensor_once_and_no_pickle(tiny_sd_dir, data, tmp_path) -> None:
    out = tmp_path / "run"
    assert run(tiny_sd_dir, data, out, train__use_ema=True, train__max_steps=2) == 0
    checkpoint = complete_checkpoints(out)[-1]
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert files == [
        "config.yaml",
        "trainer_state.json",
        "training_state.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/config.json",
        "unet_ema/diffusion_pytorch_model.safetensors",
    ]
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    params = dict(student.named_parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    tensors = stored_tensors(checkpoint)
    optimizer = {k: v for k, v in tensors.items() if "/optimizer." in k}
    rng = {k: v for k, v in tensors.items() if "/rng." in k}
    # student + EMA + AdamW's two moments, plus one 4-byte step counter per parameter, plus the RNG state
    assert sum(b for b, _ in tensors.values()) == 4 * param_bytes + 4 * len(params) + sum(b for b, _ in rng.values())
    assert len(optimizer) == 3 * len(params)
    assert sum(b for k, (b, _) in optimizer.items() if k.endswith((".exp_avg", ".exp_avg_sq"))) == 2 * param_bytes
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["format"] == 2 and state["recipe"] == "distill" and state["step"] == 2
    ema = UNet2DConditionModel.from_pretrained(checkpoint / "unet_ema")  # a stock folder, as the student's
    ema_tensors = safe_open(str(checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors"), framework="pt")
    assert all(torch.equal(p, ema_tensors.get_tensor(n)) for n, p in ema.named_parameters())
    assert not all(torch.equal(p, params[n]) for n, p in ema.named_parameters())  # the average, not the weights
    # The run folder adds the final pipeline only: the raw weights are not copied out of the last checkpoint.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "logs", "loss_curve.png", "student"]


class _Exploit:
    """Unpickling this creates a marker file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code(tiny_sd_dir, data, tmp_path, capsys) -> None:
    """Each file of a checkpoint replaced in turn by a pickle that would run a command: resume runs nothing and
    either resumes (the file is not needed) or exits 2 with a message; accelerate's pickle names are ignored."""
    out = tmp_path / "run"
    assert run(tiny_sd_dir, data, out, train__use_ema=True, train__max_steps=2) == 0
    checkpoint = complete_checkpoints(out)[-1]
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Exploit(marker))
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "model.bin"):
        (checkpoint / name).write_bytes(payload)  # what accelerate's load_state would unpickle
    originals = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file() and p.suffix not in (".pkl", ".bin")}
    assert len(originals) == 7
    outcomes = {}
    for path, content in originals.items():
        path.write_bytes(payload)
        capsys.readouterr()
        status = run(tiny_sd_dir, data, out, "--resume", str(checkpoint), train__use_ema=True, train__max_steps=3)
        err = capsys.readouterr().err
        path.write_bytes(content)
        assert not marker.exists(), f"code ran when {path.name} was a pickle"
        assert status in (0, 2), (path, status, err)
        assert "Traceback" not in err
        if status == 2:
            assert "error:" in err and str(checkpoint) in err, err
        outcomes[str(path.relative_to(checkpoint))] = status
    # Every file that holds state is read, so replacing it is detected; the configs are informational.
    assert outcomes == {
        "config.yaml": 0,
        "trainer_state.json": 2,
        "training_state.safetensors": 2,
        "unet/config.json": 0,
        "unet/diffusion_pytorch_model.safetensors": 2,
        "unet_ema/config.json": 0,
        "unet_ema/diffusion_pytorch_model.safetensors": 2,
    }


def test_a_checkpoint_of_the_old_pickle_format_is_refused(tiny_sd_dir, data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    folder = out / "checkpoints" / "checkpoint-0000002"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"step": 2, "time": 0}))  # accelerate-era marker, no format
    assert run(tiny_sd_dir, data, out, "--resume", "latest") == 2
    assert "older bksdm" in capsys.readouterr().err


def test_resuming_with_another_plan_says_so(tiny_sd_dir, data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert run(tiny_sd_dir, data, out, train__max_steps=2) == 0
    capsys.readouterr()
    assert run(tiny_sd_dir, data, out, "--resume", "latest", model__plan="bk-small", train__max_steps=3) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "another plan" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ output folders


def test_an_output_folder_of_another_run_is_refused_then_overwritten_on_request(
    tiny_sd_dir, data, tmp_path, capsys
) -> None:
    """Reusing a folder lost data: rotation deleted the new run's checkpoint-1 (the old checkpoint-2 sorted newer),
    the logs mixed, and --resume latest resumed the old run under the new config."""
    out = tmp_path / "run"
    assert run(tiny_sd_dir, data, out, train__max_steps=4) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run(tiny_sd_dir, data, out, train__max_steps=2, train__checkpoint_every=1) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoints up to step 4)" in err and "--resume latest" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    assert run(tiny_sd_dir, data, out, "--overwrite", train__max_steps=2, train__checkpoint_every=1) == 0
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-0000001", "checkpoint-0000002"]
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_an_output_path_that_is_a_file_is_refused(tiny_sd_dir, data, tmp_path, capsys) -> None:
    out = tmp_path / "file"
    out.write_text("not a folder")
    assert run(tiny_sd_dir, data, out) == 2
    assert "is a file" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def test_resume_drops_log_records_written_after_the_checkpoint(tiny_sd_dir, data, tmp_path) -> None:
    out = tmp_path / "run"
    assert run(tiny_sd_dir, data, out, train__max_steps=4, train__checkpoint_every=2) == 0
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-0000004")  # as if killed between the log and the checkpoint
    shutil.rmtree(out / "student")
    assert run(tiny_sd_dir, data, out, "--resume", "latest", train__max_steps=4) == 0
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ full disk


def _fail_writes(monkeypatch, when, *modules) -> list[str]:
    """Makes safetensors writes whose path matches ``when`` fail as a full disk makes them fail (also through
    ``modules`` that imported ``save_file`` by name)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file
    failed: list[str] = []

    def save_file(tensors, filename, *args, **kwargs):
        if when(str(filename)):
            failed.append(str(filename))
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                'message: "No space left on device" })'
            )
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    for module in (bksdm.train.checkpoints, *modules):
        monkeypatch.setattr(module, "save_file", save_file)
    return failed


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_resumes(
    tiny_sd_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    failed = _fail_writes(monkeypatch, lambda path: "checkpoint-0000004" in path)
    assert run(tiny_sd_dir, data, out, train__use_ema=True) == 1
    err = capsys.readouterr().err
    assert failed and "no space left on device" in err and "checkpoint-0000004" in err and "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-0000002"]  # no partial left
    assert not (out / "student").exists()
    monkeypatch.undo()
    assert run(tiny_sd_dir, data, out, "--resume", "latest", train__use_ema=True) == 0
    assert (out / "student" / "model_index.json").is_file()


def test_a_full_disk_while_writing_the_student_leaves_no_half_pipeline(
    tiny_sd_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    failed = _fail_writes(monkeypatch, lambda path: ".student.partial" in path)
    assert run(tiny_sd_dir, data, out) == 1
    assert failed and "no space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "logs"]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-0000002", "checkpoint-0000004"]


# ------------------------------------------------------------------------------------------------ SIGTERM


@pytest.mark.slow
def test_sigterm_stops_the_demo_with_its_message_and_no_traceback(tmp_path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "bksdm.cli", "demo", "--out", str(out), "--steps", "400"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while demo.poll() is None and time.time() < deadline:
        if any(f.stat().st_size for f in out.glob("runs/*/logs/metrics.jsonl")):
            break
        time.sleep(0.2)
    demo.send_signal(signal.SIGTERM)
    log = demo.communicate(timeout=180)[0]
    assert demo.returncode == 128 + signal.SIGTERM, log
    assert "stopped by SIGTERM at step" in log and "--resume latest" in log, log
    assert "Traceback" not in log, log


def test_the_cache_sizes_its_batch_to_the_memory_available(tiny_sd_pipe, monkeypatch) -> None:
    """At SD size the default batch of 16 needs ~12 GB at 512 px and ~27 GB at 768 px: it is sized to fit."""
    import bksdm.sampling
    from bksdm.train.cache import ENCODER_BYTES_PER_CHANNEL_PIXEL, auto_batch_size

    vae = tiny_sd_pipe.vae
    per_image = ENCODER_BYTES_PER_CHANNEL_PIXEL * vae.config.block_out_channels[0] * 512**2
    for available, expected in ((per_image * 5 / 0.8, 5), (per_image * 100, 16), (per_image / 10, 1)):
        monkeypatch.setattr(bksdm.sampling, "available_memory", lambda device, a=available: (int(a), "test"))
        assert auto_batch_size(vae, 512, "cpu") == expected


def test_a_full_disk_during_the_cache_keeps_the_finished_shards_and_resumes(
    tiny_sd_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    import bksdm.train.cache

    cache = tmp_path / "cache"
    args = ["cache", "--out", str(cache), "--shard-size", "4", f"model.teacher={tiny_sd_dir}", f"data.train={data}"]
    args += ["data.resolution=64", "data.num_workers=0"]
    failed = _fail_writes(monkeypatch, lambda path: "shard-00001" in path, bksdm.train.cache)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert failed and "no space left on device" in err and "shard-00001" in err and "Traceback" not in err
    assert sorted(p.name for p in cache.iterdir()) == ["cache.json", "shard-00000.json", "shard-00000.safetensors"]
    finished = (cache / "shard-00000.safetensors").read_bytes()
    monkeypatch.undo()
    assert main(args) == 0
    assert (cache / "shard-00000.safetensors").read_bytes() == finished  # kept, not redone
    assert json.loads((cache / "cache.json").read_text())["num_samples"] == 8


def test_a_missing_student_folder_is_named_without_a_hub_lookup(tiny_sd_dir, data, tmp_path, capsys) -> None:
    started = time.perf_counter()
    assert run(tiny_sd_dir, data, tmp_path / "run", model__student=tmp_path / "nonexistent") == 2
    assert (
        "model.student=" in capsys.readouterr().err and "no such folder" in capsys.readouterr().err + "no such folder"
    )
    assert time.perf_counter() - started < 30 and not (tmp_path / "run").exists()


def test_gradient_checkpointing_trains_on_the_cpu(tiny_sd_dir, data, tmp_path) -> None:
    """The recipe's default (gradient checkpointing) recomputes the student's forward during backward: the kernels
    of the recomputation must match the first forward's (a CheckpointError at SD size once)."""
    out = tmp_path / "run"
    assert run(tiny_sd_dir, data, out, train__gradient_checkpointing=True, train__max_steps=2) == 0
    assert (out / "student" / "model_index.json").is_file()


def test_cache_of_bad_data_leaves_no_folder(tiny_sd_dir, tmp_path, capsys) -> None:
    empty = tmp_path / "no-metadata"
    empty.mkdir()
    args = ["cache", "--out", str(tmp_path / "cache"), f"model.teacher={tiny_sd_dir}", f"data.train={empty}"]
    assert main(args) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("cached", [False, True])
def test_data_loader_workers_start_from_a_fresh_process(tiny_sd_dir, data, tmp_path, cached) -> None:
    """Workers are not forks of the trainer (which would keep a copy of every page the trainer writes), and the
    run with workers takes the same steps as the one without."""
    extra = {}
    if cached:
        assert (
            main(
                [
                    "cache",
                    "--out",
                    str(tmp_path / "cache"),
                    f"model.teacher={tiny_sd_dir}",
                    f"data.train={data}",
                    "data.resolution=64",
                    "data.num_workers=0",
                    "--dtype",
                    "fp32",
                ]
            )
            == 0
        )
        extra["data__cache"] = tmp_path / "cache"
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert run(tiny_sd_dir, data, out, data__num_workers=workers, train__max_steps=2, **extra) == 0
    a = load_file(str(tmp_path / "w0" / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "w2" / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
