"""Image-quality metrics on features, logits and embeddings: FID, KID, Inception Score, CLIP score. Pure.

Every function here takes arrays that a network already produced (Inception-v3 pool features or logits, CLIP
embeddings, the shapes classifier's features) and returns numbers; the networks and the files live in
:mod:`bksdm.eval.inception`, :mod:`bksdm.eval.clip_models` and :mod:`bksdm.eval.evaluate`. The definitions follow the
implementations the BK-SDM paper reports with (REFERENCE.md, "Evaluation protocol"):

- **FID**: pytorch-fid's ``calculate_frechet_distance`` -- ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))``
  with ``scipy.linalg.sqrtm``, an ``eps`` offset on both diagonals when the product is singular, and an error
  when the root has a large imaginary part. Statistics are the features' mean and ``np.cov(rowvar=False)``, so
  a pytorch-fid ``.npz`` (keys ``mu`` and ``sigma``) can be compared with ours as it is.
- **Inception Score**: torch-fidelity's -- softmax of the (bias-free) logits, samples shuffled with a fixed
  seed, ``splits`` chunks, ``exp(E_x KL(p(y|x) || p(y)))`` per chunk, mean and standard deviation over chunks.
- **KID**: torch-fidelity's -- unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` over
  ``subsets`` random subsets of ``subset_size`` samples from each side.
- **CLIP score**: torchmetrics' ``max(100 * mean cos(E_image, E_text), 0)``; the paper prints the plain mean
  cosine (e.g. 0.2958), which :func:`clip_score` returns too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = [
    "ClipScore",
    "FeatureStatistics",
    "InceptionScore",
    "KernelDistance",
    "clip_score",
    "cosine_similarities",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
]


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) of a set of features: all FID needs of a set.

    ``count`` is the number of samples they came from (0 when unknown, e.g. for published statistics).
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0

    def __post_init__(self) -> None:
        mu, sigma = np.atleast_1d(self.mu), np.atleast_2d(self.sigma)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"statistics need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return len(self.mu)


@dataclass(frozen=True)
class InceptionScore:
    """Inception Score: mean and standard deviation over the splits."""

    mean: float
    std: float
    splits: int


@dataclass(frozen=True)
class KernelDistance:
    """KID: mean and standard deviation of MMD^2 over the random subsets."""

    mean: float
    std: float
    subsets: int
    subset_size: int


@dataclass(frozen=True)
class ClipScore:
    """CLIP score two ways: torchmetrics' (``score``, 0-100) and the paper's plain mean cosine (``cosine``)."""

    score: float
    cosine: float
    count: int


def _as_features(feats: np.ndarray, name: str = "features") -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"{name}: need an (N >= 2, D) array, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return feats


def feature_statistics(feats: np.ndarray) -> FeatureStatistics:
    """Mean and covariance (``np.cov``, N - 1 in the denominator, as pytorch-fid) of features (N, D) in float64."""
    feats = _as_features(feats)
    return FeatureStatistics(feats.mean(axis=0), np.cov(feats, rowvar=False), len(feats))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians N(a.mu, a.sigma) and N(b.mu, b.sigma), as pytorch-fid computes it.

    Args:
        a, b: Feature statistics of the two sets.
        eps: Added to both covariance diagonals when ``sqrtm(a.sigma @ b.sigma)`` is not finite (a singular
            product: fewer samples than dimensions, identical images, dead channels).

    Returns:
        ``||mu_a - mu_b||^2 + Tr(sigma_a) + Tr(sigma_b) - 2 Tr(sqrtm(sigma_a sigma_b))``.

    Raises:
        ValueError: The statistics differ in dimension, or the square root has an imaginary component larger
            than 1e-3 on its diagonal (the covariances are not valid ones).
    """
    if a.dim != b.dim:
        raise ValueError(f"statistics of different dimension: {a.dim} vs {b.dim} (different feature networks?)")
    diff = a.mu - b.mu
    with warnings.catch_warnings():
        # pytorch-fid calls sqrtm(disp=False): a singular product is expected and handled just below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(a.sigma.dot(b.sigma))
    if not np.isfinite(covmean).all():
        offset = np.eye(a.dim) * eps
        covmean = scipy.linalg.sqrtm((a.sigma + offset).dot(b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(sigma_a sigma_b)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D): :func:`frechet_distance` of their statistics."""
    return frechet_distance(feature_statistics(feats_a), feature_statistics(feats_b), eps=eps)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(
    logits: np.ndarray,
    splits: int = 10,
    *,
    from_probabilities: bool = False,
    shuffle_seed: int | None = 2020,
) -> InceptionScore:
    """Inception Score (Salimans et al. 2016) of class logits or probabilities (N, C).

    Per split ``k``: ``exp(mean_x KL(p(y|x) || p_k(y)))`` with ``p_k(y)`` the split's mean prediction. As in
    torch-fidelity, the samples are first shuffled with ``np.random.RandomState(shuffle_seed)`` and split at
    ``i * N // splits``, and the logits are torch-fidelity's "logits_unbiased" (the final layer without its
    bias) when they come from :class:`bksdm.eval.inception.InceptionV3`.

    Args:
        logits: Logits (default) or probabilities (``from_probabilities=True``), one row per image.
        splits: Number of chunks (10 in the standard definition).
        from_probabilities: Rows are already probabilities (each sums to 1).
        shuffle_seed: Seed of the shuffle before splitting; ``None`` keeps the given order.

    Raises:
        ValueError: Not a 2-D array, fewer samples than splits, or probabilities that are not distributions.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or splits < 1 or len(x) < splits:
        raise ValueError(f"need an (N, C) array with N >= splits >= 1, got shape {x.shape} and splits={splits}")
    if shuffle_seed is not None:
        x = x[np.random.RandomState(shuffle_seed).permutation(len(x))]
    if from_probabilities:
        if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probabilities must be non-negative and each row must sum to 1")
        with np.errstate(divide="ignore"):
            log_p = np.log(x)
        p = x
    else:
        log_p = _log_softmax(x)
        p = np.exp(log_p)
    n = len(x)
    scores = []
    for i in range(splits):
        part, log_part = p[i * n // splits : (i + 1) * n // splits], log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = np.log(part.mean(axis=0, keepdims=True))
        # 0 * log 0 counts as 0 (a class an image gives no probability adds nothing to its KL).
        with np.errstate(invalid="ignore"):
            kl = np.where(part > 0, part * (log_part - log_marginal), 0.0).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), splits)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate with the kernel ``k(u, v) = (u.v / d + 1)^3`` (KID's, Binkowski et al. 2018)."""
    m, d = x.shape

    def kernel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u @ v.T / d + 1.0) ** 3

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
) -> KernelDistance:
    """Kernel Inception Distance between two feature sets, torch-fidelity's definition and defaults.

    Each of ``subsets`` rounds draws ``subset_size`` samples without replacement from each side (one
    ``np.random.RandomState(seed)`` for all draws, a then b) and takes the unbiased MMD^2.

    Raises:
        ValueError: A side has fewer than ``subset_size`` samples (lower ``subset_size``), or the dimensions differ.
    """
    a, b = _as_features(feats_a, "features a"), _as_features(feats_b, "features b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features of different dimension: {a.shape[1]} vs {b.shape[1]}")
    if subset_size < 2 or subsets < 1 or min(len(a), len(b)) < subset_size:
        raise ValueError(
            f"KID subsets of {subset_size} samples need at least that many on each side (have {len(a)} and "
            f"{len(b)}): lower the subset size (--kid-subset-size)"
        )
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), subset_size, replace=False)]
        y = b[rng.choice(len(b), subset_size, replace=False)]
        values.append(_mmd2_unbiased(x, y))
    return KernelDistance(float(np.mean(values)), float(np.std(values)), subsets, subset_size)


def cosine_similarities(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (N,) of paired image and text embeddings (N, D)."""
    a, b = np.asarray(image_embeds, dtype=np.float64), np.asarray(text_embeds, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need paired (N, D) embeddings, got {a.shape} and {b.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def clip_score(cosines: np.ndarray) -> ClipScore:
    """CLIP score from per-pair cosines: torchmetrics' ``max(100 * mean, 0)`` and the paper's plain mean.

    Raises:
        ValueError: No cosines, or values outside [-1, 1].
    """
    c = np.asarray(cosines, dtype=np.float64).ravel()
    if c.size == 0 or (np.abs(c) > 1 + 1e-6).any():
        raise ValueError(f"need at least one cosine similarity in [-1, 1], got {c.size} values")
    mean = float(c.mean())
    return ClipScore(score=max(100.0 * mean, 0.0), cosine=mean, count=int(c.size))
