"""The shapes world's judge: a small CNN that reads a scene's attributes back from an image, and two metrics on it.

The classifier plays, for the shapes world, the part that Inception-v3 and CLIP play for MS-COCO:

- **prompt accuracy** -- the share of generated images whose shape, colour, size and position, as the classifier
  reads them, all match their prompt (a stricter, per-image analogue of the CLIP score);
- **Fréchet distance** -- FID's formula applied to the classifier's pooled features instead of Inception's,
  against real shapes images from a fixed held-out seed.

Both mean something only because the classifier is accurate on real images (>= 0.98 on every attribute and on
all four at once, checked by ``tests/world/test_classifier.py``), so a miss is the generator's fault, not the judge's.

The weights ship in ``bksdm/world/assets/classifier/`` (``model.safetensors`` + ``config.json``) and are made by
``python -m bksdm.world.train_classifier``. Everything here except :func:`load_classifier` is pure: no files, no
prints, no global state.

Seeds (``sample(seed, index)`` streams are independent for distinct seeds): the classifier trains on
:data:`TRAIN_SEED`, is checked on :data:`HELD_OUT_SEED`, and the Fréchet reference is drawn from
:data:`REFERENCE_SEED`. None of them is a seed the teacher's or the demo's data use (0, 1234).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from bksdm.eval.metrics import FeatureStatistics, feature_statistics, frechet_distance
from bksdm.world.shapes import ATTRIBUTES, IMAGE_SIZE, Scene, pairs, parse_caption, to_array

__all__ = [
    "ASSETS",
    "HELD_OUT_SEED",
    "REFERENCE_SEED",
    "TRAIN_SEED",
    "ClassifierConfig",
    "ShapesClassifier",
    "attribute_accuracy",
    "features",
    "load_classifier",
    "parse_caption",
    "predict",
    "prompt_accuracy",
    "reference_statistics",
    "shapes_frechet_distance",
]

ASSETS = Path(__file__).parent / "assets" / "classifier"
"""Folder of the shipped weights (inside the installed package, so it works from a wheel too)."""

TRAIN_SEED = 9100
"""World seed the shipped classifier was trained on."""
HELD_OUT_SEED = 9101
"""World seed of the held-out images its accuracy is measured on (never seen in training)."""
REFERENCE_SEED = 9102
"""World seed of the real images behind :func:`reference_statistics` (disjoint from the two above)."""

_BATCH = 256  # images per forward pass in predict/features: bounds memory, not results

Images = Sequence[Image.Image] | torch.Tensor | np.ndarray
"""What the functions here accept: PIL images, or a float (N, 3, H, W) tensor/array in [-1, 1]."""


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture hyper-parameters, saved in ``config.json`` next to the weights."""

    widths: tuple[int, ...] = (24, 32, 64, 128)
    """Output channels of the trunk's 3x3 convolutions; every one after the first halves the resolution, so
    (24, 32, 64, 128) goes 64 → 64, 32, 16, 8 pixels. The last width is the feature dimension. About 100k
    parameters (400 kB): the world has 96 scenes of flat shapes, and this already reads all of them."""
    image_size: int = IMAGE_SIZE
    """Side the classifier sees; :func:`predict` resizes other sizes to it."""
    attributes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(ATTRIBUTES))
    """Attribute → values, one linear head each, in this order (the world's ``ATTRIBUTES``)."""

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


class ShapesClassifier(nn.Module):
    """A tiny CNN: a shared convolutional trunk, global average pooling, one linear head per attribute.

    Two coordinate channels (x and y in [-1, 1]) are appended to the image before the first convolution
    (CoordConv, Liu et al. 2018): global average pooling throws away *where* a feature fired, and position is
    one of the four attributes, so the trunk is handed the coordinates to fold into its features instead of
    having to infer them from zero-padding artefacts at the border.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        channels = 3 + 2  # RGB + (x, y) coordinates
        for i, width in enumerate(self.config.widths):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(channels, len(values)) for values in self.config.attributes.values())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → pooled features (B, D): the space the Fréchet distance is taken in."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = self.trunk(torch.cat([x, xs, ys], dim=1))  # (B, D, H/16, W/16)
        return x.mean(dim=(2, 3))  # (B, D)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] → logits, one (B, len(values)) tensor per attribute."""
        feats = self.embed(x)
        return [head(feats) for head in self.heads]


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ShapesClassifier:
    """Loads a classifier saved by ``bksdm.world.train_classifier``, in eval mode.

    Args:
        path: A folder with ``model.safetensors`` and ``config.json``; default: the shipped one (:data:`ASSETS`).
        device: Where to put the model.

    Returns:
        The classifier, frozen (no gradients) and in eval mode.

    Raises:
        FileNotFoundError: the folder lacks one of the two files.
        ValueError: the weights were trained for other attributes than this world's ``ATTRIBUTES``.
    """
    folder = Path(path) if path is not None else ASSETS
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found: train one with `python -m bksdm.world.train_classifier`"
            )
    raw: dict[str, Any] = json.loads((folder / "config.json").read_text())
    attributes = {name: tuple(values) for name, values in raw["attributes"].items()}
    if attributes != dict(ATTRIBUTES):
        # Heads index values by position: a classifier trained on another value list would silently misread.
        raise ValueError(f"{folder}: trained for attributes {attributes}, but the world has {dict(ATTRIBUTES)}")
    config = ClassifierConfig(widths=tuple(raw["widths"]), image_size=int(raw["image_size"]), attributes=attributes)
    model = ShapesClassifier(config)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.to(device).eval().requires_grad_(False)


def config_dict(config: ClassifierConfig) -> dict[str, Any]:
    """The JSON-ready form of ``config`` that :func:`load_classifier` reads back."""
    data = asdict(config)
    data["widths"] = list(config.widths)
    data["attributes"] = {name: list(values) for name, values in config.attributes.items()}
    return data


def _as_tensor(images: Images, size: int) -> torch.Tensor:
    """Any accepted image form → float32 (N, 3, size, size) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    else:
        images = list(images)
        if not images:
            return torch.zeros(0, 3, size, size)
        x = torch.from_numpy(to_array(images))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-2:] != (size, size):
        # Antialiased, so a 512-pixel render is shrunk like PIL would, not aliased by point sampling.
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def _run(model: ShapesClassifier, images: Images) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Features (N, D) and per-attribute logits for ``images``, batched, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = _as_tensor(images, model.config.image_size)
    feats, logits = [], [[] for _ in model.heads]
    try:
        for start in range(0, len(x), _BATCH):
            f = model.embed(x[start : start + _BATCH].to(device))
            feats.append(f.cpu())
            for out, head in zip(logits, model.heads, strict=True):
                out.append(head(f).cpu())
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, model.config.feature_dim), [
            torch.zeros(0, len(v)) for v in model.config.attributes.values()
        ]
    return torch.cat(feats), [torch.cat(out) for out in logits]


def predict(model: ShapesClassifier, images: Images) -> list[Scene]:
    """The scene the classifier reads in each image.

    Args:
        model: A classifier (see :func:`load_classifier`).
        images: PIL images, or a float (N, 3, H, W) tensor/array in [-1, 1]; sides other than the classifier's
            64 pixels are resized to it.

    Returns:
        One :class:`~bksdm.world.shapes.Scene` per image, in order.
    """
    _, logits = _run(model, images)
    indices = [out.argmax(dim=1).tolist() for out in logits]
    values = list(model.config.attributes.values())
    return [Scene(*(values[a][idx[i]] for a, idx in enumerate(indices))) for i in range(len(indices[0]))]


def features(model: ShapesClassifier, images: Images) -> np.ndarray:
    """The classifier's pooled features (N, D) as float64: the space :func:`shapes_frechet_distance` works in."""
    feats, _ = _run(model, images)
    return feats.double().numpy()


def attribute_accuracy(model: ShapesClassifier, images: Images, scenes: Sequence[Scene]) -> dict[str, float]:
    """Share of images whose attribute the classifier reads as ``scenes`` says, per attribute and for all at once.

    Returns:
        ``{"shape": ..., "color": ..., "size": ..., "position": ..., "all": ...}``.

    Raises:
        ValueError: ``images`` and ``scenes`` differ in length, or are empty.
    """
    predicted = predict(model, images)
    if len(predicted) != len(scenes) or not scenes:
        raise ValueError(f"need as many scenes as images, and at least one: got {len(scenes)} and {len(predicted)}")
    result = {
        name: float(np.mean([getattr(p, name) == getattr(s, name) for p, s in zip(predicted, scenes, strict=True)]))
        for name in model.config.attributes
    }
    result["all"] = float(np.mean([p == s for p, s in zip(predicted, scenes, strict=True)]))
    return result


def prompt_accuracy(model: ShapesClassifier, images: Images, prompts: Sequence[str]) -> float:
    """Share of images in which the classifier reads every attribute of their prompt (shape, colour, size, position).

    Raises:
        ValueError: a prompt is not a shapes-world caption, or the counts differ.
    """
    return attribute_accuracy(model, images, [parse_caption(p) for p in prompts])["all"]


def reference_statistics(model: ShapesClassifier, count: int = 2000, seed: int = REFERENCE_SEED) -> FeatureStatistics:
    """Feature mean and covariance of ``count`` real shapes images: the "real" side of the Fréchet distance.

    Args:
        model: The classifier whose features are used.
        count: Images to render; 2000 keeps the (128 x 128) covariance well conditioned; takes a few seconds on a CPU.
        seed: World seed; the default :data:`REFERENCE_SEED` is held out from the classifier's training and from
            the teacher's and demo's data, so a model cannot score well by reproducing its training images.

    Returns:
        The statistics (:class:`bksdm.eval.metrics.FeatureStatistics`), the same for the same arguments.
    """
    images = [image for image, _ in pairs(seed, count, model.config.image_size)]
    return feature_statistics(features(model, images))


def shapes_frechet_distance(
    model: ShapesClassifier, images: Images, reference: FeatureStatistics | None = None
) -> float:
    """Fréchet distance, in the classifier's feature space, between ``images`` and real shapes images.

    FID's formula (:func:`bksdm.eval.metrics.frechet_distance`, the one the evaluate job uses) on the classifier's
    features instead of Inception's.

    Args:
        model: The classifier.
        images: Generated images (PIL, or (N, 3, H, W) in [-1, 1]); at least two.
        reference: Statistics from :func:`reference_statistics`; computed with its defaults when omitted (pass
            them in when scoring several models, to render the reference once).
    """
    reference = reference if reference is not None else reference_statistics(model)
    return frechet_distance(feature_statistics(features(model, images)), reference)
