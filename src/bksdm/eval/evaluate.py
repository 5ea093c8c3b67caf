"""The evaluate job: read a folder of generated images (and their prompts), run the scoring networks, return numbers.

One pass over the images feeds every network asked for, a batch at a time (30K images never sit in memory):

- ``fid`` / ``kid``: Inception-v3 pool features the pytorch-fid way, against reference statistics (an ``.npz``
  with ``mu`` and ``sigma``, pytorch-fid's format, so published MS-COCO statistics work as they are) or a
  folder of real images;
- ``is``: Inception-v3 logits the torch-fidelity way (10 splits);
- ``clip``: CLIP score of each image with its prompt (OpenCLIP ViT-g/14 by default, or a Hugging Face CLIP);
- ``shapes``: for the embedded shapes world, prompt accuracy and the Fréchet distance in the shapes
  classifier's feature space (:mod:`bksdm.world.classifier`).

Prompts come from a manifest: JSON lines with at least ``file`` (relative to the manifest's folder) and
``prompt`` -- what ``bksdm generate`` writes as ``manifest.jsonl`` -- looked for in the images folder when
not given. The metric arithmetic lives in :mod:`bksdm.eval.metrics`; this module owns files and networks.
"""

from __future__ import annotations

import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from bksdm.artifacts import IMAGE_SUFFIXES, MANIFEST_FILE, atomic_file
from bksdm.eval import metrics as M

__all__ = [
    "METRICS",
    "EvaluationError",
    "EvaluationOptions",
    "ImageRecord",
    "check_resize",
    "compute_reference",
    "describe_images",
    "evaluate",
    "find_images",
    "format_results",
    "load_statistics",
    "paper_resize",
    "read_manifest",
    "save_statistics",
]

logger = logging.getLogger(__name__)

METRICS = ("fid", "is", "clip", "kid", "shapes")


class EvaluationError(ValueError):
    """A user error in what was given to evaluate (missing folder, no prompts for CLIP, no FID reference, ...)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image to score and, when a manifest gives them, its prompt and seed."""

    file: Path
    prompt: str | None = None
    seed: int | None = None
    index: int | None = None


# --------------------------------------------------------------------------------------- reading images


def read_manifest(path: str | Path) -> list[ImageRecord]:
    """Read a JSON-lines manifest: one object per image with ``file`` and ``prompt`` (``seed``, ``index`` optional).

    ``file`` is relative to the manifest's folder (or absolute). Lines without ``file`` (e.g. a header with the
    generation settings) are skipped.

    Raises:
        EvaluationError: The file is missing, a line is not JSON, or no line names a file.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"manifest {path} not found")
    from bksdm.train.data.text_files import check_utf8_start, utf8_error

    check_utf8_start(path, EvaluationError)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise utf8_error(path, EvaluationError) from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvaluationError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(entry, dict) or "file" not in entry:
            continue
        file, prompt = entry["file"], entry.get("prompt")
        if not isinstance(file, str) or not file.strip():
            raise EvaluationError(f"{path}:{number}: 'file' must be a file name (a string), got {file!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise EvaluationError(f"{path}:{number}: 'prompt' must be a string, got {prompt!r}")
        records.append(
            ImageRecord(
                file=path.parent / file,
                prompt=prompt,
                seed=_optional_int(entry, "seed", path, number),
                index=_optional_int(entry, "index", path, number),
            )
        )
    if not records:
        raise EvaluationError(f"{path}: no line names an image (need JSON lines with 'file' and 'prompt' keys)")
    return records


def _optional_int(entry: dict[str, Any], key: str, path: Path, number: int) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise EvaluationError(f"{path}:{number}: '{key}' must be an integer, got {value!r}")
    return int(value)


def _manifest_of(folder: Path, manifest: str | Path | None) -> Path | None:
    """The manifest :func:`find_images` reads: the one given, else ``manifest.jsonl`` in the folder, if any."""
    if manifest is None and (folder / MANIFEST_FILE).is_file():
        return folder / MANIFEST_FILE
    return Path(manifest) if manifest is not None else None


def _image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted; a symlink that is not a folder counts even when it leads nowhere
    (a loop, a missing target), so that reading it fails and it is named and counted as unreadable."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and _is_image_file(p))


def _is_image_file(path: Path) -> bool:
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def describe_images(images: str | Path, manifest: str | Path | None, count: int) -> str:
    """Where ``count`` images came from, for messages: the manifest (and how many image files the folder holds
    beside it, when that differs) or the folder."""
    folder = Path(images)
    used = _manifest_of(folder, manifest)
    if used is None:
        return f"{folder} holds {count} image(s)"
    text = f"the manifest {used} lists {count} image(s)"
    if folder.is_dir():
        on_disk = len(_image_files(folder))
        if on_disk != count:
            text += (
                f", but {folder} holds {on_disk} image file(s): is the manifest from another or an unfinished "
                f"run? (give --manifest FILE, or move the manifest away to score every image of the folder)"
            )
    return text


def find_images(images: str | Path, manifest: str | Path | None = None) -> list[ImageRecord]:
    """The images to score: a manifest's entries (given, or ``manifest.jsonl`` in the folder), else every image
    file in the folder in sorted order (without prompts).

    Raises:
        EvaluationError: The folder is missing or empty, or a manifest's file is missing.
    """
    folder = Path(images)
    if not folder.is_dir():
        raise EvaluationError(f"image folder {folder} not found")
    manifest = _manifest_of(folder, manifest)
    if manifest is not None:
        records = read_manifest(manifest)
        missing = [r.file for r in records if not _is_image_file(r.file)]  # a broken symlink: read and counted
        if missing:
            raise EvaluationError(
                f"{len(missing)} of the {len(records)} image(s) that the manifest {manifest} lists are missing, e.g. "
                f"{missing[0]} (generation unfinished? run bksdm generate again: it resumes; or give the manifest "
                f"of these images with --manifest)"
            )
        return records
    files = _image_files(folder)
    if not files:
        raise EvaluationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [ImageRecord(file=p) for p in files]


def paper_resize(image: Image.Image, size: int = 256, jpeg_quality: int | None = 75) -> Image.Image:
    """Resize the way the BK-SDM evaluation did: a bicubic squash to ``size`` x ``size`` (no crop), saved as JPEG.

    The official scripts call ``Image.resize((256, 256))`` (Pillow's default filter for RGB/L images is bicubic)
    and save to ``.jpg`` with Pillow's default quality 75, for the real MS-COCO images and the generated ones
    alike; the JPEG round trip is repeated here in memory (``jpeg_quality=None`` skips it).
    """
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        buffer.seek(0)
        image = Image.open(buffer)
        image.load()
    return image.convert("RGB")


def _load(path: Path, resize: int | None, jpeg_quality: int | None) -> Image.Image:
    """Reads one image; raises :class:`UnreadableImage` for a missing, corrupt or oversized one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                image = im if im.mode in ("RGB", "L") else im.convert("RGB")
                image = paper_resize(image, resize, jpeg_quality) if resize else image.convert("RGB")
    except Exception as err:  # PIL raises many types on malformed input (OSError, SyntaxError, bombs, ...)
        raise UnreadableImage(f"{path}: {type(err).__name__}: {err}") from None
    return image


class UnreadableImage(Exception):
    """One image that cannot be scored (skipped and counted, as the data loader skips bad records)."""


def _batches(
    records: Sequence[ImageRecord],
    batch_size: int,
    resize: int | None,
    jpeg_quality: int | None,
    progress: bool,
    skipped: list[str],
) -> Iterator[tuple[list[ImageRecord], list[Image.Image]]]:
    """Batches of readable images with their records; unreadable ones are appended to ``skipped``."""
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        chunk, images = [], []
        for record in records[start : start + batch_size]:
            try:
                images.append(_load(record.file, resize, jpeg_quality))
            except UnreadableImage as err:
                skipped.append(str(err))
                logger.warning("skipped unreadable image %s", err)
                continue
            chunk.append(record)
        if chunk:
            yield chunk, images


# ----------------------------------------------------------------------------------- Inception outputs


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


@torch.no_grad()
def _inception_batch(net, images: list[Image.Image], features: bool, logits: bool) -> tuple[np.ndarray, np.ndarray]:
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
        _inception_batch(net, batch, True, False)[0]
        for _, batch in _batches(records, batch_size, resize, jpeg_quality, progress, skipped)
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


# ---------------------------------------------------------------------------------------- the job


@dataclass
class EvaluationOptions:
    """What ``bksdm evaluate`` computes and with which networks."""

    metrics: Sequence[str] | None = None
    """Subset of :data:`METRICS`; ``None`` chooses: ``shapes`` when every prompt is a shapes-world caption,
    else ``is``, ``clip`` (with prompts) and ``fid`` (with a reference)."""
    reference: str | Path | None = None
    """An ``.npz`` of reference statistics (``mu``, ``sigma``; ``features`` for KID)."""
    ref_images: str | Path | None = None
    """A folder of real images to compute the reference from (instead of ``reference``)."""
    ref_resize: int | None = None
    """Resize the reference images the paper's way first (256 for MS-COCO)."""
    save_reference: str | Path | None = None
    """Cache the reference computed from ``ref_images`` here (with features when KID is asked for)."""
    resize: int | None = None
    """Resize the generated images the paper's way before scoring (if ``bksdm generate`` did not)."""
    jpeg_quality: int | None = 75
    """JPEG round trip after a paper-style resize (``None``: none)."""
    batch_size: int = 50
    device: str = "cpu"
    inception_weights: str | Path | None = None
    download: bool = True
    clip_model: str = "open_clip:ViT-g-14"
    clip_pretrained: str = "laion2b_s34b_b88k"
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    shapes_reference_count: int = 2000
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _choose_metrics(options: EvaluationOptions, prompts: list[str | None]) -> list[str]:
    if options.metrics is not None:
        unknown = [m for m in options.metrics if m not in METRICS]
        if unknown or not options.metrics:
            raise EvaluationError(
                f"unknown metric(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}"
            )
        return list(dict.fromkeys(options.metrics))
    have_prompts = all(p is not None for p in prompts)
    if have_prompts:
        from bksdm.world.shapes import parse_caption

        try:
            for p in prompts:
                parse_caption(p)
            return ["shapes"]
        except ValueError:
            pass
    chosen = ["is"] + (["clip"] if have_prompts else [])
    if options.reference is not None or options.ref_images is not None:
        chosen.insert(0, "fid")
    return chosen


MAX_RESIZE = 4096
"""Largest ``resize`` / ``ref_resize`` (the paper's is 256): a batch of 50 images at 4096 px is 2.5 GB."""


def check_resize(value: Any, option: str = "--resize") -> int | None:
    """A paper-style resize side: None (no resize) or a whole number of pixels from 1 to :data:`MAX_RESIZE`.

    Raises:
        EvaluationError: 0, negative, not a whole number, or too large.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESIZE:
        raise EvaluationError(
            f"{option} {value}: give the side in pixels to resize to, from 1 to {MAX_RESIZE} (the paper's is "
            f"256), or leave {option} out to score the images at their own size"
        )
    return value


def _check(options: EvaluationOptions, chosen: list[str], prompts: list[str | None]) -> None:
    check_resize(options.resize, "--resize")
    check_resize(options.ref_resize, "--ref-resize")
    if {"fid", "kid"} & set(chosen) and options.reference is None and options.ref_images is None:
        raise EvaluationError(
            "FID/KID need a reference: --ref STATS.npz (pytorch-fid format; make one with `bksdm fid-stats "
            "DIR --out STATS.npz`) or --ref-images DIR"
        )
    if options.reference is not None and options.ref_images is not None:
        raise EvaluationError("give either --ref or --ref-images, not both")
    if {"clip", "shapes"} & set(chosen) and any(p is None for p in prompts):
        raise EvaluationError(
            "the CLIP score and the shapes metrics need a prompt per image: give --manifest FILE (JSON lines "
            "with 'file' and 'prompt', as bksdm generate writes manifest.jsonl)"
        )
    if "shapes" in chosen and options.shapes_reference_count < 2:
        raise EvaluationError("--shapes-reference-count must be at least 2")


def _check_count(options: EvaluationOptions, chosen: list[str], count: int, where: str) -> None:
    """Refuses too few images for a metric, saying where the images came from (``where``)."""
    needs = {"fid": 2, "shapes": 2, "clip": 1}
    if "is" in chosen:
        needs["is"] = options.is_splits
    if "kid" in chosen:
        needs["kid"] = 2
    hints = {"is": " (or lower --is-splits)"}
    for metric in chosen:
        if count < needs.get(metric, 1):
            name = {"is": "the Inception Score", "shapes": "the shapes metrics"}.get(metric, metric.upper())
            raise EvaluationError(f"{name} needs at least {needs[metric]} images{hints.get(metric, '')}, but {where}")


def _finite(outputs: np.ndarray, network: str, weights: str | None, chunk: list[ImageRecord]) -> np.ndarray:
    """``outputs``, refused when they hold NaN or infinity: a metric would come out NaN, or (the Inception Score
    ignores NaN probabilities) a plausible-looking 1.0."""
    outputs = np.asarray(outputs)
    if not np.isfinite(outputs).all():
        raise EvaluationError(
            f"{network} gave NaN or infinite outputs for the images from {chunk[0].file} on: its weights"
            + (f" ({weights})" if weights else "")
            + " hold non-finite values (damaged, or saved from a run that diverged); use intact weights"
        )
    return outputs


def evaluate(
    images: str | Path,
    manifest: str | Path | None = None,
    options: EvaluationOptions | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score a folder of generated images.

    Args:
        images: The folder (``bksdm generate``'s output, or any folder of images).
        manifest: JSON lines with ``file`` and ``prompt``; default ``images/manifest.jsonl`` when present.
        options: Metrics and networks (see :class:`EvaluationOptions`).
        on_stage: Called with a short message before each slow stage (network loading, the pass).

    Returns:
        A JSON-ready dict: ``metrics`` (flat name → number), ``count`` (images scored), ``skipped`` (the
        unreadable ones, "path: reason"), ``images``, ``networks`` (what scored
        it: weight files, CLIP model, reference), ``settings`` and ``seconds``.

    Raises:
        EvaluationError: Bad inputs (see the messages).
        InceptionWeightsNotFoundError, ClipNotAvailableError: A network's weights or library are missing.
    """
    options = options or EvaluationOptions()
    say = on_stage or (lambda message: None)
    started = time.perf_counter()
    records = find_images(images, manifest)
    prompts = [r.prompt for r in records]
    chosen = _choose_metrics(options, prompts)
    _check(options, chosen, prompts)
    _check_count(options, chosen, len(records), describe_images(images, manifest, len(records)))
    from bksdm.loading import resolve_device

    device = resolve_device(options.device)
    networks: dict[str, Any] = {}
    results: dict[str, Any] = {}

    # Read the reference and load every network before the long pass, so a missing file fails at once (cheap
    # checks first).
    reference = ref_features = None
    if {"fid", "kid"} & set(chosen) and options.reference is not None:
        reference, ref_features = load_statistics(options.reference)
        networks["reference"] = str(options.reference)
        if "kid" in chosen and ref_features is None:
            raise EvaluationError(
                f"KID needs reference features, and {options.reference} has only mu/sigma: make it with "
                "`bksdm fid-stats DIR --out STATS.npz --features`, or pass --ref-images DIR"
            )
    net = None
    if {"fid", "kid", "is"} & set(chosen):
        from bksdm.eval.inception import load_inception

        say("loading Inception-v3")
        net = load_inception(options.inception_weights, device=device, download=options.download)
        networks["inception"] = str(options.inception_weights or "torch hub cache (pt_inception-2015-12-05)")
    if {"fid", "kid"} & set(chosen) and options.reference is None:
        say(f"computing reference statistics from {options.ref_images}")
        reference, ref_features = compute_reference(
            options.ref_images,
            net,
            batch_size=options.batch_size,
            resize=options.ref_resize,
            jpeg_quality=options.jpeg_quality,
            progress=options.progress,
        )
        networks["reference"] = str(options.ref_images)
        if options.save_reference is not None:
            save_statistics(options.save_reference, reference, ref_features if "kid" in chosen else None)
            networks["reference_saved_to"] = str(options.save_reference)
    clip = None
    if "clip" in chosen:
        from bksdm.eval.clip_models import load_clip

        say(f"loading CLIP {options.clip_model}")
        clip = load_clip(options.clip_model, options.clip_pretrained, device=device)
        networks["clip"] = clip.name
    classifier = None
    if "shapes" in chosen:
        from bksdm.world import classifier as shapes

        classifier = shapes.load_classifier(device=device)
        say("rendering the shapes reference")
        shapes_reference = M.feature_statistics(
            shapes.features(
                classifier, [im for im, _ in shapes.pairs(shapes.REFERENCE_SEED, options.shapes_reference_count)]
            )
        )
        networks["shapes_classifier"] = str(shapes.ASSETS)

    if "kid" in chosen and len(records) < options.kid_subset_size:  # before the long pass, not after it
        raise EvaluationError(
            f"KID subsets of {options.kid_subset_size} images need at least that many (lower --kid-subset-size), "
            f"but {describe_images(images, manifest, len(records))}"
        )
    say(f"scoring {len(records)} images ({', '.join(chosen)})")
    feats, logits, cosines, shape_feats, predicted = [], [], [], [], []
    skipped: list[str] = []
    batches = _batches(records, options.batch_size, options.resize, options.jpeg_quality, options.progress, skipped)
    scored: list[ImageRecord] = []
    for chunk, batch in batches:
        scored += chunk
        if net is not None:
            f, lg = _inception_batch(net, batch, bool({"fid", "kid"} & set(chosen)), "is" in chosen)
            feats.append(_finite(f, "Inception-v3", networks.get("inception"), chunk))
            logits.append(_finite(lg, "Inception-v3", networks.get("inception"), chunk))
        if clip is not None:
            cosine = M.cosine_similarities(clip.embed_images(batch), clip.embed_texts([r.prompt for r in chunk]))
            cosines.append(_finite(cosine, "CLIP", networks.get("clip"), chunk))
        if classifier is not None:
            shape_feats.append(_finite(shapes.features(classifier, batch), "the shapes classifier", None, chunk))
            predicted.extend(shapes.predict(classifier, batch))

    count = len(scored)
    if skipped:
        where = f"{describe_images(images, manifest, len(records))} and {len(skipped)} of them are unreadable"
        _check_count(options, chosen, count, f"{where} (e.g. {skipped[0]})")
    if {"fid", "kid"} & set(chosen):
        generated = np.concatenate(feats)
        if "fid" in chosen:
            results["fid"] = M.frechet_distance(M.feature_statistics(generated), reference)
        if "kid" in chosen:
            kid = M.kernel_inception_distance(
                generated, ref_features, subsets=options.kid_subsets, subset_size=options.kid_subset_size
            )
            results.update(kid=kid.mean, kid_std=kid.std)
    if "is" in chosen:
        score = M.inception_score(np.concatenate(logits), splits=options.is_splits)
        results.update(**{"is": score.mean, "is_std": score.std})
    if "clip" in chosen:
        score = M.clip_score(np.concatenate(cosines))
        results.update(clip_score=score.score, clip_cosine=score.cosine)
    if "shapes" in chosen:
        from bksdm.world.shapes import ATTRIBUTES, parse_caption

        wanted = [parse_caption(r.prompt) for r in scored]
        for name in ATTRIBUTES:
            results[f"shapes_{name}_accuracy"] = float(
                np.mean([getattr(p, name) == getattr(w, name) for p, w in zip(predicted, wanted, strict=True)])
            )
        results["shapes_prompt_accuracy"] = float(np.mean([p == w for p, w in zip(predicted, wanted, strict=True)]))
        results["shapes_frechet_distance"] = M.frechet_distance(
            M.feature_statistics(np.concatenate(shape_feats)), shapes_reference
        )
    broken = {k: v for k, v in results.items() if not np.isfinite(v)}
    if broken:  # never a NaN figure (nor invalid JSON) written as a result
        raise EvaluationError(
            f"{', '.join(f'{k} = {v}' for k, v in broken.items())}: a figure came out NaN or infinite; the images "
            f"or the networks' weights hold non-finite values ({', '.join(f'{k}: {v}' for k, v in networks.items())})"
        )
    return {
        "images": str(images),
        "manifest": str(manifest) if manifest is not None else None,
        "count": count,
        "skipped": skipped,
        "metrics": results,
        "networks": networks,
        "settings": {
            "metrics": chosen,
            "resize": options.resize,
            "ref_resize": options.ref_resize,
            "jpeg_quality": options.jpeg_quality,
            "batch_size": options.batch_size,
            "device": str(device),
            "is_splits": options.is_splits,
            "kid_subsets": options.kid_subsets,
            "kid_subset_size": options.kid_subset_size,
        },
        "seconds": time.perf_counter() - started,
    }


METRIC_LABELS = {
    "fid": ("FID", "lower is better"),
    "kid": ("KID", "lower is better"),
    "kid_std": ("KID std", ""),
    "is": ("Inception Score", "higher is better"),
    "is_std": ("IS std", ""),
    "clip_score": ("CLIP score (torchmetrics, 0-100)", "higher is better"),
    "clip_cosine": ("CLIP cosine (the paper's)", "higher is better"),
    "shapes_prompt_accuracy": ("shapes prompt accuracy", "higher is better"),
    "shapes_shape_accuracy": ("shapes: shape read right", "higher is better"),
    "shapes_color_accuracy": ("shapes: colour read right", "higher is better"),
    "shapes_size_accuracy": ("shapes: size read right", "higher is better"),
    "shapes_position_accuracy": ("shapes: position read right", "higher is better"),
    "shapes_frechet_distance": ("shapes Fréchet distance", "lower is better"),
}
"""Display name and direction of each metric key (others are shown by their key)."""


def format_results(result: dict[str, Any]) -> str:
    """The terminal table of an :func:`evaluate` result."""
    rows = [(METRIC_LABELS.get(k, (k, ""))[0], f"{v:.6g}", METRIC_LABELS.get(k, ("", ""))[1])
            for k, v in result["metrics"].items()]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"bksdm evaluate: {result['count']} images in {result['images']}", ""]
    if result.get("skipped"):
        lines[0] += f" ({len(result['skipped'])} unreadable, skipped: see 'skipped' in the JSON)"
    lines += [f"  {name:<{width}}  {value:>12}  {note}".rstrip() for name, value, note in rows]
    lines += ["", "  " + ", ".join(f"{k}: {v}" for k, v in result["networks"].items())]
    return "\n".join(lines)
