"""bksdm evaluate / fid-stats / report: FID, IS and CLIP score through the CLI with small networks saved and loaded
like real ones, pytorch-fid compatibility, clear errors, and the shapes world end to end."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from builders import shapes_folder
from PIL import Image

from bksdm.cli import main
from bksdm.eval.image_sets import paper_resize, read_manifest
from bksdm.eval.inception import InceptionV3, torch_fidelity_input
from bksdm.eval.metrics import FeatureStatistics
from bksdm.eval.reference import load_statistics, save_statistics


def _random_images(folder: Path, count: int, seed: int, size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A narrow FID Inception (1/8 of the channels, random weights and batch-norm statistics), saved as a state dict."""
    torch.manual_seed(0)
    net = InceptionV3(width=1 / 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        net.fc.weight.mul_(300)  # confident predictions, so the Inception Score is far from 1
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def _net(path: Path) -> InceptionV3:
    """The saved network rebuilt by hand (not through bksdm's loader)."""
    net = InceptionV3(width=1 / 8)
    net.load_state_dict(torch.load(path, weights_only=True))
    return net.eval()


@torch.no_grad()
def _pytorch_fid_features(net: InceptionV3, paths: list[Path]) -> np.ndarray:
    """pytorch-fid's feature extraction, written out: ToTensor, bilinear resize to 299, 2x - 1, pool3."""
    feats = []
    for p in sorted(paths):
        x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats.append(net.pool_features(2 * x - 1).numpy())
    return np.concatenate(feats).astype(np.float64)


def _pytorch_fid_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """pytorch-fid's calculate_frechet_distance, written out."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # pytorch-fid passes disp=False, which newer SciPy deprecates
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -------------------------------------------------------------------------------------- FID and friends


@pytest.mark.slow
def test_fid_of_two_folders_equals_pytorch_fid_formula(tmp_path, inception_file, capsys):
    generated = _random_images(tmp_path / "gen", 12, seed=0)
    real = _random_images(tmp_path / "real", 14, seed=1)
    out = tmp_path / "fid.json"
    code, stdout, _ = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--ref-images",
                           str(tmp_path / "real"), "--metrics", "fid", "--inception-weights", str(inception_file),
                           "--batch-size", "5", "--out", str(out),
                           "--save-ref", str(tmp_path / "real.npz"))  # fmt: skip
    assert code == 0 and "FID" in stdout
    result = json.loads(out.read_text())

    net = _net(inception_file)
    a, b = _pytorch_fid_features(net, generated), _pytorch_fid_features(net, real)
    expected = _pytorch_fid_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert result["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["count"] == 12 and result["metrics"]["fid"] > 0

    # The cached reference is pytorch-fid's file format; FID against it is the same number.
    with np.load(tmp_path / "real.npz") as data:
        np.testing.assert_allclose(data["mu"], b.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(data["sigma"], np.cov(b, rowvar=False), rtol=1e-5, atol=1e-7)
    code, _, _ = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "real.npz"),
                      "--metrics", "fid", "--inception-weights", str(inception_file), "--out", str(out))  # fmt: skip
    assert code == 0 and json.loads(out.read_text())["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)


def test_fid_stats_and_pytorch_fid_npz_round_trip(tmp_path, inception_file, capsys):
    _random_images(tmp_path / "real", 6, seed=2, size=40)
    code, stdout, _ = _run(capsys, "fid-stats", str(tmp_path / "real"), "--out", str(tmp_path / "s.npz"),
                           "--inception-weights", str(inception_file), "--resize", "24", "--features")  # fmt: skip
    assert code == 0 and "6 images (256 features)" in stdout
    stats, feats = load_statistics(tmp_path / "s.npz")
    assert stats.count == 6 and feats.shape == (6, 256)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-5)

    # A file as pytorch-fid writes it (only mu and sigma) reads back as it is, and ours has those keys.
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=5), np.cov(rng.normal(size=(20, 5)), rowvar=False)
    np.savez_compressed(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    loaded, none = load_statistics(tmp_path / "pytorch_fid.npz")
    assert none is None and np.array_equal(loaded.mu, mu) and np.array_equal(loaded.sigma, sigma)
    save_statistics(tmp_path / "ours.npz", FeatureStatistics(mu, sigma, 20))
    with np.load(tmp_path / "ours.npz") as data:
        assert np.array_equal(data["mu"][:], mu) and np.array_equal(data["sigma"][:], sigma)


def test_inception_score_and_kid_through_the_cli(tmp_path, inception_file, capsys):
    paths = _random_images(tmp_path / "gen", 12, seed=4, size=24)
    _random_images(tmp_path / "real", 12, seed=5, size=24)
    out = tmp_path / "r.json"
    code, _, _ = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--ref-images", str(tmp_path / "real"),
                      "--metrics", "is,kid", "--is-splits", "3", "--kid-subsets", "4", "--kid-subset-size", "8",
                      "--inception-weights", str(inception_file), "--out", str(out))  # fmt: skip
    assert code == 0
    metrics = json.loads(out.read_text())["metrics"]

    net = _net(inception_file)
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
        logits = (net.pool_features(torch_fidelity_input(pixels)) @ net.fc.weight.T).double()
    logits = logits[torch.from_numpy(np.random.RandomState(2020).permutation(12))]
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    scores = [
        (p[i * 4 : i * 4 + 4] * (log_p[i * 4 : i * 4 + 4] - p[i * 4 : i * 4 + 4].mean(0, keepdim=True).log()))
        .sum(1).mean().exp().item()
        for i in range(3)
    ]  # fmt: skip
    assert metrics["is"] == pytest.approx(np.mean(scores), rel=1e-6)
    assert metrics["is_std"] == pytest.approx(np.std(scores), rel=1e-4, abs=1e-9)
    assert metrics["is"] > 1.0
    assert np.isfinite(metrics["kid"]) and metrics["kid_std"] >= 0


# ------------------------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny Hugging Face CLIPModel + CLIPProcessor saved with save_pretrained, as a real one is downloaded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from bksdm.world.tiny import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_tiny_tokenizer(folder / "tokenizer")
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


def test_clip_score_with_a_saved_hf_clip(tmp_path, clip_folder, capsys):
    from transformers import CLIPModel, CLIPProcessor

    prompts = shapes_folder(tmp_path / "gen", 6, seed=11)
    # Shuffle the manifest's lines: prompts must follow their files, not the line order.
    manifest = (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "gen" / "manifest.jsonl").write_text("\n".join(manifest[::-1]) + "\n")
    out = tmp_path / "clip.json"
    code, stdout, _ = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--metrics", "clip",
                           "--clip-model", f"hf:{clip_folder}", "--batch-size", "4", "--out", str(out))  # fmt: skip
    assert code == 0 and "CLIP score" in stdout
    metrics = json.loads(out.read_text())["metrics"]

    # Independently: the model's own forward gives logit_scale * cosine for every image-text pair.
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    images = [Image.open(tmp_path / "gen" / f"{i:06d}.png").convert("RGB") for i in range(6)]
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        cos = (model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()).double().numpy()
    assert metrics["clip_cosine"] == pytest.approx(cos.mean(), rel=1e-5, abs=1e-7)
    assert metrics["clip_score"] == pytest.approx(max(100 * cos.mean(), 0.0), rel=1e-5, abs=1e-5)

    # A bare folder is taken as a Hugging Face CLIP too.
    code, _, _ = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--metrics", "clip",
                      "--clip-model", str(clip_folder), "--out", str(out))  # fmt: skip
    assert code == 0 and json.loads(out.read_text())["metrics"]["clip_cosine"] == pytest.approx(metrics["clip_cosine"])


# ----------------------------------------------------------------------------------------------- errors


def test_user_errors_exit_2_with_a_clear_message(tmp_path, inception_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded, whatever the machine
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _random_images(tmp_path / "gen", 4, seed=6)
    gen = str(tmp_path / "gen")
    cases = [
        (["--metrics", "fid", "--ref-images", gen, "--inception-weights", str(tmp_path / "missing.pth")],
         "pt_inception-2015-12-05-6726825d.pth"),
        (["--metrics", "fid"], "FID/KID need a reference"),
        (["--metrics", "clip", "--clip-model", "hf:" + str(tmp_path / "noclip")], "need a prompt per image"),
        (["--metrics", "fidd"], "unknown metric(s) fidd"),
        (["--metrics", "is", "--inception-weights", str(inception_file)], "at least 10 images"),
        (["--metrics", "kid", "--ref", str(tmp_path / "nothing.npz")], "nothing.npz not found"),
        (["--manifest", str(tmp_path / "none.jsonl")], "none.jsonl not found"),
    ]  # fmt: skip
    for extra, message in cases:
        code, _, err = _run(capsys, "evaluate", "--images", gen, *extra)
        assert code == 2, extra
        assert message in err, (extra, err)
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere not found" in err

    # KID needs stored features; a mu/sigma-only file says how to make one that has them.
    np.savez_compressed(tmp_path / "ms.npz", mu=np.zeros(256), sigma=np.eye(256))
    code, _, err = _run(capsys, "evaluate", "--images", gen, "--metrics", "kid", "--ref", str(tmp_path / "ms.npz"),
                        "--inception-weights", str(inception_file))  # fmt: skip
    assert code == 2 and "--features" in err

    # Prompts present but no CLIP weights: the message says how to get them.
    shapes_folder(tmp_path / "shapes", 2, seed=1)
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "shapes"), "--metrics", "clip",
                        "--clip-model", "hf:nobody/no-such-clip")  # fmt: skip
    assert code == 2 and "huggingface-cli download nobody/no-such-clip" in err
    try:
        import open_clip  # noqa: F401

        has_open_clip = True
    except ImportError:
        has_open_clip = False
    if not has_open_clip:  # the paper's default OpenCLIP model without the package: what to install
        code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "shapes"), "--metrics", "clip")
        assert code == 2 and "pip install open_clip_torch" in err and "hf:" in err


def test_paper_resize_is_a_bicubic_squash_saved_as_jpeg(tmp_path):
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    # What the official scripts did: img.resize((256, 256)) and save to a .jpg (Pillow's default quality 75).
    image.resize((32, 32), Image.Resampling.BICUBIC).save(tmp_path / "x.jpg")
    expected = np.asarray(Image.open(tmp_path / "x.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(paper_resize(image, 32)), expected)
    no_jpeg = paper_resize(image, 32, jpeg_quality=None)
    assert np.array_equal(np.asarray(no_jpeg), np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC)))
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "L").save(buffer, "PNG")
    assert paper_resize(Image.open(buffer), 8).mode == "RGB"


# --------------------------------------------------------------------------------- the shapes world


def test_shapes_accuracy_counts_attributes_and_whole_prompts() -> None:
    from bksdm.eval.shapes_scores import shapes_accuracy
    from bksdm.world.shapes import Scene

    wanted = ["a small red circle at the top left", "a big blue square at the bottom right"]
    read = [Scene("circle", "red", "small", "top left"), Scene("square", "green", "big", "top left")]
    accuracy = shapes_accuracy(read, wanted)
    assert accuracy.attributes == {"shape": 1.0, "color": 0.5, "size": 1.0, "position": 0.5}
    assert accuracy.prompt == 0.5
    assert list(accuracy.metrics()) == [
        "shapes_shape_accuracy",
        "shapes_color_accuracy",
        "shapes_size_accuracy",
        "shapes_position_accuracy",
        "shapes_prompt_accuracy",
    ]
    with pytest.raises(ValueError, match="one prompt per image"):
        shapes_accuracy(read, wanted[:1])


def test_shapes_world_generate_evaluate_report(tmp_path, capsys):
    """The untrained teacher (SD-v1 layout, random weights) through bksdm generate -> evaluate -> report, beside
    renderings of the same prompts; the figures equal the shapes classifier's own functions."""
    from bksdm.eval.shapes_scores import score_shapes
    from bksdm.world import classifier as shapes_classifier
    from bksdm.world.shapes import parse_caption, render
    from bksdm.world.teacher import build_untrained_teacher

    teacher = tmp_path / "teacher"
    build_untrained_teacher(seed=0).save_pretrained(teacher)
    prompts = ["a small red circle at the top left", "a big blue square at the bottom right",
               "a small green triangle at the top right", "a big yellow circle at the bottom left"]  # fmt: skip
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    gen = tmp_path / "gen"
    code, _, err = _run(capsys, "generate", "--model", str(teacher), "--prompts", str(tmp_path / "prompts.txt"),
                        "--out", str(gen), "--steps", "2", "--guidance", "3", "--batch-size", "4",
                        "--device", "cpu")  # fmt: skip
    assert code == 0, err

    # Renderings of the same prompts, listed with the same seeds, stand for a perfect model.
    records = read_manifest(gen / "manifest.jsonl")
    real = tmp_path / "rendered"
    real.mkdir()
    lines = []
    for r in records:
        render(parse_caption(r.prompt), np.random.default_rng(r.seed)).save(real / r.file.name)
        lines.append(json.dumps({"index": r.index, "prompt": r.prompt, "seed": r.seed, "file": r.file.name}))
    (real / "manifest.jsonl").write_text("\n".join(lines) + "\n")

    for folder in (gen, real):
        # The default metrics for shapes-world prompts: the shapes ones (a smaller reference keeps the test fast).
        code, stdout, err = _run(capsys, "evaluate", "--images", str(folder), "--shapes-reference-count", "300")
        assert code == 0, err
        assert "shapes prompt accuracy" in stdout
    classifier = shapes_classifier.load_classifier()
    reference = shapes_classifier.reference_statistics(classifier, count=300)
    for folder in (gen, real):
        metrics = json.loads((folder / "evaluation.json").read_text())["metrics"]
        images = [Image.open(r.file).convert("RGB") for r in read_manifest(folder / "manifest.jsonl")]
        assert metrics["shapes_prompt_accuracy"] == shapes_classifier.prompt_accuracy(classifier, images, prompts)
        assert metrics["shapes_frechet_distance"] == pytest.approx(
            shapes_classifier.shapes_frechet_distance(classifier, images, reference), rel=1e-9
        )
        in_memory = score_shapes(images, prompts, classifier, reference)  # what bksdm demo calls
        assert {k: v for k, v in in_memory.items() if "accuracy" in k} == {
            k: v for k, v in metrics.items() if "accuracy" in k
        }
        assert in_memory["shapes_frechet_distance"] == pytest.approx(metrics["shapes_frechet_distance"], rel=1e-9)
    assert json.loads((real / "evaluation.json").read_text())["metrics"]["shapes_prompt_accuracy"] == 1.0

    out = tmp_path / "report"
    code, stdout, err = _run(capsys, "report", "--model", f"rendered={real}", "--model", f"untrained teacher={gen}",
                             "--columns", "3", "--out", str(out))  # fmt: skip
    assert code == 0, err
    for name in ("report.md", "report.html", "report.json", "grid.png", "chart.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert (
        report["models"]["untrained teacher"]["metrics"] == json.loads((gen / "evaluation.json").read_text())["metrics"]
    )
    from diffusers import UNet2DConditionModel

    unet_params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(teacher / "unet").parameters())
    assert report["models"]["untrained teacher"]["profile"]["unet_params"] == unet_params
    assert report["models"]["rendered"]["profile"] is None  # no pipeline behind renderings
    assert [c["prompt"] for c in report["grid"]] == [prompts[0], prompts[2], prompts[3]]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 64, 2 * (64 + 14))  # 3 prompts x 2 models, 64 px images, a label band per row
    text = (out / "report.md").read_text()
    assert "| rendered |" in text and "| untrained teacher |" in text and "prompt accuracy" in text
    assert "<table>" in (out / "report.html").read_text()

    code, _, err = _run(capsys, "report", "--model", f"a={tmp_path / 'nothing'}", "--out", str(out))
    assert code == 2 and "no such folder or file" in err
    code, _, err = _run(capsys, "report", "--model", "novalue", "--out", str(out))
    assert code == 2 and "expected NAME=PATH" in err
