"""The evaluate job: score a folder of generated images (and their prompts) with the networks asked for.

One pass over the images feeds every network asked for, a batch at a time (30K images never sit in memory):

- ``fid`` / ``kid``: Inception-v3 pool features the pytorch-fid way, against reference statistics (an ``.npz``
  with ``mu`` and ``sigma``, pytorch-fid's format, so published MS-COCO statistics work as they are) or a
  folder of real images (:mod:`bksdm.eval.reference`);
- ``is``: Inception-v3 logits the torch-fidelity way (10 splits);
- ``clip``: CLIP score of each image with its prompt (OpenCLIP ViT-g/14 by default, or a Hugging Face CLIP);
- ``shapes``: for the embedded shapes world, prompt accuracy and the Fréchet distance in the shapes
  classifier's feature space (:mod:`bksdm.eval.shapes_scores`).

Which images and prompts: :mod:`bksdm.eval.image_sets`. The metric arithmetic lives in :mod:`bksdm.eval.metrics`;
this module owns the networks and the pass. :func:`evaluate_folder` is ``bksdm evaluate``: it also writes
``evaluation.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bksdm.artifacts import write_text
from bksdm.eval import metrics as M
from bksdm.eval.image_sets import (
    EvaluationError,
    ImageRecord,
    check_resize,
    describe_images,
    find_images,
    image_batches,
)
from bksdm.eval.reference import compute_reference, inception_outputs, load_statistics, save_statistics

__all__ = [
    "EVALUATION_FILE",
    "METRICS",
    "EvaluationOptions",
    "evaluate",
    "evaluate_folder",
]

logger = logging.getLogger(__name__)

METRICS = ("fid", "is", "clip", "kid", "shapes")

EVALUATION_FILE = "evaluation.json"
"""Written by ``bksdm evaluate`` into the images folder (unless told otherwise); read by ``bksdm report``."""


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
    device: str | None = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``; None: CUDA if available."""
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
    from bksdm.devices import resolve_device

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
        from bksdm.eval.shapes_scores import shapes_reference
        from bksdm.world import classifier as shapes

        classifier = shapes.load_classifier(device=device)
        say("rendering the shapes reference")
        reference_shapes = shapes_reference(classifier, options.shapes_reference_count)
        networks["shapes_classifier"] = str(shapes.ASSETS)

    if "kid" in chosen and len(records) < options.kid_subset_size:  # before the long pass, not after it
        raise EvaluationError(
            f"KID subsets of {options.kid_subset_size} images need at least that many (lower --kid-subset-size), "
            f"but {describe_images(images, manifest, len(records))}"
        )
    say(f"scoring {len(records)} images ({', '.join(chosen)})")
    feats, logits, cosines, shape_feats, predicted = [], [], [], [], []
    skipped: list[str] = []
    batches = image_batches(
        records, options.batch_size, options.resize, options.jpeg_quality, options.progress, skipped
    )
    scored: list[ImageRecord] = []
    for chunk, batch in batches:
        scored += chunk
        if net is not None:
            f, lg = inception_outputs(net, batch, bool({"fid", "kid"} & set(chosen)), "is" in chosen)
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
        from bksdm.eval.shapes_scores import shapes_accuracy

        results.update(shapes_accuracy(predicted, [r.prompt for r in scored]).metrics())
        results["shapes_frechet_distance"] = M.frechet_distance(
            M.feature_statistics(np.concatenate(shape_feats)), reference_shapes
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


def evaluate_folder(
    images: str | Path,
    manifest: str | Path | None = None,
    options: EvaluationOptions | None = None,
    out: str | Path | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """The job of ``bksdm evaluate``: :func:`evaluate`, then the result written as JSON.

    Args:
        images: The folder of images (``bksdm generate``'s output, or any folder of images).
        manifest: JSON lines with ``file`` and ``prompt``; default ``images/manifest.jsonl`` when present.
        options: Metrics and networks (see :class:`EvaluationOptions`).
        out: Where to write the result; default ``images/evaluation.json`` (:data:`EVALUATION_FILE`).
        on_stage: Called with a short message before each slow stage.

    Returns:
        The result (see :func:`evaluate`) and the file it was written to.

    Raises:
        EvaluationError: Bad inputs, or a network's weights or library are missing (the message says which).
        WriteFailed: The result could not be written.
    """
    from bksdm.devices import resolve_device
    from bksdm.eval.clip_models import ClipNotAvailableError
    from bksdm.eval.inception import InceptionWeightsNotFoundError

    options = options or EvaluationOptions()
    if options.batch_size < 1:
        raise EvaluationError("--batch-size must be at least 1")
    if options.save_reference and not options.ref_images:
        raise EvaluationError("--save-ref caches a reference computed from --ref-images: give --ref-images DIR")
    options = replace(options, device=str(resolve_device(options.device)))  # a bad device fails before the images
    try:
        result = evaluate(images, manifest, options, on_stage=on_stage)
    except (InceptionWeightsNotFoundError, ClipNotAvailableError) as err:  # missing weights or libraries
        raise EvaluationError(str(err)) from err
    path = Path(out) if out else Path(images) / EVALUATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")  # evaluate() refuses non-finite figures
    return result, path
