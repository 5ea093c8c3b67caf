"""``bksdm generate`` and ``bksdm coco-prompts`` on a tiny SD pipeline: images independent of batch size and
process count, resume, manifest, U-Net swap, user errors; the COCO 30K prompt builder and the prompt file reader."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import run_two_processes
from diffusers import StableDiffusionPipeline
from PIL import Image

from bksdm import __version__
from bksdm.cli import main
from bksdm.eval.coco import load_coco_captions, select_captions
from bksdm.eval.generate import generate_images, prompt_seed, resize_image
from bksdm.eval.prompts import PromptFileError, PromptRecord, read_prompts
from bksdm.world.tiny import save_tiny_pipeline

PROMPTS = [
    "a red circle at the top left",
    "a blue square",
    "a small green circle on the right",
    "a yellow square at the bottom",
    "a big red square in the middle",
]
STEPS = "2"


# One torch thread, as the launched processes have (OMP_NUM_THREADS=1): convolution results depend on the thread
# count at the level of float rounding, and some tests compare files byte for byte.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def generate(model: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", STEPS,
                 *extra])  # fmt: skip


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def names(n: int) -> list[str]:
    return [f"{i:06d}.png" for i in range(n)]


@pytest.fixture(scope="module")
def batch1(tiny_sd_dir, prompt_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "batch1"
    assert generate(tiny_sd_dir, prompt_file, out, "--batch-size", "1") == 0
    return out


@pytest.mark.slow
def test_batch_size_and_process_count_do_not_change_the_images(tiny_sd_dir, prompt_file, batch1, tmp_path) -> None:
    # Two processes, one prompt per call: byte for byte the files of one process.
    two = run_two_processes(
        ["-v", "generate", "--model", str(tiny_sd_dir), "--prompts", str(prompt_file), "--out", str(tmp_path / "two"),
         "--steps", STEPS, "--batch-size", "1"],
        timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    assert "on 2 process(es)" in two.stdout
    # Each process made its own share (every other image), not all of them.
    assert "process 0: 3 of 5 missing images" in two.stderr and "process 1: 2 of 5 missing images" in two.stderr
    for name in names(5):
        assert (tmp_path / "two" / name).read_bytes() == (batch1 / name).read_bytes(), name
    assert (tmp_path / "two" / "manifest.jsonl").read_text() == (batch1 / "manifest.jsonl").read_text()
    settings = [json.loads((d / "settings.json").read_text()) for d in (batch1, tmp_path / "two")]
    assert settings[0]["settings"] == settings[1]["settings"]
    assert settings[1]["runs"][0]["num_processes"] == 2

    # Batch 4: the same noise, so the same images up to float rounding of convolutions (oneDNN picks its
    # algorithm by batch shape): at most 1/255 on a few values. Seeding per batch would change every image.
    assert generate(tiny_sd_dir, prompt_file, tmp_path / "b4", "--batch-size", "4") == 0
    for name in names(5):
        diff = np.abs(pixels(tmp_path / "b4" / name) - pixels(batch1 / name))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())
    assert np.abs(pixels(batch1 / "000000.png") - pixels(batch1 / "000001.png")).mean() > 1  # prompts matter

    # And each image is what stock diffusers draws for that prompt with the documented seed.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    for i in (0, 3):
        image = pipe(PROMPTS[i], num_inference_steps=int(STEPS), guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(prompt_seed(0, i))).images[0]  # fmt: skip
        assert np.array_equal(np.asarray(image), pixels(batch1 / names(5)[i]))


@pytest.mark.slow
def test_the_batch_size_does_not_reach_the_metrics() -> None:
    """The rounding that batching changes is far below what an evaluation reads. On the bundled teacher at its
    settings, 24 scenes (every shape, colour, size and position) at batch 8 vs batch 1: the classifier reads the
    same four attributes in every image, and the shapes Fréchet distance agrees to 0.1%."""
    from bksdm.world.classifier import load_classifier, predict, reference_statistics, shapes_frechet_distance
    from bksdm.world.shapes import all_scenes
    from bksdm.world.teacher import load_teacher, recommended_settings

    pipe = load_teacher()
    pipe.set_progress_bar_config(disable=True)
    settings = recommended_settings()
    prompts = [scene.caption for scene in all_scenes()[::4]]
    seeds = [prompt_seed(0, i) for i in range(len(prompts))]
    kwargs = {"steps": settings["num_inference_steps"], "guidance_scale": settings["guidance_scale"]}
    one, eight = (generate_images(pipe, prompts, seeds, batch_size=b, **kwargs) for b in (1, 8))
    diff = np.abs(np.stack([np.asarray(a, np.int16) for a in one]) - np.stack([np.asarray(b, np.int16) for b in eight]))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    classifier = load_classifier()
    assert predict(classifier, one) == predict(classifier, eight)
    reference = reference_statistics(classifier)
    fd_one, fd_eight = (shapes_frechet_distance(classifier, images, reference) for images in (one, eight))
    assert fd_eight == pytest.approx(fd_one, rel=1e-3)


def test_resume_skips_finished_images_and_remakes_missing_ones(tiny_sd_dir, prompt_file, batch1, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(batch1, out)
    before = {n: (out / n).stat().st_mtime_ns for n in names(5)}
    assert generate(tiny_sd_dir, prompt_file, out, "--batch-size", "3") == 0
    assert "(0 generated, 5 already there" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in names(5)} == before

    # A deleted image and the half-written temporary file of a killed run: the image is made again, identical
    # (same seed, batch of one as before), and the leftover is neither counted as done nor kept.
    (out / "000002.png").unlink()
    (out / ".000002.png.partial").write_bytes((batch1 / "000002.png").read_bytes()[:100])
    assert generate(tiny_sd_dir, prompt_file, out, "--batch-size", "1") == 0
    assert "(1 generated, 4 already there" in capsys.readouterr().out
    assert (out / "000002.png").read_bytes() == (batch1 / "000002.png").read_bytes()
    assert not list(out.glob(".*.partial"))
    runs = json.loads((out / "settings.json").read_text())["runs"]
    assert [(r["generated"], r["skipped"]) for r in runs] == [(5, 0), (0, 5), (1, 4)]

    # A longer prompt file that starts with the same prompts extends the folder.
    longer = tmp_path / "longer.txt"
    longer.write_text("\n".join([*PROMPTS, "a blue circle", "a green square"]))
    assert generate(tiny_sd_dir, longer, out, "--batch-size", "2") == 0
    assert "7 images" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in names(5) if n != "000002.png"} == {
        n: t for n, t in before.items() if n != "000002.png"
    }
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 7


class _Killed(BaseException):
    """The process dying mid-write (SIGKILL, power): nothing in the command may catch it."""


def test_a_crash_while_writing_leaves_no_image_that_counts_as_done(
    tiny_sd_dir, prompt_file, batch1, tmp_path, monkeypatch
) -> None:
    real_save = Image.Image.save
    calls = []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(Path(fp).name)
        if len(calls) == 3:  # half a file, then the process dies (disk full, SIGKILL, power)
            Path(fp).write_bytes(b"\x89PNG half")
            raise _Killed
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    out = tmp_path / "out"
    with pytest.raises(_Killed):
        generate(tiny_sd_dir, prompt_file, out, "--batch-size", "1")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert calls[2] == ".000002.png.partial"
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    assert generate(tiny_sd_dir, prompt_file, out, "--batch-size", "1") == 0
    for name in names(5):
        assert (out / name).read_bytes() == (batch1 / name).read_bytes()
    assert not list(out.glob(".*"))


def test_other_settings_or_prompts_are_refused(tiny_sd_dir, prompt_file, batch1, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(batch1, out)
    assert generate(tiny_sd_dir, prompt_file, out, "--steps", "3") == 2  # (the later --steps wins)
    err = capsys.readouterr().err
    assert "other settings" in err and "steps: 2 -> 3" in err and "new --out" in err

    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join([PROMPTS[0], "a purple triangle", *PROMPTS[2:]]))
    assert generate(tiny_sd_dir, changed, out) == 2
    err = capsys.readouterr().err
    assert "000001.png was made for the prompt 'a blue square'" in err and "'a purple triangle'" in err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"x")
    assert generate(tiny_sd_dir, prompt_file, foreign) == 2
    assert "not empty and holds no settings.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([*names(5), "manifest.jsonl", "settings.json"])


def test_manifest_settings_resize_and_options(tiny_sd_dir, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"caption": PROMPTS[0], "image_id": 42, "index": "x"}, {"caption": PROMPTS[1], "image_id": 7}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    options = ["--seed", "7", "--resize", "32", "--scheduler", "EulerDiscreteScheduler", "--guidance", "3",
               "--negative-prompt", "a blue square", "--batch-size", "2"]  # fmt: skip
    assert generate(tiny_sd_dir, prompts, out, *options) == 0

    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest == [
        {"index": 0, "prompt": PROMPTS[0], "seed": prompt_seed(7, 0), "file": "000000.png", "image_id": 42,
         "source_index": "x"},
        {"index": 1, "prompt": PROMPTS[1], "seed": prompt_seed(7, 1), "file": "000001.png", "image_id": 7},
    ]  # fmt: skip
    record = json.loads((out / "settings.json").read_text())
    assert record["settings"] == {
        "model": str(tiny_sd_dir.resolve()),
        "unet": None,
        "scheduler": "EulerDiscreteScheduler",
        "steps": 2,
        "guidance_scale": 3.0,
        "height": 128,
        "width": 128,
        "negative_prompt": "a blue square",
        "dtype": "fp32",
        "seed": 7,
        "resize": 32,
        "safety_checker": False,
    }
    assert record["versions"]["bksdm"] == __version__
    assert record["runs"][0]["batch_size"] == 2 and record["runs"][0]["device"].startswith("cpu")

    # The files are the library's images with those options, resized the paper's way.
    from diffusers import EulerDiscreteScheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = generate_images(pipe, PROMPTS[:2], [prompt_seed(7, 0), prompt_seed(7, 1)], steps=2,
                               guidance_scale=3.0, batch_size=2, negative_prompt="a blue square")  # fmt: skip
    for i, image in enumerate(expected):
        assert image.size == (128, 128)
        assert np.array_equal(pixels(out / names(2)[i]), np.asarray(resize_image(image, 32)))
    assert Image.open(out / "000000.png").size == (32, 32)


def test_unet_option_swaps_the_unet(tiny_sd_dir, prompt_file, batch1, tmp_path, capsys) -> None:
    student = save_tiny_pipeline(tmp_path / "student", "sd-v1", seed=1)  # same layout, other weights
    assert generate(tiny_sd_dir, prompt_file, tmp_path / "a", "--unet", str(student), "--batch-size", "1") == 0
    assert generate(tiny_sd_dir, prompt_file, tmp_path / "b", "--unet", str(student / "unet"), "--batch-size", "1") == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.unet = StableDiffusionPipeline.from_pretrained(student).unet
    pipe.set_progress_bar_config(disable=True)
    expected = generate_images(pipe, PROMPTS, [prompt_seed(0, i) for i in range(5)], steps=2, batch_size=1)
    for i, name in enumerate(names(5)):
        assert np.array_equal(pixels(tmp_path / "a" / name), np.asarray(expected[i]))
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert np.abs(pixels(tmp_path / "a" / name) - pixels(batch1 / name)).mean() > 1
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["settings"]["unet"] == str(student.resolve())

    # A U-Net made for another text encoder is refused before any weights are loaded.
    wrong = tmp_path / "wrong_unet"
    shutil.copytree(student / "unet", wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (wrong / "config.json").write_text(json.dumps(config))
    assert generate(tiny_sd_dir, prompt_file, tmp_path / "c", "--unet", str(wrong)) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "cross_attention_dim 48" in err and not (tmp_path / "c").exists()


def test_default_model_is_the_bundled_teacher_with_its_settings(tiny_sd_dir, prompt_file, tmp_path, monkeypatch):
    import bksdm.loading

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd_dir, teacher)  # stands in for the shipped teacher, with its recorded settings
    (teacher / "bksdm_toy.json").write_text(json.dumps({"sampling": {"num_inference_steps": 3, "guidance_scale": 2}}))
    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", teacher)
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompt_file), "--out", str(out), "--batch-size", "5"]) == 0
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert (settings["model"], settings["steps"], settings["guidance_scale"]) == (str(teacher), 3, 2.0)

    monkeypatch.setattr(bksdm.loading, "BUNDLED_TEACHER", tmp_path / "missing")
    assert main(["generate", "--prompts", str(prompt_file), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_generate_folder_takes_a_prompt_list_and_seeds(tiny_sd_dir, tmp_path) -> None:
    """The library job behind ``bksdm generate``, as ``bksdm demo`` calls it: prompts and seeds given in memory."""
    from bksdm.eval.generate import GenerateOptions, generate_folder
    from bksdm.eval.image_folder import GenerateError

    out = tmp_path / "out"
    options = GenerateOptions(prompts=PROMPTS[:2], out=out, model=str(tiny_sd_dir), steps=2, seeds=[5, 9])
    summary = generate_folder(options, progress=False)
    assert (summary.total, summary.generated, summary.skipped, summary.main_process) == (2, 2, 0, True)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(e["prompt"], e["seed"]) for e in manifest] == [(PROMPTS[0], 5), (PROMPTS[1], 9)]
    assert json.loads((out / "settings.json").read_text())["settings"]["seed"] is None
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = generate_images(pipe, PROMPTS[:2], [5, 9], steps=2)
    assert all(np.array_equal(pixels(out / n), np.asarray(e)) for n, e in zip(names(2), expected, strict=True))
    assert generate_folder(options, progress=False).generated == 0  # resumed: nothing to do
    with pytest.raises(GenerateError, match="drawn from seed 5, not 6"):
        generate_folder(GenerateOptions(**{**vars(options), "seeds": [6, 9]}), progress=False)


def test_a_model_folder_that_records_its_settings_samples_with_them(tiny_sd_dir, prompt_file, tmp_path):
    """The rule every sampling command shares (bksdm.sampling.sampling_defaults): a folder's bksdm_toy.json, also
    when the folder is named with --model; the options still win."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    (model / "bksdm_toy.json").write_text(json.dumps({"sampling": {"num_inference_steps": 3, "guidance_scale": 2}}))
    argv = ["generate", "--model", str(model), "--prompts", str(prompt_file), "--batch-size", "5"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance_scale"]) == (3, 2.0)
    assert main([*argv, "--out", str(tmp_path / "b"), "--steps", "2", "--guidance", "1"]) == 0
    settings = json.loads((tmp_path / "b" / "settings.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance_scale"]) == (2, 1.0)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing prompts", "does not exist"),
        ("bad suffix", "unknown suffix '.yaml'"),
        ("csv without prompt column", "names no prompt column"),
        ("coco annotations", "bksdm coco-prompts"),
        ("empty", "holds no prompts"),
        ("missing model", "no-such-model: no such folder"),
        ("bad scheduler", "--scheduler FastScheduler: not a diffusers scheduler"),
        ("missing unet", "--unet"),
    ],
)
def test_user_errors_exit_2_with_a_clear_message(case, message, tiny_sd_dir, prompt_file, tmp_path, capsys) -> None:
    model, prompts, extra = tiny_sd_dir, prompt_file, []
    files = {
        "bad suffix": ("p.yaml", "- a cat\n"),
        "csv without prompt column": ("p.csv", "file_name,label\na.jpg,cat\n"),
        "coco annotations": ("p.json", json.dumps({"images": [], "annotations": []})),
        "empty": ("p.txt", "\n  \n"),
    }
    if case in files:
        prompts = tmp_path / files[case][0]
        prompts.write_text(files[case][1])
    elif case == "missing prompts":
        prompts = tmp_path / "nope.txt"
    elif case == "missing model":
        model = tmp_path / "no-such-model"
    elif case == "bad scheduler":
        extra = ["--scheduler", "FastScheduler"]
    elif case == "missing unet":
        extra = ["--unet", str(tmp_path / "no-such-unet")]
    assert generate(model, prompts, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("bksdm generate: error:") and message in err, err
    assert not (tmp_path / "out").exists()


# --- the MS-COCO 30K prompt set ------------------------------------------------------------------------------


def coco_captions(path: Path, n_images: int = 12, seed: int = 0) -> Path:
    """A captions_val2014.json in miniature: 1-5 captions per image (stray whitespace as in COCO), one image
    without captions, shuffled annotations."""
    rng = random.Random(seed)
    images = [{"id": 100 + 7 * i, "file_name": f"COCO_val2014_{100 + 7 * i:012d}.jpg"} for i in range(n_images)]
    annotations = []
    for img in images[:-1]:
        for k in range(1 + img["id"] % 5):
            annotations.append(
                {"id": 1000 * img["id"] + k, "image_id": img["id"], "caption": f" photo {img['id']}-{k}\n"}
            )
    rng.shuffle(annotations)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def test_coco_selection_is_reproducible_one_caption_per_image(tmp_path) -> None:
    data = load_coco_captions(coco_captions(tmp_path / "captions.json"))
    a, b = select_captions(data, 6, seed=0), select_captions(data, 6, seed=0)
    assert a == b and len(a) == 6
    ids = [r["image_id"] for r in a]
    assert len(set(ids)) == 6
    for r in a:
        assert r["caption"].startswith(f"photo {r['image_id']}-")  # one of its own captions, whitespace normalised
        assert r["file_name"] == f"COCO_val2014_{r['image_id']:012d}.jpg"
        assert r["annotation_id"] == 1000 * r["image_id"] + int(r["caption"].rsplit("-", 1)[1])
    assert select_captions(data, 6, seed=1) != a
    # A smaller set is a prefix of a larger one, and an image's caption does not depend on the count.
    assert select_captions(data, 11, seed=0)[:6] == a
    # The file's order does not matter.
    shuffled = dict(data, images=data["images"][::-1], annotations=data["annotations"][::-1])
    assert select_captions(shuffled, 6, seed=0) == a
    # Every caption of an image gets chosen under some seed (image 114 has 5).
    chosen = {next(r["caption"] for r in select_captions(data, None, s) if r["image_id"] == 114) for s in range(40)}
    assert chosen == {f"photo 114-{k}" for k in range(5)}


def test_coco_count_handling(tmp_path) -> None:
    data = load_coco_captions(coco_captions(tmp_path / "captions.json"))
    everything = select_captions(data, None, seed=3)
    assert len(everything) == 11  # the image without captions is never chosen
    assert sorted(r["image_id"] for r in everything) == sorted(img["id"] for img in data["images"][:-1])
    with pytest.raises(PromptFileError, match="only 11 images with captions"):
        select_captions(data, 12)
    with pytest.raises(PromptFileError, match="at least 1"):
        select_captions(data, 0)


def test_coco_prompts_cli_writes_a_prompt_file_generate_reads(tmp_path, capsys) -> None:
    captions = coco_captions(tmp_path / "captions_val2014.json")
    out = tmp_path / "prompts.jsonl"
    assert main(["coco-prompts", "--captions", str(captions), "--out", str(out), "--count", "5", "--seed", "2"]) == 0
    assert "wrote 5 prompts" in capsys.readouterr().out
    expected = select_captions(load_coco_captions(captions), 5, seed=2)
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected
    assert read_prompts(out) == [
        PromptRecord(r["caption"], {"image_id": r["image_id"], "file_name": r["file_name"],
                                    "annotation_id": r["annotation_id"]})
        for r in expected
    ]  # fmt: skip
    csv_out = tmp_path / "metadata.csv"
    assert main(["coco-prompts", "--captions", str(captions), "--out", str(csv_out), "--count", "all"]) == 0
    assert csv_out.read_text().splitlines()[0] == "file_name,caption,image_id,annotation_id"
    assert [r.prompt for r in read_prompts(csv_out)] == [
        r["caption"] for r in select_captions(load_coco_captions(captions), None)
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        (
            json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}),
            "no image_id/caption",
        ),
        (json.dumps([1, 2]), "not a COCO annotations file"),
    ],
)
def test_coco_prompts_bad_files_exit_2(content, message, tmp_path, capsys) -> None:
    captions = tmp_path / "captions.json"
    if content is not None:
        captions.write_text(content)
    assert main(["coco-prompts", "--captions", str(captions), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bksdm coco-prompts: error:") and message in err, err
    assert not (tmp_path / "p.jsonl").exists()


def test_coco_prompts_count_larger_than_the_file_exits_2(tmp_path, capsys) -> None:
    captions = coco_captions(tmp_path / "captions.json")
    assert main(["coco-prompts", "--captions", str(captions), "--out", str(tmp_path / "p.jsonl")]) == 2  # 30000
    assert "asked for 30000 prompts but the captions file has only 11 images" in capsys.readouterr().err
    assert main(["coco-prompts", "--captions", str(captions), "--out", str(tmp_path / "p.jsonl"), "--count", "x"]) == 2
    assert "--count takes a number or 'all'" in capsys.readouterr().err


# --- prompt files --------------------------------------------------------------------------------------------


def test_prompt_file_formats(tmp_path) -> None:
    files = {
        "p.txt": "a cat\n\n  a dog  \n",
        "p.json": json.dumps(["a cat", {"prompt": "a dog", "id": 3}]),
        "q.json": json.dumps({"prompts": ["a cat", "a dog"]}),
        "p.jsonl": json.dumps({"text": "a cat"}) + "\n\n" + json.dumps("a dog") + "\n",
        # The official BK-SDM metadata.csv layout, with a byte-order mark as spreadsheets write it.
        "metadata.csv": '\ufefffile_name,text\nCOCO_val2014_000000000042.jpg,a cat\nb.jpg,"a dog, running"\n',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == [PromptRecord("a cat"), PromptRecord("a dog")]
    assert read_prompts(tmp_path / "p.json") == [PromptRecord("a cat"), PromptRecord("a dog", {"id": 3})]
    assert [r.prompt for r in read_prompts(tmp_path / "q.json")] == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.jsonl") == [PromptRecord("a cat"), PromptRecord("a dog")]
    assert read_prompts(tmp_path / "metadata.csv") == [
        PromptRecord("a cat", {"file_name": "COCO_val2014_000000000042.jpg"}),
        PromptRecord("a dog, running", {"file_name": "b.jpg"}),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.jsonl", '{"prompt": "a cat"}\n{"label": 1}\n', "line 2: no prompt field (fields: label)"),
        ("p.json", json.dumps([{"prompt": ""}]), "item 0: 'prompt' must be a non-empty string"),
        ("p.json", json.dumps({"a": 1}), "expected a JSON list of prompts"),
        ("p.csv", "prompt,x\na cat,1\n,2\n", "line 3: empty 'prompt'"),
        ("p.jsonl", "{oops\n", "not valid JSONL"),
    ],
)
def test_prompt_file_errors_name_the_place(name, text, message, tmp_path) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompts(tmp_path / name)
