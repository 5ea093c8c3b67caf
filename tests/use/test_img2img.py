"""``bksdm img2img`` (bksdm.use.img2img, bksdm.cli.img2img): SDEdit with the stock img2img pipeline.

The mechanics (sizes, per-image seeds, batching, student U-Nets, bad inputs) are tested on the tiny SD-v1
pipeline. What img2img is *for* -- the prompt's attributes at high strength, the input's at low strength -- needs
a model that draws the shapes world, so those tests run on the bundled teacher, read by the shipped classifier.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bksdm.cli import main
from bksdm.use.img2img import Img2ImgError, check_strength, image_seed, img2img_pipeline, translate
from bksdm.use.img2img_job import find_inputs, read_input
from bksdm.world.shapes import COLORS, SHAPES, Scene, sample
from bksdm.world.teacher import TEACHER_DIR

STEPS = 4
PROMPT = "a big blue square at the top left"


@pytest.fixture(scope="module")
def tiny_img2img(tiny_sd_dir: Path):
    """The tiny SD-v1 pipeline as an img2img pipeline (read-only: shared by the module's tests)."""
    return img2img_pipeline(tiny_sd_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three shapes images (128 px, the tiny pipeline's size), an unreadable .png and a .txt."""
    folder = tmp_path_factory.mktemp("img2img-inputs")
    for i in range(3):
        sample(5, i)[0].resize((128, 128), Image.Resampling.NEAREST).save(folder / f"shape{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # sorts first: index 0
    (folder / "notes.txt").write_text("not an image, not counted")
    return folder


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


# --- the library ---------------------------------------------------------------------------------------------


def test_outputs_keep_each_input_size(tiny_img2img) -> None:
    images = [
        sample(1, 0)[0].resize((128, 128)),
        sample(1, 1)[0].resize((192, 128)),
        sample(1, 2)[0].resize((130, 100)),
    ]
    out = translate(tiny_img2img, images, PROMPT, [1, 2, 3], strength=0.5, steps=STEPS, batch_size=3)
    # Sizes are rounded down to the VAE's factor (8 for the tiny VAE), as the stock pipeline does.
    assert [image.size for image in out] == [(128, 128), (192, 128), (128, 96)]
    assert all(image.mode == "RGB" for image in out)


def test_results_depend_on_the_seed_not_on_the_batch(tiny_img2img) -> None:
    images = [sample(2, i)[0].resize((128, 128)) for i in range(3)]
    seeds = [image_seed(7, i) for i in range(3)]
    together = translate(tiny_img2img, images, PROMPT, seeds, strength=0.7, steps=STEPS, batch_size=3)
    alone = translate(tiny_img2img, images, PROMPT, seeds, strength=0.7, steps=STEPS, batch_size=1)
    again = translate(tiny_img2img, images[1:2], PROMPT, seeds[1:2], strength=0.7, steps=STEPS, batch_size=1)
    # Batch 3 vs 1: the same up to float rounding in batched convolutions (at most one 8-bit level).
    assert all(_max_diff(a, b) <= 1 for a, b in zip(together, alone, strict=True))
    assert _max_diff(again[0], alone[1]) == 0  # same call, same numbers
    other_seed = translate(tiny_img2img, images[1:2], PROMPT, [seeds[0]], strength=0.7, steps=STEPS)
    assert _max_diff(other_seed[0], alone[1]) > 10


def test_a_folder_counts_the_image_files_every_command_counts(tmp_path: Path) -> None:
    # One list of image suffixes for every command (bksdm.artifacts): PGM/PPM inputs count here as in evaluate.
    (tmp_path / "e.txt").write_text("not an image")
    (tmp_path / "f.json").write_text("{}")
    for name, kind in (("a.PNG", "PNG"), ("b.ppm", "PPM"), ("c.pgm", "PPM"), ("d.tiff", "TIFF")):
        Image.new("L" if name.endswith("pgm") else "RGB", (8, 8)).save(tmp_path / name, format=kind)
    assert [p.name for p in find_inputs(tmp_path)] == ["a.PNG", "b.ppm", "c.pgm", "d.tiff"]
    assert all(read_input(p).mode == "RGB" for p in find_inputs(tmp_path))


def test_image_seed_is_stable() -> None:
    assert image_seed(0, 3) == image_seed(0, 3)
    assert len({image_seed(0, i) for i in range(100)}) == 100
    assert image_seed(0, 1) != image_seed(1, 1)


@pytest.mark.parametrize(
    ("strength", "steps", "fix"),
    [(0.0, 10, "(0, 1]"), (1.5, 10, "(0, 1]"), (0.05, 10, "at least 0.1"), (0.5, 0, "at least 1")],
)
def test_impossible_strength_or_steps_fail_with_a_fix(strength: float, steps: int, fix: str) -> None:
    with pytest.raises(Img2ImgError, match=re.escape(fix)):
        check_strength(strength, steps)


# --- the command -----------------------------------------------------------------------------------------------


def _run(*args: str) -> int:
    return main(["img2img", *args])


def test_folder_batch_skips_unreadable_and_records_seeds(tiny_sd_dir: Path, inputs: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(tiny_sd_dir), "--image", str(inputs), "--prompt", PROMPT, "--strength", "0.6"]
    assert _run(*common, "--steps", str(STEPS), "--out", str(out), "--batch-size", "2", "--seed", "3") == 0
    captured = capsys.readouterr()
    assert "translated 3 of 4 images" in captured.out
    assert "1 skipped (unreadable, or too small or too large)" in captured.out
    assert "broken.png" in captured.out and "broken.png" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["img2img.json", "shape0.png", "shape1.png", "shape2.png"]
    record = json.loads((out / "img2img.json").read_text())
    # The unreadable file keeps its index (0), so the others' seeds do not move when it is fixed or removed.
    assert [(Path(e["input"]).name, e["seed"]) for e in record["images"]] == [
        (f"shape{i}.png", image_seed(3, i + 1)) for i in range(3)
    ]
    assert [Path(s["input"]).name for s in record["skipped"]] == ["broken.png"]
    assert record["denoising_steps_run"] == int(STEPS * 0.6) and record["steps"] == STEPS

    # Batch size 1 gives the same images (up to float rounding of batched convolutions).
    out1 = tmp_path / "out1"
    assert _run(*common, "--steps", str(STEPS), "--out", str(out1), "--batch-size", "1", "--seed", "3") == 0
    for i in range(3):
        assert _max_diff(Image.open(out / f"shape{i}.png"), Image.open(out1 / f"shape{i}.png")) <= 1

    # The library gives the same image for the same seed: the command adds nothing but files.
    pipe = img2img_pipeline(tiny_sd_dir)
    image = Image.open(inputs / "shape1.png").convert("RGB")
    direct = translate(pipe, [image], PROMPT, [image_seed(3, 2)], strength=0.6, steps=STEPS)[0]
    assert _max_diff(direct, Image.open(out1 / "shape1.png")) == 0

    # Existing outputs are kept unless asked.
    assert _run(*common, "--steps", str(STEPS), "--out", str(out), "--seed", "3") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_single_file_to_a_file_with_resize(tiny_sd_dir: Path, inputs: Path, tmp_path: Path) -> None:
    target = tmp_path / "result.png"
    args = ["--model", str(tiny_sd_dir), "--image", str(inputs / "shape0.png"), "--prompt", PROMPT]
    assert _run(*args, "--steps", str(STEPS), "--out", str(target), "--size", "64x128") == 0
    assert Image.open(target).size == (64, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]  # no record next to a single file


def test_scheduler_option_swaps_the_sampler(tiny_sd_dir: Path, inputs: Path, tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler

    out = tmp_path / "out"
    args = ["--model", str(tiny_sd_dir), "--image", str(inputs), "--prompt", PROMPT, "--steps", str(STEPS)]
    assert _run(*args, "--out", str(out), "--scheduler", "EulerDiscreteScheduler", "--batch-size", "1") == 0
    assert json.loads((out / "img2img.json").read_text())["scheduler"] == "EulerDiscreteScheduler"
    pipe = img2img_pipeline(tiny_sd_dir)
    assert not isinstance(pipe.scheduler, EulerDiscreteScheduler)
    image = Image.open(inputs / "shape0.png").convert("RGB")
    own = translate(pipe, [image], PROMPT, [image_seed(0, 1)], strength=0.8, steps=STEPS)[0]
    pipe = img2img_pipeline(tiny_sd_dir, scheduler="EulerDiscreteScheduler")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    euler = translate(pipe, [image], PROMPT, [image_seed(0, 1)], strength=0.8, steps=STEPS)[0]
    assert _max_diff(euler, Image.open(out / "shape0.png")) == 0  # the command ran exactly that sampler
    assert _max_diff(euler, own) > 0  # and it is another sampler than the model's own


def test_student_unet_swapped_in_equals_the_student_pipeline(tiny_sd_dir: Path, tmp_path: Path) -> None:
    student = tmp_path / "student"
    assert main(["prune", "--teacher", str(tiny_sd_dir), "--plan", "bk-tiny", "--out", str(student)]) == 0
    swapped = img2img_pipeline(tiny_sd_dir, unet=student)
    assert swapped.unet.config.block_out_channels == [32, 64, 96]  # bk-tiny drops the innermost stage
    assert type(swapped).__name__ == "StableDiffusionImg2ImgPipeline"
    whole = img2img_pipeline(student)
    image = [sample(4, 0)[0].resize((128, 128))]
    a = translate(swapped, image, PROMPT, [11], strength=0.8, steps=STEPS)[0]
    b = translate(whole, image, PROMPT, [11], strength=0.8, steps=STEPS)[0]
    assert _max_diff(a, b) == 0
    teacher = translate(img2img_pipeline(tiny_sd_dir), image, PROMPT, [11], strength=0.8, steps=STEPS)[0]
    assert _max_diff(a, teacher) > 10  # the student really ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "{missing}"], "no such file or folder"),
        (["--image", "{empty}"], "holds no image file"),
        (["--image", "{broken}"], "cannot read the image"),
        (["--strength", "0"], "(0, 1]"),
        (["--strength", "0.1", "--steps", "5"], "0 denoising steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--size", "big"], "--size big"),
        (["--unet", "{empty}"], "neither unet/config.json"),
        (["--unet", "{sd2}"], "cross_attention_dim"),
        (["--model", "{empty}"], "model_index.json"),
        (["--scheduler", "FastScheduler"], "--scheduler FastScheduler: not a diffusers scheduler"),
        (["--device", "cuda:7"], None),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    args: list[str], message: str | None, tiny_sd_dir: Path, tiny_sd2_dir: Path, inputs: Path, tmp_path: Path, capsys
) -> None:
    import torch

    if message is None and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    empty = tmp_path / "empty"
    empty.mkdir()
    names = {
        "missing": str(tmp_path / "nope"),
        "empty": str(empty),
        "broken": str(inputs / "broken.png"),
        "sd2": str(tiny_sd2_dir),
    }
    given = [a.format(**names) for a in args]
    base = {"--model": str(tiny_sd_dir), "--image": str(inputs), "--steps": str(STEPS)}
    for key, value in zip(given[::2], given[1::2], strict=True):
        base[key] = value
    argv = [x for kv in base.items() for x in kv]
    out = tmp_path / "out"
    assert _run(*argv, "--prompt", PROMPT, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("bksdm img2img: error:")
    assert (message or "CUDA is not available") in err
    assert not out.exists() or not any(out.iterdir())


def test_a_folder_of_only_unreadable_images_fails(tiny_sd_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    (folder / "b.jpg").write_bytes(b"")
    args = ["--model", str(tiny_sd_dir), "--image", str(folder), "--prompt", PROMPT, "--steps", str(STEPS)]
    assert _run(*args, "--out", str(tmp_path / "out")) == 2
    assert "none of the 2 image files could be read" in capsys.readouterr().err


# --- what img2img is for: the bundled shapes teacher ----------------------------------------------------------

_SCENES = [Scene("circle", "red", "big", "top left"), Scene("square", "green", "big", "bottom right")]
_SCENES += [Scene("triangle", "yellow", "big", "top right"), Scene("circle", "blue", "big", "bottom left")]


def _other(values: tuple[str, ...], value: str) -> str:
    return values[(values.index(value) + 1) % len(values)]


def _translate_scenes(
    strength: float, change: str, *, steps: int | None = None, guidance: float | None = None
) -> tuple[list[Scene], list[Scene], list[Scene], list[list[int]]]:
    """Render each scene, ask for it with one attribute changed, and read the result with the classifier.

    Steps and guidance default to the teacher's recommended settings (25 PNDM steps, guidance 3). Also returns,
    per image, the timesteps the U-Net was called at (one call per timestep: guidance batches both prompts).
    """
    from bksdm.world.classifier import load_classifier, predict
    from bksdm.world.shapes import render
    from bksdm.world.teacher import recommended_settings

    settings = recommended_settings()
    steps = settings["num_inference_steps"] if steps is None else steps
    guidance = settings["guidance_scale"] if guidance is None else guidance
    pipe = img2img_pipeline(TEACHER_DIR)
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(int((args[1] if len(args) > 1 else kwargs["timestep"]).max())),
        with_kwargs=True,
    )
    images = [render(scene, np.random.default_rng(i)) for i, scene in enumerate(_SCENES)]
    values = {"color": tuple(COLORS), "shape": SHAPES}[change]
    targets = [Scene(**{**vars(s), change: _other(values, getattr(s, change))}) for s in _SCENES]
    out, timesteps = [], []
    for i, (image, target) in enumerate(zip(images, targets, strict=True)):
        calls.clear()
        out += translate(
            pipe, [image], target.caption, [image_seed(0, i)], strength=strength, steps=steps, guidance_scale=guidance
        )
        timesteps.append(list(calls))
    return _SCENES, targets, predict(load_classifier(), out), timesteps


@pytest.mark.parametrize("change", ["color", "shape"])
def test_high_strength_draws_what_the_prompt_asks(change: str) -> None:
    originals, targets, read, _ = _translate_scenes(0.9, change)
    hits = [getattr(r, change) == getattr(t, change) for r, t in zip(read, targets, strict=True)]
    assert sum(hits) >= 3, f"{change}: asked {[getattr(t, change) for t in targets]}, read {read}"


# SDEdit keeps the input where the noise it adds is small next to the latent, and without classifier-free
# guidance (measured 2026-11, README "Image-to-image"). The teacher's latents have std 0.35 (SD's: 1), so
# SNR(t) = 0.35^2 abar/(1 - abar) is 8x below SD's at every t: strength 0.2 of 25 PNDM steps starts at t=201
# (SNR 0.37, SD's at t=504), where the prompt decides, and the smallest strength of 25 steps (0.04) starts at
# t=41 (SNR 3.0). Its captions fix colour and shape, so a contradicting prompt is out of distribution at every t,
# and guidance 3 amplifies that. On 24 scenes with exact samplers (Euler; DDIM without clipping) colour is kept
# in 24/24 from t=11 at guidance 1, in 6-11/24 from t=11 at guidance 3 and in 11-17/24 from t=39-41 at guidance 1.
# So "low" is strength 0.01 of 100 steps, one step from t=11 (SNR 11.6: noise std 0.29x the signal's), at
# guidance 1; "high" is 0.9 of the same 100 steps at the same guidance (24/24 of the prompt's colour and shape).
_LOW, _HIGH, _STEPS, _GUIDANCE = 0.01, 0.9, 100, 1.0


@pytest.mark.parametrize("change", ["color", "shape"])
def test_low_strength_keeps_the_input_and_high_strength_follows_the_prompt(change: str) -> None:
    check_strength(_LOW, _STEPS)  # at least one denoising step: int(100 x 0.01) = 1
    originals, targets, low, timesteps = _translate_scenes(_LOW, change, steps=_STEPS, guidance=_GUIDANCE)
    # The input really was noised and denoised: the U-Net ran from t=11, not just a no-op at the last timestep.
    assert all(t[0] >= 11 and len(t) >= 2 for t in timesteps), timesteps
    kept = [getattr(r, change) == getattr(o, change) for r, o in zip(low, originals, strict=True)]
    assert all(kept), f"{change} at strength {_LOW}: input {[getattr(o, change) for o in originals]}, read {low}"

    _, _, high, timesteps = _translate_scenes(_HIGH, change, steps=_STEPS, guidance=_GUIDANCE)
    assert all(t[0] >= 881 for t in timesteps), [t[0] for t in timesteps]
    new = [getattr(r, change) == getattr(t, change) for r, t in zip(high, targets, strict=True)]
    assert all(new), f"{change} at strength {_HIGH}: asked {[getattr(t, change) for t in targets]}, read {high}"
