"""FID's reference side: Inception-v3 outputs of image batches, statistics of a folder of real images, and the
``.npz`` files that keep them (pytorch-fid's format: ``mu``, ``sigma``; ours adds ``count`` and, for KID,
``features``), so published MS-COCO statistics work as they are. ``bksdm fid-stats`` is :func:`fid_stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bksdm.artifacts import atomic_file
from bksdm.eval import metrics as M
from bksdm.eval.image_sets import EvaluationError, check_resize, describe_images, find_images, image_batches

__all__ = ["compute_reference", "fid_stats", "inception_outputs", "load_statistics", "save_statistics"]


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


@torch.no_grad()
def inception_outputs(net, images: list[Image.Image], features: bool, logits: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pool features (pytorch-fid input) and bias-free logits (torch-fidelity input) of a batch."""
    from bksdm.eval.inception import pytorch_fid_input, torch_fidelity_input

    device = next(net.parameters()).device
    pixels = [_uint8(im).unsqueeze(0).to(device) for im in images]  # sizes may differ: resize one by one
    feats = out = np.zeros((len(images), 0))
    if features:
        x = torch.cat([pytorch_fid_input(p.float() / 255) for p in pixels])  # (B, 3, 299, 299)
        feats = net.pool_features(x).double().cpu().numpy()
    if logits:
        x = torch.cat([torch_fidelity_input(p) for p in pixels])
        out = net.logits_unbiased(net.pool_features(x)).double().cpu().numpy()
    return feats, out


def compute_reference(
    images: str | Path,
    net,
    *,
    batch_size: int = 50,
    resize: int | None = None,
    jpeg_quality: int | None = 75,
    progress: bool = False,
) -> tuple[M.FeatureStatistics, np.ndarray]:
    """Inception pool features of a folder of real images and their statistics (FID's reference side).

    Args:
        images: A folder of images (all image files in it, sorted).
        net: The FID Inception (:func:`bksdm.eval.inception.load_inception`).
        batch_size: Images per forward pass.
        resize: Resize each image first with :func:`paper_resize` (256 for the paper's MS-COCO protocol).
        jpeg_quality: JPEG round trip after resizing (the paper's 75; ``None`` skips it).
        progress: Show a progress bar.

    Returns:
        The statistics and the features (N, 2048).
    """
    check_resize(resize)
    records = find_images(images)
    skipped: list[str] = []
    feats = [
        inception_outputs(net, batch, True, False)[0]
        for _, batch in image_batches(records, batch_size, resize, jpeg_quality, progress, skipped)
    ]
    if len(records) - len(skipped) < 2:
        raise EvaluationError(
            f"reference images: {describe_images(images, None, len(records))}"
            + (f", {len(skipped)} of them unreadable ({skipped[0]})" if skipped else "")
            + "; FID statistics need at least 2 readable images"
        )
    features = np.concatenate(feats)
    return M.feature_statistics(features), features


def save_statistics(path: str | Path, stats: M.FeatureStatistics, features: np.ndarray | None = None) -> Path:
    """Write statistics as pytorch-fid does (``np.savez_compressed`` with ``mu`` and ``sigma``), plus ``count``
    and, when given, the ``features`` KID needs. pytorch-fid reads the file as it reads its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"mu": stats.mu, "sigma": stats.sigma, "count": np.asarray(stats.count)}
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    with atomic_file(path) as partial, partial.open("wb") as f:  # a file object: savez would append .npz
        np.savez_compressed(f, **arrays)
    return path


def load_statistics(path: str | Path) -> tuple[M.FeatureStatistics, np.ndarray | None]:
    """Read an ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's, clean-fid's or ours) and ``features`` if present.

    Raises:
        EvaluationError: The file is missing, lacks ``mu``/``sigma``, or holds NaN or infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"reference statistics {path} not found (make them with `bksdm fid-stats`)")
    try:
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise EvaluationError(f"{path} has no 'mu' and 'sigma' arrays (keys: {', '.join(data.files)})")
            stats = M.FeatureStatistics(
                data["mu"].astype(np.float64),
                data["sigma"].astype(np.float64),
                int(data["count"]) if "count" in data else 0,
            )
            features = data["features"].astype(np.float64) if "features" in data else None
    except (OSError, ValueError) as err:
        if isinstance(err, EvaluationError):
            raise
        raise EvaluationError(f"cannot read {path} as statistics: {err}") from None
    arrays = {"mu": stats.mu, "sigma": stats.sigma, **({"features": features} if features is not None else {})}
    for key, array in arrays.items():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise EvaluationError(
                f"{path}: '{key}' holds {bad} NaN or infinite value(s) of {np.size(array)}, so every distance "
                "to it would be NaN: the file is damaged or was computed from broken features; make it again "
                "with `bksdm fid-stats DIR --out STATS.npz`"
            )
    return stats, features


def fid_stats(
    images: str | Path,
    out: str | Path,
    *,
    resize: int | None = None,
    jpeg_quality: int | None = 75,
    features: bool = False,
    batch_size: int = 50,
    device: str = "cpu",
    inception_weights: str | Path | None = None,
    download: bool = True,
    progress: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> M.FeatureStatistics:
    """The job of ``bksdm fid-stats``: Inception statistics of a folder of real images, written to ``out``.

    Args:
        images: The folder of real images.
        out: The ``.npz`` to write.
        resize: Resize the paper's way first (bicubic squash to ``resize`` px, then the JPEG round trip).
        jpeg_quality: The JPEG round trip after ``resize`` (None: none).
        features: Also store the features (KID needs them; large).
        batch_size: Images per forward pass.
        device: Where Inception runs.
        inception_weights: The FID Inception weights file; None: the torch hub cache.
        download: Download the weights into the cache when missing.
        progress: Show a progress bar.
        on_stage: Called with a short message before each slow stage.

    Returns:
        The statistics written.

    Raises:
        EvaluationError: Bad options, too few readable images, or the Inception weights are missing.
    """
    from bksdm.eval.inception import InceptionWeightsNotFoundError, load_inception

    say = on_stage or (lambda message: None)
    if batch_size < 1:
        raise EvaluationError("--batch-size must be at least 1")
    check_resize(resize)
    try:
        say("loading Inception-v3")
        net = load_inception(inception_weights, device=device, download=download)
    except InceptionWeightsNotFoundError as err:  # missing weights: a message, exit 2
        raise EvaluationError(str(err)) from err
    say(f"computing features of {images}")
    stats, feats = compute_reference(
        images, net, batch_size=batch_size, resize=resize, jpeg_quality=jpeg_quality, progress=progress
    )
    save_statistics(out, stats, feats if features else None)
    return stats
