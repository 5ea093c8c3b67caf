"""Metric arithmetic (bksdm.eval.metrics) against direct formulas, and the FID Inception network (eval.inception)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from bksdm.eval import metrics as M
from bksdm.eval.inception import (
    FID_WEIGHTS_URL,
    WEIGHT_FILES,
    InceptionV3,
    InceptionWeightsNotFoundError,
    load_inception,
    pytorch_fid_input,
    resize_bilinear_tf1,
    torch_fidelity_input,
)


def _features(seed: int, n: int = 300, d: int = 12, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + shift


# ------------------------------------------------------------------------------------------------ FID


def test_fid_equals_direct_scipy_frechet_distance():
    a, b = _features(0), _features(1, shift=0.5)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real))
    # A second, independent route: Tr sqrtm(S_a S_b) = sum of sqrt of the eigenvalues of S_a S_b.
    eig = np.sum(np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(complex)).real)
    via_eigenvalues = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * eig)

    ours = M.fid_from_features(a, b)
    assert ours == pytest.approx(direct, rel=1e-6)
    assert ours == pytest.approx(via_eigenvalues, rel=1e-6)
    assert ours > 1.0  # the shift is really measured
    assert M.frechet_distance(M.feature_statistics(a), M.feature_statistics(a)) == pytest.approx(0.0, abs=1e-8)


def test_fid_singular_product_uses_the_eps_offset():
    # 5 samples in 12 dimensions: both covariances have rank 4, their product is singular.
    a, b = _features(2, n=5), _features(3, n=5)
    sa, sb = M.feature_statistics(a), M.feature_statistics(b)
    value = M.frechet_distance(sa, sb)
    assert np.isfinite(value)
    offset = np.eye(12) * 1e-6
    root = scipy.linalg.sqrtm((sa.sigma + offset) @ (sb.sigma + offset)).real
    plain = scipy.linalg.sqrtm(sa.sigma @ sb.sigma)
    expected_root = root if not np.isfinite(plain).all() else plain.real
    expected = float(np.sum((sa.mu - sb.mu) ** 2) + np.trace(sa.sigma + sb.sigma - 2 * expected_root))
    assert value == pytest.approx(expected, rel=1e-6)


def test_fid_rejects_invalid_statistics():
    mu = np.zeros(2)
    with pytest.raises(ValueError, match="imaginary component"):
        M.frechet_distance(M.FeatureStatistics(mu, np.diag([1.0, -1.0])), M.FeatureStatistics(mu, np.eye(2)))
    with pytest.raises(ValueError, match="different dimension"):
        M.frechet_distance(M.FeatureStatistics(mu, np.eye(2)), M.FeatureStatistics(np.zeros(3), np.eye(3)))
    with pytest.raises(ValueError, match="mu \\(D,\\) and sigma \\(D, D\\)"):
        M.FeatureStatistics(mu, np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        M.feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))


# ------------------------------------------------------------------------------------------------- IS


def _is_direct(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """torch-fidelity's recipe, written out: shuffle, softmax, per-split exp(mean KL(p || mean p))."""
    x = torch.from_numpy(logits[np.random.RandomState(seed).permutation(len(logits))]).double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    n, scores = len(x), []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)
        scores.append((p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_the_definition():
    logits = np.random.default_rng(4).normal(scale=3.0, size=(103, 20))
    score = M.inception_score(logits, splits=10)
    mean, std = _is_direct(logits, 10, 2020)
    assert score.mean == pytest.approx(mean, rel=1e-10)
    assert score.std == pytest.approx(std, rel=1e-8)
    assert 1.0 < score.mean < 20.0


def test_inception_score_known_values():
    # Confident and evenly spread over 10 classes: IS is the number of classes; all alike: IS is 1.
    one_hot = np.eye(10)[np.arange(100) % 10]
    assert M.inception_score(one_hot, splits=1, from_probabilities=True).mean == pytest.approx(10.0)
    same = np.tile(np.full(10, 0.1), (50, 1))
    assert M.inception_score(same, splits=5, from_probabilities=True).mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        M.inception_score(np.ones((20, 3)), splits=2, from_probabilities=True)
    with pytest.raises(ValueError, match="N >= splits"):
        M.inception_score(np.ones((5, 3)), splits=10)


# ------------------------------------------------------------------------------------------------ KID


def test_kid_matches_the_unbiased_mmd_with_cubic_kernel():
    a, b = _features(5, n=60, d=8), _features(6, n=50, d=8, shift=0.3)
    kid = M.kernel_inception_distance(a, b, subsets=4, subset_size=30, seed=7)
    rng, values = np.random.RandomState(7), []
    for _ in range(4):
        x, y = a[rng.choice(60, 30, replace=False)], b[rng.choice(50, 30, replace=False)]
        m = 30
        kxx, kyy, kxy = ((x @ x.T) / 8 + 1) ** 3, ((y @ y.T) / 8 + 1) ** 3, ((x @ y.T) / 8 + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(mmd - 2 * kxy.mean())
    assert kid.mean == pytest.approx(np.mean(values), rel=1e-10)
    assert kid.std == pytest.approx(np.std(values), rel=1e-8)
    with pytest.raises(ValueError, match="--kid-subset-size"):
        M.kernel_inception_distance(a, b, subset_size=51)


# ------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_definitions():
    rng = np.random.default_rng(8)
    image = rng.normal(size=(6, 5))
    text = rng.normal(size=(6, 5))
    cos = M.cosine_similarities(image, text)
    expected = [float(i @ t / np.linalg.norm(i) / np.linalg.norm(t)) for i, t in zip(image, text, strict=True)]
    np.testing.assert_allclose(cos, expected, rtol=1e-12)
    same = M.clip_score(M.cosine_similarities(image, 3 * image))
    assert (same.score, same.cosine, same.count) == (pytest.approx(100.0), pytest.approx(1.0), 6)
    opposite = M.clip_score(M.cosine_similarities(image, -image))
    assert opposite.score == 0.0 and opposite.cosine == pytest.approx(-1.0)  # torchmetrics clamps at 0
    mixed = M.clip_score(np.array([0.3, 0.2, -0.1]))
    assert mixed.score == pytest.approx(100 * 0.4 / 3) and mixed.cosine == pytest.approx(0.4 / 3)
    with pytest.raises(ValueError, match="at least one cosine"):
        M.clip_score(np.array([]))


# ------------------------------------------------------------------------------------------- Inception


def test_full_inception_has_the_published_shape():
    with torch.device("meta"):
        net = InceptionV3()
    assert net.feature_dim == 2048 and net.fc.out_features == 1008
    # The parameter count of torch-fidelity's / pytorch-fid's FID Inception (fc to 1008 classes included).
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert sum(1 for _ in net.state_dict()) == 566


def test_tf1_resize_exact_values():
    x = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    # TF1: output i samples input coordinate i * 2 / 4 = 0, 0.5, 1, 1.5; the upper neighbour is clamped.
    out = resize_bilinear_tf1(x.expand(1, 1, 2, 2).contiguous(), 4)
    assert out[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="uint8"):
        torch_fidelity_input(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="float images"):
        pytorch_fid_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def _randomised(net: InceptionV3, seed: int) -> InceptionV3:
    """Random batch-norm statistics too, so every layer matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def test_narrow_inception_round_trips_through_the_weight_loader(tmp_path):
    torch.manual_seed(0)
    net = _randomised(InceptionV3(width=1 / 8), 1)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    loaded = load_inception(path)
    assert loaded.width == pytest.approx(1 / 8) and loaded.feature_dim == 256
    x = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(torch_fidelity_input(x))[1], net(torch_fidelity_input(x))[1])
        assert torch.equal(
            loaded.pool_features(pytorch_fid_input(x / 255)), net.pool_features(pytorch_fid_input(x / 255))
        )
    from safetensors.torch import save_file

    save_file(net.state_dict(), tmp_path / "inception.safetensors")
    assert torch.equal(load_inception(tmp_path / "inception.safetensors").fc.weight, net.fc.weight)


def test_missing_or_wrong_inception_weights_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(InceptionWeightsNotFoundError) as info:
        load_inception(tmp_path / "nothere.pth")
    message = str(info.value)
    assert FID_WEIGHTS_URL in message and "--inception-weights" in message and WEIGHT_FILES[0] in message
    # No explicit path, an empty cache and no network allowed: the message names the cache file to create.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InceptionWeightsNotFoundError, match=str(tmp_path / "torch" / "hub" / "checkpoints")):
        load_inception()
    # A weight file in the cache is found there, under either library's name.
    torch.manual_seed(0)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    net = InceptionV3(width=1 / 16)
    torch.save(net.state_dict(), cache / WEIGHT_FILES[1])
    assert torch.equal(load_inception().fc.weight, net.fc.weight)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3"):
        load_inception(tmp_path / "other.pth")


def _torch_fidelity_extractor():
    """torch-fidelity's Inception module, imported without its package __init__ (which needs torchvision)."""
    tools = Path(__file__).resolve().parents[2] / ".test-tools"  # where ./setup.sh puts it
    spec = importlib.machinery.PathFinder.find_spec("torch_fidelity", [str(tools), *sys.path])
    if spec is None:
        pytest.fail(
            f"torch-fidelity is not installed in {tools}: run ./setup.sh, or "
            f"pip install --no-deps --target {tools} torch-fidelity==0.4.0"
        )
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_inception_matches_torch_fidelity(tmp_path):
    extractor = _torch_fidelity_extractor()
    torch.manual_seed(0)
    ours = _randomised(InceptionV3(), 2)
    path = tmp_path / "weights.pth"
    torch.save(ours.state_dict(), path)
    theirs = extractor("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    x = torch.randint(0, 256, (2, 3, 96, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats, logits = theirs(x)
        our_feats, our_logits = load_inception(path)(torch_fidelity_input(x))
    assert torch.equal(feats, our_feats) and torch.equal(logits, our_logits)
