"""Fault injection for the generation side (issue 11): bad sizes, steps, guidance, devices and model references,
huge or tiny img2img inputs, and a full or read-only disk under generate, img2img, prune, export and profile.

Each case was a traceback, a kill, a silent wrong result or a half-written file before; each must now be one line
on stderr with exit status 2 (the user's mistake) or 1 (the environment's fault), with nothing written that looks
complete. Commands that would allocate without bound on the old code run in a child process under an
address-space limit, so a regression fails the test instead of taking the machine down.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from bksdm.cli import main
from bksdm.plan.archs import get_arch
from bksdm.sampling import (
    SamplingError,
    check_guidance,
    generation_bytes,
    unet_activation_bytes,
    vae_activation_bytes,
)

STEPS = "2"
MiB = 2**20


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\na green circle\na yellow square\n")
    return path


def generate(model: Path, prompts: Path, out: Path, *extra: str) -> int:
    argv = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", STEPS]
    return main([*argv, *extra])


def one_error_line(err: str, command: str) -> str:
    """The single error line a failed command printed: no traceback, no second error line (progress lines, a bar
    or ``bksdm export onnx: loading ...``, may come before it)."""
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    progress = [line for line in lines if line.startswith("generate:") or line.endswith(" ...")]
    rest = [line for line in lines if line not in progress]
    assert len(rest) == 1 and rest[0].startswith(f"bksdm {command}: error: "), err
    assert lines[-1] == rest[0], err  # the message comes last
    return rest[0]


def hidden(folder: Path) -> list[str]:
    """Partial files and folders (``.NAME.partial``, ``.NAME.tmp``) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".gitkeep")


# --- sizes, steps, guidance, batch: exit 2 before any work ---------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--height", "0"], "--height 0: give a positive size in pixels"),
        (["--height", "-64"], "--height -64: give a positive size in pixels"),
        (["--width", "0"], "--width 0: give a positive size in pixels"),
        (["--height", "100"], "--height 100 is not a multiple of the VAE's factor 8; give 96 or 104"),
        (["--width", "4"], "--width 4 is not a multiple of the VAE's factor 8; give 8"),
        (["--guidance", "nan"], "--guidance nan: the guidance scale must be a finite number"),
        (["--guidance", "inf"], "--guidance inf: the guidance scale must be a finite number"),
        (["--guidance", "-5"], "--guidance -5: the guidance scale cannot be negative"),
        (["--guidance", "0.5"], "--guidance 0.5: guidance applies only above 1"),
        (["--steps", "0"], "--steps 0: needs at least 1 denoising step"),
        (["--steps", "-3"], "--steps -3: needs at least 1 denoising step"),
        (["--steps", "5000"], "--steps 5000: the model's PNDMScheduler (trained on 1000 timesteps) can take at most"),
        (["--batch-size", "0"], "--batch-size 0: give a whole number of images per call, at least 1"),
        (["--resize", "0"], "--resize 0: give a positive size in pixels"),
        (["--device", "tpu"], "--device tpu: not a device bksdm runs on; use cpu, cuda or cuda:N"),
        (["--device", "cuda:banana"], "--device cuda:banana: not a device bksdm runs on"),
    ],
)
def test_generate_refuses_bad_sampling_options(extra, message, tiny_sd_dir, prompts, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, prompts, out, *extra) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert message in line, line
    assert not out.exists()  # refused before the folder, settings.json or any image was written


def test_generate_cuda_without_cuda_is_one_line(tiny_sd_dir, prompts, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert generate(tiny_sd_dir, prompts, tmp_path / "out", "--device", "cuda") == 2
    assert "--device cuda: CUDA is not available on this machine; use --device cpu" in one_error_line(
        capsys.readouterr().err, "generate"
    )


def test_guidance_zero_and_one_are_no_guidance_and_settings_json_is_strict(
    tiny_sd_dir, prompts, tmp_path, capsys
) -> None:
    # 0 (few-step models' "off") and 1 give the same images; what is written is strict JSON.
    for value in ("0", "1"):
        assert generate(tiny_sd_dir, prompts, tmp_path / value, "--guidance", value, "--batch-size", "4") == 0
    for name in ("000000.png", "000003.png"):
        assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "1" / name).read_bytes()

    def refuse(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    settings = json.loads((tmp_path / "0" / "settings.json").read_text(), parse_constant=refuse)
    assert settings["settings"]["guidance_scale"] == 0.0
    for line in (tmp_path / "0" / "manifest.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_library_refuses_what_the_command_refuses(tiny_sd_pipe) -> None:
    from bksdm.eval.generate import generate_images

    for kwargs, message in [
        ({"guidance_scale": float("nan")}, "guidance_scale nan"),
        ({"steps": 0}, "steps 0"),
        ({"batch_size": 0}, "batch_size 0"),
        ({"height": 0}, "height 0"),
        ({"height": 100}, "height 100 is not a multiple"),
    ]:
        with pytest.raises(SamplingError, match=message):
            generate_images(tiny_sd_pipe, ["a cat"], [0], **kwargs)
    for bad in (float("nan"), float("inf"), -5.0, 0.5, True, "7"):
        with pytest.raises(SamplingError):
            check_guidance(bad)
    assert check_guidance(0) == 0.0 and check_guidance(7.5) == 7.5


# --- the size ceiling: an estimate against the memory that is free --------------------------------------------


def test_memory_estimate_matches_the_measured_peaks() -> None:
    """The constants reproduce the module's table (SD-v1.4, fp32, CPU, peak RSS above the weights) within the
    margin the table shows: the ceiling must not refuse what fits by much, nor admit much more than fits."""
    arch = get_arch("sd-v1.4")
    measured = [  # (estimate, measured MiB)
        (vae_activation_bytes(arch.vae_config, 256, 256, 1), 331),
        (vae_activation_bytes(arch.vae_config, 256, 256, 4), 915),
        (vae_activation_bytes(arch.vae_config, 512, 512, 1), 1046),
        (unet_activation_bytes(arch.unet_config, 64 * 64, 2), 407),
    ]
    for estimate, peak in measured:
        assert 0.8 <= estimate / MiB / peak <= 1.3, (estimate / MiB, peak)
    # What the 24 GB machine can and cannot do with SD-v1.4 (weights ~4 GiB): batch 8 at 512 px fits, 1024 does not.
    assert generation_bytes(arch.unet_config, arch.vae_config, 512, 512, 8, guidance=True) < 10 * 2**30
    assert generation_bytes(arch.unet_config, arch.vae_config, 1024, 1024, 8, guidance=True) > 30 * 2**30
    # Attention maps count only where they are built (not by PyTorch's SDPA).
    plain = unet_activation_bytes(arch.unet_config, 64 * 64, 2)
    maps = unet_activation_bytes(arch.unet_config, 64 * 64, 2, attention_maps=True)
    assert maps - plain == 2 * 2 * 8 * 4096**2 * 4


def _run_limited(argv: list[str], tmp_path: Path, memory_gib: float | None = None) -> subprocess.CompletedProcess:
    """``bksdm ARGV`` in a child limited to 12 GiB of address space; ``memory_gib`` pins the free memory bksdm
    sees (the machine running the tests may have more or less than the one the case is about)."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))
        memory_gib = {memory_gib!r}
        if memory_gib is not None:
            try:
                import bksdm.sampling as sampling
                sampling.available_memory = lambda device: (int(memory_gib * 2**30), "available (pinned)")
            except ImportError:
                pass
        from bksdm.cli import main
        sys.exit(main({argv!r}))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )


def test_a_huge_size_is_refused_with_the_estimate(tiny_sd_dir, prompts, tmp_path) -> None:
    # Was: killed by the kernel at 18.7 GB with no message.
    out = tmp_path / "out"
    argv = ["generate", "--model", str(tiny_sd_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "2"]
    done = _run_limited([*argv, "--height", "100000", "--width", "100000"], tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done.stderr, "generate")
    assert "--height 100000 --width 100000 at batch 4 needs about" in line
    assert "GiB of memory for its activations, but" in line and "give a smaller size" in line
    assert not out.exists()


def test_a_batch_too_large_for_memory_names_the_batch_that_fits(tiny_sd_dir, prompts, tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline

    import bksdm.sampling as sampling

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    need = {k: sampling.pipeline_bytes(pipe, 1024, 1024, k, True) for k in (1, 2, 3, 4)}
    assert need[1] < need[2] < need[3] < need[4]
    monkeypatch.setattr(sampling, "available_memory", lambda device: (need[2] + 1, "available (pinned)"))
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, prompts, out, "--height", "1024", "--width", "1024", "--batch-size", "4") == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "--height 1024 --width 1024 at batch 4 needs about " in line
    assert "is available (pinned); lower --batch-size to 2 or less, or the size" in line
    assert not out.exists()


# --- img2img inputs: too large, too small ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.png"
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(path)  # one colour: a small file, 64 M pixels
    return path


def test_img2img_huge_input_file_is_refused_naming_it(tiny_sd_dir, big_image, tmp_path) -> None:
    # Was: a traceback. 8 GiB pinned free: the tiny pipeline needs ~37 GiB at 8000x8000.
    out = tmp_path / "out"
    argv = ["img2img", "--model", str(tiny_sd_dir), "--image", str(big_image), "--prompt", "a cat"]
    done = _run_limited([*argv, "--out", str(out), "--steps", "2"], tmp_path, memory_gib=8)
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done.stderr, "img2img")
    assert f"{big_image} (8000x8000 pixels) at batch 1 needs about" in line
    assert "but 8.0 GiB is available (pinned)" in line and "--size WxH resizes every input first" in line
    assert not out.exists() or not any(out.iterdir())


def test_img2img_huge_input_in_a_folder_is_skipped_and_counted(tiny_sd_dir, big_image, tmp_path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(big_image, folder / "a_big.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "b_small.png")
    out = tmp_path / "out"
    argv = ["img2img", "--model", str(tiny_sd_dir), "--image", str(folder), "--prompt", "a cat", "--steps", "2"]
    done = _run_limited([*argv, "--out", str(out)], tmp_path, memory_gib=8)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "translated 1 of 2 images" in done.stdout and "1 skipped" in done.stdout
    assert "a_big.png (8000x8000 pixels) at batch 1 needs about" in done.stderr
    record = json.loads((out / "img2img.json").read_text())
    assert [Path(e["input"]).name for e in record["images"]] == ["b_small.png"]
    assert [Path(e["input"]).name for e in record["skipped"]] == ["a_big.png"]
    assert sorted(p.name for p in out.iterdir()) == ["b_small.png", "img2img.json"]


def test_img2img_folder_with_one_1x1_image_names_the_file(tiny_sd_dir, tmp_path, capsys) -> None:
    # Was: "height and width must be > 0", naming no file.
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    out = tmp_path / "out"
    argv = ["img2img", "--model", str(tiny_sd_dir), "--image", str(folder), "--prompt", "a cat", "--steps", "2"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'dot.png'}: 1x1 pixels is too small: img2img needs at least 8 pixels a side" in err
    assert "none of the 1 image files could be read and translated" in err
    assert not out.exists() or not any(out.iterdir())

    # Beside a usable image it is skipped and counted, and the other one is translated.
    Image.new("RGB", (64, 48), (30, 200, 30)).save(folder / "ok.png")
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "translated 1 of 2 images" in printed and f"skipped {folder / 'dot.png'}" in printed
    assert Image.open(out / "ok.png").size == (64, 48)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--guidance", "nan"], "--guidance nan: the guidance scale must be a finite number"),
        (["--strength", "nan"], "--strength nan: give a number in (0, 1]"),
        (["--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--batch-size", "0"], "--batch-size 0: give a whole number"),
        (["--device", "tpu"], "--device tpu: not a device bksdm runs on"),
        (["--model", "/nonexistent/model"], "/nonexistent/model: no such folder"),
    ],
)
def test_img2img_refuses_bad_options(extra, message, tiny_sd_dir, tmp_path, capsys) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    out = tmp_path / "out"
    argv = ["img2img", "--model", str(tiny_sd_dir), "--image", str(image), "--prompt", "a cat", "--steps", "2"]
    assert main([*argv, "--out", str(out), *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err, "img2img")
    assert not out.exists()


# --- model references and devices ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "prune", "profile", "export"])
def test_a_missing_local_model_says_no_such_folder_without_asking_the_hub(command, prompts, tmp_path, capsys):
    # Was: a hub validation or connection error (a traceback for model.student=/nonexistent).
    missing = "/nonexistent/teacher"
    out = str(tmp_path / "out")
    argv = {
        "generate": ["generate", "--model", missing, "--prompts", str(prompts), "--out", out],
        "prune": ["prune", "--teacher", missing, "--out", out],
        "profile": ["profile", missing, "--no-latency"],
        "export": ["export", "onnx", "--model", missing, "--out", out],
    }[command]
    code = main(argv)
    err = capsys.readouterr().err
    if command == "export" and "onnx" in err and "pip install" in err:
        pytest.skip("onnx is not installed")
    assert code == 2
    name = command.split()[0]
    assert "/nonexistent/teacher: no such folder; check the path" in one_error_line(err, name)


def test_a_file_given_as_model_says_it_is_a_file(tiny_sd_dir, prompts, tmp_path, capsys) -> None:
    from bksdm.loading import TeacherNotFoundError, check_model_ref, load_pipeline

    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(TeacherNotFoundError, match="model.safetensors is a file, not a folder"):
        load_pipeline(file)
    check_model_ref(tiny_sd_dir)  # a folder passes
    check_model_ref("owner/name")  # a hub id is left to the hub


def test_an_unreachable_hub_id_is_one_line(prompts, tmp_path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    argv = ["generate", "--model", "nobody-here/no-such-model", "--prompts", str(prompts), "--out", str(out)]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "cannot load 'nobody-here/no-such-model': no local folder of that name" in line
    assert "offline mode is on (HF_HUB_OFFLINE)" in line
    assert "`huggingface-cli download nobody-here/no-such-model`" in line
    assert "stacktrace" not in line and not out.exists()


def test_resolve_device() -> None:
    from bksdm.devices import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("tpu", "xla", "meta", "", "cuda:-1x"):
        with pytest.raises(DeviceError, match="not a device bksdm runs on"):
            resolve_device(name)
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("command", ["img2img", "profile"])
def test_device_tpu_is_one_line_everywhere(command, tiny_sd_dir, tmp_path, capsys) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    argv = {
        "img2img": ["img2img", "--model", str(tiny_sd_dir), "--image", str(image), "--prompt", "x"],
        "profile": ["profile", str(tiny_sd_dir)],
    }[command]
    out = ["--out", str(tmp_path / "out")]
    assert main([*argv, *out, "--device", "tpu"]) == 2
    assert "--device tpu: not a device bksdm runs on" in one_error_line(capsys.readouterr().err, command)


# --- a full or read-only disk ----------------------------------------------------------------------------------


def _half_then_full(real_save, fail_at: int):
    """A PIL ``save`` that writes half of the ``fail_at``-th image and then finds the disk full."""
    calls: list[str] = []

    def save(self, fp, *args, **kwargs):
        calls.append(Path(fp).name)
        if len(calls) == fail_at:
            buffer = io.BytesIO()
            real_save(self, buffer, format="PNG")
            Path(fp).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kwargs)

    return save, calls


def test_generate_on_a_full_disk_keeps_the_earlier_images_and_no_half_one(
    tiny_sd_dir, prompts, tmp_path, monkeypatch, capsys
) -> None:
    out = tmp_path / "out"
    save, calls = _half_then_full(Image.Image.save, fail_at=3)
    monkeypatch.setattr(Image.Image, "save", save)
    assert generate(tiny_sd_dir, prompts, out, "--batch-size", "1") == 1
    line = one_error_line(capsys.readouterr().err, "generate")
    assert f"could not write {out / '000002.png'}: no space left on device (" in line and "free some space" in line
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "manifest.jsonl", "settings.json"]
    for name in ("000000.png", "000001.png"):
        Image.open(out / name).load()  # whole images
    monkeypatch.undo()
    # Space freed: the same command makes the rest, and the set is complete.
    assert generate(tiny_sd_dir, prompts, out, "--batch-size", "1") == 0
    assert "(2 generated, 2 already there" in capsys.readouterr().out
    assert not hidden(out)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` made read-only: chmod, and (as root, whom modes do not stop) every write into it refused with
    EACCES at the calls Python's file writers go through (open, mkdir, rename)."""
    folder.chmod(0o555)
    inside = folder.resolve()

    def is_inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(inside)
        except (TypeError, ValueError):
            return False

    def denied(path):
        return PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    real_open, real_io_open, real_mkdir = builtins.open, io.open, os.mkdir
    real_replace, real_rename = os.replace, os.rename

    def guarded_open(real):
        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and is_inside(file):
                raise denied(file)
            return real(file, mode, *args, **kwargs)

        return open_

    def mkdir(path, *args, **kwargs):
        if is_inside(path):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    def moved(real):
        def move(src, dst, *args, **kwargs):
            if is_inside(dst) or is_inside(src):
                raise denied(dst)
            return real(src, dst, *args, **kwargs)

        return move

    with pytest.MonkeyPatch.context() as patch:
        if os.access(folder, os.W_OK):  # root: the mode bits alone do not stop the writes
            patch.setattr(builtins, "open", guarded_open(real_open))
            patch.setattr(io, "open", guarded_open(real_io_open))
            patch.setattr(os, "mkdir", mkdir)
            patch.setattr(os, "replace", moved(real_replace))
            patch.setattr(os, "rename", moved(real_rename))
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_generate_into_a_read_only_folder_is_one_line(tiny_sd_dir, prompts, tmp_path, capsys) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    with read_only(out):
        assert generate(tiny_sd_dir, prompts, out) == 1
    line = one_error_line(capsys.readouterr().err, "generate")
    assert f"could not write {out / 'settings.json'}: permission denied; choose a folder you can write to" in line
    assert list(out.iterdir()) == []


def test_img2img_on_a_full_disk_keeps_the_earlier_outputs(tiny_sd_dir, tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 100, 100)).save(folder / f"in{i}.png")
    out = tmp_path / "out"
    save, _ = _half_then_full(Image.Image.save, fail_at=2)
    monkeypatch.setattr(Image.Image, "save", save)
    argv = ["img2img", "--model", str(tiny_sd_dir), "--image", str(folder), "--prompt", "a cat", "--steps", "2"]
    assert main([*argv, "--out", str(out), "--batch-size", "1"]) == 1
    line = one_error_line(capsys.readouterr().err, "img2img")
    assert f"could not write {out / 'in1.png'}: no space left on device" in line
    assert sorted(p.name for p in out.iterdir()) == ["in0.png"]  # whole; no half in1.png, no record
    Image.open(out / "in0.png").load()


def test_img2img_single_output_file_keeps_its_format(tiny_sd_dir, tmp_path) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(image)
    argv = ["img2img", "--model", str(tiny_sd_dir), "--image", str(image), "--prompt", "x", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "result.jpg")]) == 0
    assert Image.open(tmp_path / "result.jpg").format == "JPEG" and not hidden(tmp_path)


def _safetensors_full_after(n: int):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls: list[str] = []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(str(filename))
        if len(calls) == n:
            Path(filename).write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    return save_file


def test_prune_on_a_full_disk_keeps_the_previous_student(tiny_sd_dir, tmp_path, monkeypatch, capsys) -> None:
    import safetensors.torch

    out = tmp_path / "student"
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--out", str(out)]) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    monkeypatch.setattr(safetensors.torch, "save_file", _safetensors_full_after(2))
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--plan", "bk-tiny", "--out", str(out), "--overwrite"]) == 1
    line = one_error_line(capsys.readouterr().err, "prune")
    assert f"could not write {out}: no space left on device" in line
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no partial folder beside it


def test_prune_into_a_read_only_folder_is_one_line(tiny_sd_dir, tmp_path, capsys) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        assert main(["prune", "--teacher", str(tiny_sd_dir), "--out", str(parent / "student")]) == 1
    line = one_error_line(capsys.readouterr().err, "prune")
    assert f"could not write {parent / 'student'}: permission denied" in line
    assert list(parent.iterdir()) == []


def test_export_on_a_full_disk_leaves_nothing(tiny_sd_dir, tmp_path, monkeypatch, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    real = onnx.save_model

    def full(model, path, *args, **kwargs):
        real(model, path, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx, "save_model", full)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--model", str(tiny_sd_dir), "--out", str(out), "--components", "unet"]) == 1
    line = one_error_line(capsys.readouterr().err, "export")
    assert f"could not write {out}: no space left on device" in line
    assert list(tmp_path.iterdir()) == []


def test_profile_out_into_a_read_only_folder_is_one_line(tmp_path, capsys) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        code = main(["profile", "--arch", "sd-v1.4", "--no-latency", "--out", str(parent / "p.json")])
    assert code == 1
    line = one_error_line(capsys.readouterr().err, "profile")
    assert f"could not write {parent / 'p.json'}: permission denied" in line
    assert list(parent.iterdir()) == []


def test_steps_are_checked_against_what_the_scheduler_can_take(tiny_sd_dir, tiny_sd_pipe, prompts, tmp_path, capsys):
    """SD's PNDM (1000 training timesteps, steps_offset 1) can take 999 steps: at 1000 its last timestep is 1000,
    one past its noise table, and every request of `bksdm serve --steps 1000` failed with an IndexError."""
    from bksdm.sampling import SamplingError, check_scheduler_steps
    from bksdm.use.serve.app import DemoApp, SamplingSettings, ServedModel

    scheduler = tiny_sd_pipe.scheduler
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.steps_offset == 1
    assert check_scheduler_steps(scheduler, 999) == 999
    with pytest.raises(SamplingError, match="--steps 1000: the model's PNDMScheduler .* at most 999 steps"):
        check_scheduler_steps(scheduler, 1000)
    assert generate(tiny_sd_dir, prompts, tmp_path / "out", "--steps", "1000") == 2
    assert "at most 999 steps" in capsys.readouterr().err and not (tmp_path / "out" / "manifest.jsonl").exists()
    with pytest.raises(SamplingError, match="steps 1000: .* at most 999 steps"):
        DemoApp([ServedModel("teacher", str(tiny_sd_dir), tiny_sd_pipe)], SamplingSettings(steps=1000))


# --- resuming into a folder with broken records or images; symlinks among img2img inputs ---------------------


def test_generate_resume_draws_a_truncated_image_again(tiny_sd_dir, prompts, tmp_path, capsys, caplog) -> None:
    # Was: a truncated 000002.png (an older version killed mid-write) counted as done and was kept.
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, prompts, out, "--batch-size", "4") == 0
    whole = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / "000002.png").write_bytes(whole["000002.png"][:50])  # cut inside the header's chunks
    (out / "000001.png").write_bytes(whole["000001.png"][: len(whole["000001.png"]) // 2])  # cut inside the pixels
    capsys.readouterr()
    assert generate(tiny_sd_dir, prompts, out, "--batch-size", "4") == 0
    printed = capsys.readouterr().out
    assert "(2 generated, 2 already there; 000001.png and 1 more did not read and were drawn again;" in printed
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == whole  # the same bytes as the first run
    warned = [r.getMessage() for r in caplog.records if r.name == "bksdm.eval.generate"]
    assert any(m.startswith(f"{out / '000001.png'} does not read (") for m in warned), warned
    assert any(m.startswith(f"{out / '000002.png'} does not read (") for m in warned), warned
    runs = json.loads((out / "settings.json").read_text())["runs"]
    assert [(r["generated"], r["skipped"], r["redrawn_unreadable"]) for r in runs[1:]] == [(2, 2, 2)]
    # A whole set is left alone: nothing drawn again.
    assert generate(tiny_sd_dir, prompts, out, "--batch-size", "4") == 0
    assert "(0 generated, 4 already there; " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("settings.json", '{"steps": NaN', "not valid JSON: NaN is not a JSON value"),
        ("settings.json", '{"settings": {"steps": 2 "seed": 0}}', "not valid JSON: Expecting ',' delimiter: line 1"),
        ("settings.json", "[1, 2]", "not a JSON object"),
        ("settings.json", '{"settings": 7}', "its 'settings' entry is not a JSON object"),
        ("manifest.jsonl", '{"index": 0, "prompt": "a red circle"}\n{"index": 1, "pro', "line 2 is not valid JSON"),
        ("manifest.jsonl", '{"index": "0", "prompt": "a red circle"}\n', "line 1 is not an entry with an index"),
    ],
)
def test_generate_resume_with_a_broken_record_names_the_file(
    name, text, problem, tiny_sd_dir, prompts, tmp_path, capsys
) -> None:
    # Was: "Expecting ',' delimiter: line 1 column 14 (char 13)", naming no file.
    out = tmp_path / "out"
    assert generate(tiny_sd_dir, prompts, out) == 0
    images = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / name).write_text(text)
    capsys.readouterr()
    assert generate(tiny_sd_dir, prompts, out) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert f"bksdm generate: error: {out / name} is broken ({problem}" in line, line
    assert line.endswith(
        f"it records how the images in {out} were made, so bksdm cannot tell whether they match this command: "
        "restore the file, or delete the folder (or use a new --out) to start over"
    ), line
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == images and (out / name).read_text() == text


def test_img2img_symlinks_that_lead_nowhere_keep_their_index(tiny_sd_dir, tmp_path, capsys) -> None:
    # Was: a symlink loop in the folder was left out uncounted, and the seeds of the images after it moved.
    from bksdm.use.img2img import image_seed

    def inputs(folder: Path, broken) -> Path:
        folder.mkdir()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
        broken(folder / "b.png", "b.png")
        broken(folder / "c.png", "nowhere.png")
        Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "d.png")
        return folder

    argv = ["img2img", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--steps", "2", "--batch-size", "4"]
    links = inputs(tmp_path / "links", lambda p, target: os.symlink(target, p))  # b: a loop, c: no target
    assert main([*argv, "--image", str(links), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "translated 2 of 4 images" in captured.out and "2 skipped" in captured.out
    record = json.loads((tmp_path / "out" / "img2img.json").read_text())
    assert [(Path(e["input"]).name, e["seed"]) for e in record["images"]] == [
        ("a.png", image_seed(0, 0)),
        ("d.png", image_seed(0, 3)),
    ]
    assert record["skipped"] == [
        {
            "input": str(links / "b.png"),
            "reason": f"{links / 'b.png'}: cannot read the image (a symbolic link that leads nowhere: a loop)",
        },
        {
            "input": str(links / "c.png"),
            "reason": f"{links / 'c.png'}: cannot read the image (a symbolic link that leads nowhere: its target "
            "is missing)",
        },
    ]
    assert f"skipped {links / 'b.png'}: cannot read the image" in captured.err
    # The same outputs as when b and c are plain unreadable files.
    plain = inputs(tmp_path / "plain", lambda p, target: p.write_bytes(b"not an image"))
    assert main([*argv, "--image", str(plain), "--out", str(tmp_path / "out2")]) == 0
    capsys.readouterr()
    for name in ("a.png", "d.png"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    # A single --image that leads nowhere is an error that says so.
    assert main([*argv, "--image", str(links / "b.png"), "--out", str(tmp_path / "out3")]) == 2
    line = one_error_line(capsys.readouterr().err, "img2img")
    assert f"--image {links / 'b.png'}: a symbolic link that leads nowhere (a loop, or its target is missing)" in line
