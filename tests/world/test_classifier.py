"""The shipped shapes classifier reads real images right, and its two metrics behave like metrics.

Everything runs on the shipped weights and freshly rendered images (under ten seconds on 2 CPU cores).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from bksdm.eval import metrics as M
from bksdm.world import classifier as clf
from bksdm.world.shapes import ATTRIBUTES, IMAGE_SIZE, pairs, to_array

N_HELD_OUT = 500


@pytest.fixture(scope="module")
def model() -> clf.ShapesClassifier:
    return clf.load_classifier()


@pytest.fixture(scope="module")
def held_out() -> tuple[list[Image.Image], list]:
    """500 real images from the held-out seed, never seen in training, with their scenes."""
    drawn = list(pairs(clf.HELD_OUT_SEED, N_HELD_OUT))
    return [image for image, _ in drawn], [scene for _, scene in drawn]


def test_seeds_are_disjoint() -> None:
    assert len({clf.TRAIN_SEED, clf.HELD_OUT_SEED, clf.REFERENCE_SEED}) == 3


def test_shipped_weights_are_tiny_and_documented(model: clf.ShapesClassifier) -> None:
    assert (clf.ASSETS / "model.safetensors").stat().st_size < 1_000_000
    config = json.loads((clf.ASSETS / "config.json").read_text())
    assert config["training"]["command"].startswith("python -m bksdm.world.train_classifier")
    assert config["training"]["train_seed"] == clf.TRAIN_SEED
    assert config["training"]["accuracy"]["all"] >= 0.98
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert [head.out_features for head in model.heads] == [len(v) for v in ATTRIBUTES.values()]


def test_accuracy_on_real_held_out_images(model: clf.ShapesClassifier, held_out) -> None:
    images, scenes = held_out
    accuracy = clf.attribute_accuracy(model, images, scenes)
    assert set(accuracy) == {*ATTRIBUTES, "all"}
    for name, value in accuracy.items():
        assert value >= 0.98, f"{name}: {value:.3f}"


def test_robust_to_mild_blur_and_noise(model: clf.ShapesClassifier, held_out) -> None:
    # What a small diffusion model's decoder produces: softened edges and grain. Perturbed with PIL, not with the
    # training augmentation, so the test does not just replay what the classifier was trained on.
    images, scenes = held_out
    blurred = to_array([image.filter(ImageFilter.GaussianBlur(1.0)) for image in images])
    noisy = np.clip(blurred + np.random.default_rng(0).normal(0, 0.08, blurred.shape).astype(np.float32), -1, 1)
    assert clf.attribute_accuracy(model, noisy, scenes)["all"] >= 0.95


def test_prompt_accuracy_tells_matching_from_shuffled_captions(model: clf.ShapesClassifier, held_out) -> None:
    images, scenes = held_out
    captions = [scene.caption for scene in scenes]
    assert clf.prompt_accuracy(model, images, captions) >= 0.98
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    assert clf.prompt_accuracy(model, images, shuffled) < 0.2
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        clf.prompt_accuracy(model, images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError, match="as many scenes as images"):
        clf.prompt_accuracy(model, images[:2], captions[:1])


def test_predict_accepts_pil_tensors_arrays_and_other_sizes(model: clf.ShapesClassifier) -> None:
    drawn = list(pairs(clf.HELD_OUT_SEED, 16))
    images, scenes = [image for image, _ in drawn], [scene for _, scene in drawn]
    array = to_array(images)  # (16, 3, 64, 64) in [-1, 1]
    from_pil = clf.predict(model, images)
    assert from_pil == clf.predict(model, torch.from_numpy(array))
    assert from_pil == clf.predict(model, array)
    assert sum(p == s for p, s in zip(from_pil, scenes, strict=True)) >= 15
    # A 128-pixel render of the same scenes is resized to 64 inside predict.
    big = [image for image, _ in pairs(clf.HELD_OUT_SEED, 16, size=2 * IMAGE_SIZE)]
    assert sum(p == s for p, s in zip(clf.predict(model, big), scenes, strict=True)) >= 15
    assert clf.predict(model, []) == []
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        clf.predict(model, array[:, 0])


def test_features_shape_and_batching(model: clf.ShapesClassifier) -> None:
    images = [image for image, _ in pairs(clf.HELD_OUT_SEED, 300)]  # more than one internal batch
    feats = clf.features(model, images)
    assert feats.shape == (300, model.config.feature_dim)
    assert feats.dtype == np.float64
    np.testing.assert_allclose(clf.features(model, images[260:]), feats[260:], rtol=1e-5, atol=1e-6)


def test_frechet_distance_equals_direct_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(0.5, 1.5, size=(300, 8)) @ rng.normal(size=(8, 8))
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # sqrt(S_a) S_b sqrt(S_a) is symmetric PSD and has the same eigenvalues as S_a S_b: an independent route.
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0, None)).sum()
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root
    assert M.fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    assert M.fid_from_features(a, a) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_ranks_real_above_blank_and_noise(model: clf.ShapesClassifier, held_out) -> None:
    images, _ = held_out
    real = clf.features(model, images)
    other_real = clf.features(model, [image for image, _ in pairs(clf.REFERENCE_SEED, N_HELD_OUT)])
    blank = clf.features(model, np.zeros((N_HELD_OUT, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
    noise = clf.features(model, np.random.default_rng(0).uniform(-1, 1, (N_HELD_OUT, 3, IMAGE_SIZE, IMAGE_SIZE)))
    assert M.fid_from_features(real, real) == pytest.approx(0, abs=1e-6 * np.trace(np.cov(real, rowvar=False)))
    real_vs_real = M.fid_from_features(real, other_real)
    assert real_vs_real > 0
    assert M.fid_from_features(real, blank) > 10 * real_vs_real
    assert M.fid_from_features(real, noise) > 10 * real_vs_real


def test_reference_statistics_are_deterministic(model: clf.ShapesClassifier, held_out) -> None:
    reference = clf.reference_statistics(model, count=200)
    mu, sigma = reference.mu, reference.sigma
    again = clf.reference_statistics(model, count=200)
    mu2, sigma2 = again.mu, again.sigma
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert mu.shape == (model.config.feature_dim,)
    assert sigma.shape == (model.config.feature_dim,) * 2
    images, _ = held_out
    # The same comparison through the convenience wrapper and by hand.
    assert clf.shapes_frechet_distance(model, images, reference) == pytest.approx(
        M.frechet_distance(M.feature_statistics(clf.features(model, images)), M.FeatureStatistics(mu, sigma))
    )


def test_load_classifier_rejects_other_attributes(tmp_path) -> None:
    config = json.loads((clf.ASSETS / "config.json").read_text())
    config["attributes"]["color"] = ["red", "green"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((clf.ASSETS / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="trained for attributes"):
        clf.load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        clf.load_classifier(tmp_path / "missing")
