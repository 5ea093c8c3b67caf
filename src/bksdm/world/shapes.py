"""The shapes world: a procedural image–text data set small enough to train and judge models on a CPU.

Each image is one shape on a plain background; its caption names every attribute, from a fixed template:
"a small red circle at the top left". Everything is a pure function of a seed, so any number of pairs can be
regenerated exactly, and the attribute classifier (:mod:`bksdm.world.classifier`) can read the attributes back
from a generated image and check them against its prompt.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
"""Side of a shapes image in pixels."""

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SIZES = ("small", "big")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "position": POSITIONS}
"""Every attribute and its values, in a fixed order (the classifier's heads follow it)."""

BACKGROUND = (245, 245, 240)
_RADIUS = {"small": (6, 8), "big": (11, 14)}  # half-extent in pixels: (min, max), jittered per image
_CENTER_JITTER = 5  # pixels of random offset around the quadrant's centre


@dataclass(frozen=True)
class Scene:
    """The attributes of one image; the caption is a function of them."""

    shape: str
    color: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"

    def labels(self) -> tuple[int, ...]:
        """Index of each attribute value, in ATTRIBUTES order."""
        return tuple(values.index(getattr(self, name)) for name, values in ATTRIBUTES.items())


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes (inverse of :attr:`Scene.caption`).

    Raises:
        ValueError: the caption does not follow the world's template.
    """
    words = caption.strip().lower().split()
    try:
        size, color, shape = words[1], words[2], words[3]
        position = " ".join(words[6:8])
        if words[0] != "a" or words[4:6] != ["at", "the"] or len(words) != 8:
            raise IndexError
    except IndexError:
        raise ValueError(
            f"'{caption}' is not a shapes-world caption like 'a small red circle at the top left'"
        ) from None
    scene = Scene(shape, color, size, position)
    for name, values in ATTRIBUTES.items():
        if getattr(scene, name) not in values:
            raise ValueError(f"'{caption}': unknown {name} '{getattr(scene, name)}' (known: {', '.join(values)})")
    return scene


def all_scenes() -> list[Scene]:
    """Every combination of attributes (3 shapes × 4 colours × 2 sizes × 4 positions = 96)."""
    return [
        Scene(shape, color, size, position)
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
        for position in POSITIONS
    ]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(*(values[int(rng.integers(len(values)))] for values in ATTRIBUTES.values()))


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draws ``scene`` with random jitter of position, extent and rotation (triangles), drawn from ``rng``."""
    scale = size / IMAGE_SIZE
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    lo, hi = _RADIUS[scene.size]
    r = rng.uniform(lo, hi) * scale
    vertical, horizontal = scene.position.split()
    cx = (0.25 if horizontal == "left" else 0.75) * size + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER) * scale
    cy = (0.25 if vertical == "top" else 0.75) * size + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER) * scale
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # an upright equilateral-ish triangle, slightly rotated
        angle = rng.uniform(-0.3, 0.3)
        points = [
            (cx + 1.2 * r * math.sin(angle + k * 2 * math.pi / 3), cy - 1.2 * r * math.cos(angle + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(points, fill=fill)
    return image


def sample(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[Image.Image, Scene]:
    """Pair number ``index`` of the world with seed ``seed``: the same arguments always give the same pair."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    return render(scene, rng, size), scene


def pairs(seed: int, count: int, size: int = IMAGE_SIZE) -> Iterator[tuple[Image.Image, Scene]]:
    """``count`` pairs of the world with seed ``seed``."""
    for index in range(count):
        yield sample(seed, index, size)


def export(folder: str | os.PathLike, count: int, seed: int = 0, size: int = IMAGE_SIZE) -> Path:
    """Writes ``count`` pairs as PNG files plus ``metadata.csv`` (``file_name,text``): the same on-disk format as
    the LAION subsets, so every data path of bksdm can be run on it. Also writes ``attributes.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (
        (folder / "metadata.csv").open("w", newline="") as meta,
        (folder / "attributes.csv").open("w", newline="") as attrs,
    ):
        captions, labels = csv.writer(meta), csv.writer(attrs)
        captions.writerow(["file_name", "text"])
        labels.writerow(["file_name", *ATTRIBUTES])
        for index, (image, scene) in enumerate(pairs(seed, count, size)):
            name = f"{index:06d}.png"
            image.save(folder / name)
            captions.writerow([name, scene.caption])
            labels.writerow([name, *asdict(scene).values()])
    return folder


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Images → float32 array (N, 3, H, W) in [-1, 1], the layout the models take."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images])
