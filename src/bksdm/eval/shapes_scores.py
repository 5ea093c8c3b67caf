"""The shapes world's scores: does an image show what its prompt asks, and how close are the images to real ones.

Both read the images through the shapes classifier (:mod:`bksdm.world.classifier`):

- **accuracy**: the share of images in which the classifier reads a prompt's attribute (shape, colour, size,
  position) as the prompt says, per attribute, and for all four at once (*prompt accuracy*, the headline figure
  of ``bksdm demo`` and of ``bksdm evaluate --metrics shapes``);
- **Fréchet distance**: FID's formula (:func:`bksdm.eval.metrics.frechet_distance`) on the classifier's pooled
  features instead of Inception's, against real shapes images rendered from a held-out world seed.

``bksdm evaluate`` feeds the classifier batch by batch and calls :func:`shapes_accuracy` on what it read;
:func:`score_shapes` scores a list of images held in memory (what ``bksdm demo`` generates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bksdm.eval import metrics as M

__all__ = ["ShapesAccuracy", "score_shapes", "shapes_accuracy", "shapes_reference"]


@dataclass(frozen=True)
class ShapesAccuracy:
    """What share of images the classifier reads as their prompts say."""

    attributes: dict[str, float]
    """Per attribute (``shape``, ``color``, ``size``, ``position``, in :data:`bksdm.world.shapes.ATTRIBUTES`' order)."""
    prompt: float
    """All four attributes right: the prompt accuracy."""

    def metrics(self) -> dict[str, float]:
        """The figures under ``bksdm evaluate``'s names: ``shapes_<attribute>_accuracy``, ``shapes_prompt_accuracy``."""
        figures = {f"shapes_{name}_accuracy": value for name, value in self.attributes.items()}
        return {**figures, "shapes_prompt_accuracy": self.prompt}


def shapes_accuracy(predicted: Sequence[Any], prompts: Sequence[Any]) -> ShapesAccuracy:
    """Compare the scenes the classifier read (:func:`bksdm.world.classifier.predict`) with the prompts.

    Args:
        predicted: One :class:`bksdm.world.shapes.Scene` per image, as read.
        prompts: One shapes-world caption (or the :class:`~bksdm.world.shapes.Scene` it describes) per image.

    Raises:
        ValueError: The counts differ or are zero, or a prompt is not a shapes-world caption.
    """
    from bksdm.world.shapes import ATTRIBUTES, parse_caption

    if len(predicted) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per image, and at least one: got {len(prompts)} and {len(predicted)}")
    wanted = [parse_caption(p) if isinstance(p, str) else p for p in prompts]
    pairs = list(zip(predicted, wanted, strict=True))
    attributes = {name: float(np.mean([getattr(p, name) == getattr(w, name) for p, w in pairs])) for name in ATTRIBUTES}
    return ShapesAccuracy(attributes=attributes, prompt=float(np.mean([p == w for p, w in pairs])))


def shapes_reference(classifier, count: int = 2000) -> M.FeatureStatistics:
    """Classifier feature statistics of ``count`` real shapes images from the held-out reference seed."""
    from bksdm.world import classifier as shapes

    return M.feature_statistics(
        shapes.features(classifier, [image for image, _ in shapes.pairs(shapes.REFERENCE_SEED, count)])
    )


def score_shapes(
    images: Sequence[Any],
    prompts: Sequence[str],
    classifier=None,
    reference: M.FeatureStatistics | None = None,
    *,
    reference_count: int = 2000,
) -> dict[str, float]:
    """Accuracy and Fréchet distance of images held in memory, under ``bksdm evaluate``'s names.

    Args:
        images: PIL images (or a float (N, 3, H, W) array in [-1, 1]); at least two.
        prompts: One shapes-world caption per image.
        classifier: The shapes classifier; None loads the shipped one on the CPU.
        reference: Statistics from :func:`shapes_reference` (pass them when scoring several sets, to render the
            real images once); None renders ``reference_count`` of them.
        reference_count: Real images behind the reference when it is rendered here.

    Returns:
        ``shapes_<attribute>_accuracy`` for each attribute, ``shapes_prompt_accuracy`` and
        ``shapes_frechet_distance``.

    Raises:
        ValueError: Not one caption per image, or fewer than two images.
    """
    from bksdm.world import classifier as shapes

    classifier = classifier if classifier is not None else shapes.load_classifier()
    reference = reference if reference is not None else shapes_reference(classifier, reference_count)
    result = shapes_accuracy(shapes.predict(classifier, images), prompts).metrics()
    features = shapes.features(classifier, images)
    result["shapes_frechet_distance"] = M.frechet_distance(M.feature_statistics(features), reference)
    return result
