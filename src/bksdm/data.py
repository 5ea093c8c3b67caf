"""Image–text data for distillation: sources, the image transform, a global batch sampler and datasets.

The data a run sees is a pure function of ``(seed, step, position in the global batch)``, never of the number
of processes or dataloader workers, so that a run split across N GPUs, or resumed at step S, trains on the
same samples with the same augmentations as one uninterrupted single-process run:

- :class:`GlobalBatchSampler` decides which dataset indices form global batch ``step`` (a seeded permutation
  per epoch); process ``rank`` takes its contiguous slice of that batch.
- :class:`DistillDataset` loads one :class:`SampleRef` and draws every random choice for it (flip, crop
  offset, which of several captions) from ``sample_generator(seed, step, position, STREAM_DATA)``.
- A bad record (missing or corrupt image, empty caption) is replaced by the next index, deterministically,
  so batches keep their size and stay reproducible; the reasons travel with the batch in ``skipped``.

Sources give random access to raw records ``(image, caption, record_id)``: :class:`FolderSource` (a folder of
images plus ``metadata.csv`` / ``metadata.jsonl``, the layout of the paper's LAION-Aesthetics subsets) and
:class:`HFSource` (a Hugging Face ``datasets`` dataset). :class:`WebDatasetSource` streams tar shards for
millions of pairs; its (weaker, documented) determinism guarantees are in its docstring.

Typical use (one process of ``world_size``)::

    source = open_source("data/laion_aes_212k")
    dataset = DistillDataset(source, ImageTransform(512), seed=1234)
    sampler = GlobalBatchSampler(len(dataset), 256, seed=1234, rank=rank, world_size=world_size, start_step=s)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=8)

Don't pass this loader through ``accelerator.prepare``: the sampler already shards by rank, and accelerate
would shard (and reorder) a second time.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import warnings
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import count, islice
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from bksdm.seeding import STREAM_DATA, mix_seed, sample_generator

logger = logging.getLogger(__name__)

ImageData = bytes | str | os.PathLike | Image.Image | None
"""An image as a source hands it over: encoded bytes, a file path, a PIL image, or ``None`` (missing)."""
Record = tuple[ImageData, Any, str]
"""A raw record ``(image, caption, record_id)``; the caption is unchecked (may be None, bytes, a list...)."""

MAX_CONSECUTIVE_BAD = 100
"""This many bad records in a row means the data (or its paths) is broken, not merely noisy: stop."""
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "json")


class BadRecordError(ValueError):
    """A record that cannot be used (its image or caption is missing, corrupt or empty)."""


class Source(Protocol):
    """Random access to raw image–text records."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


# ---------------------------------------------------------------------------------------------------------
# Sources


class _StringTable:
    """Many optional strings packed into one byte buffer plus offsets.

    A list of millions of ``str`` objects is copied page by page into every forked dataloader worker, because
    merely reading an object updates its refcount (pytorch/pytorch#13246); numpy buffers are not touched, so
    they stay shared. It also pickles in one piece for spawned workers.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self._offsets = array("q", [0])
        self._kinds = bytearray()  # 0: None, 1: str, 2: JSON-encoded non-string value (e.g. a list of captions)

    def append(self, value: Any) -> None:
        if value is None:
            self._kinds.append(0)
        elif isinstance(value, str):
            self._kinds.append(1)
            # surrogatepass round-trips any str, including undecodable bytes kept by surrogateescape
            self._data += value.encode("utf-8", "surrogatepass")
        else:
            self._kinds.append(2)
            self._data += json.dumps(value).encode()
        self._offsets.append(len(self._data))

    def freeze(self) -> _StringTable:
        self._data = np.frombuffer(bytes(self._data), dtype=np.uint8)
        self._offsets = np.frombuffer(self._offsets, dtype=np.int64).copy()
        self._kinds = np.frombuffer(bytes(self._kinds), dtype=np.uint8)
        return self

    def __len__(self) -> int:
        return len(self._kinds)

    def __getitem__(self, i: int) -> Any:
        kind = int(self._kinds[i])
        if kind == 0:
            return None
        raw = self._data[self._offsets[i] : self._offsets[i + 1]].tobytes()
        return raw.decode("utf-8", "surrogatepass") if kind == 1 else json.loads(raw)


def _missing_columns_error(path: Path, missing: list[str], present: Iterable[str]) -> ValueError:
    return ValueError(
        f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}; "
        f"columns present: {sorted(present)}. Pass image_column=/caption_column= to name yours."
    )


class FolderSource:
    """A folder of images described by a metadata file (the layout of the paper's LAION-Aesthetics subsets).

    The metadata is ``metadata.csv`` (read with the ``csv`` module, so captions may hold commas, quotes and
    newlines) or ``metadata.jsonl`` (one JSON object per line; a caption may be a list of captions). Image
    paths in it are relative to ``root``. Images are not opened here: a missing or broken file surfaces when
    the record is loaded, where :class:`DistillDataset` skips it.

    Args:
        root: The folder holding the images (and, unless ``metadata`` says otherwise, the metadata file).
        metadata: Path of the metadata file (absolute, or relative to ``root``); found in ``root`` if None.
        image_column: Column holding the image path.
        caption_column: Column holding the caption.

    Raises:
        FileNotFoundError: If the folder or the metadata file does not exist.
        ValueError: If a column is missing (naming the file, the column and the columns present), if the
            metadata format is unknown, or if it holds no records.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        metadata: str | os.PathLike | None = None,
        image_column: str = "file_name",
        caption_column: str = "text",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.metadata = self._find_metadata(metadata)
        self.image_column = image_column
        self.caption_column = caption_column
        self._files = _StringTable()
        self._captions = _StringTable()
        if self.metadata.suffix.lower() == ".csv":
            self._read_csv()
        elif self.metadata.suffix.lower() in (".jsonl", ".json"):
            self._read_jsonl()
        else:
            raise ValueError(f"{self.metadata}: unknown metadata format (expected .csv or .jsonl)")
        self._files.freeze()
        self._captions.freeze()
        if len(self) == 0:
            raise ValueError(f"{self.metadata}: no records")
        logger.info("%s: %d records", self.metadata, len(self))

    def _find_metadata(self, metadata: str | os.PathLike | None) -> Path:
        if metadata is not None:
            path = Path(metadata)
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise FileNotFoundError(f"metadata file not found: {path}")
            return path
        found = [self.root / name for name in METADATA_NAMES if (self.root / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{self.root}: no {' or '.join(METADATA_NAMES)} (or pass metadata=PATH)")
        if len(found) > 1:
            logger.warning("%s holds both %s; using %s", self.root, " and ".join(METADATA_NAMES), found[0].name)
        return found[0]

    def _read_csv(self) -> None:
        # utf-8-sig drops a BOM (spreadsheet exports); surrogateescape keeps undecodable bytes so that one bad
        # caption becomes one skipped record instead of an unreadable file.
        with self.metadata.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in (self.image_column, self.caption_column) if c not in columns]
            if missing:
                raise _missing_columns_error(self.metadata, missing, columns)
            try:
                for row in reader:
                    self._files.append(row.get(self.image_column) or None)
                    self._captions.append(row.get(self.caption_column))
            except csv.Error as exc:
                raise ValueError(f"{self.metadata}, line {reader.line_num}: malformed CSV: {exc}") from exc

    def _read_jsonl(self) -> None:
        bad_lines: list[int] = []
        columns: set[str] = set()
        with self.metadata.open("rb") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
                    row = None
                if not isinstance(row, dict):
                    bad_lines.append(line_number)
                    continue
                columns.update(row)
                image = row.get(self.image_column)
                self._files.append(image if isinstance(image, str) and image else None)
                self._captions.append(row.get(self.caption_column))
        if bad_lines:
            shown = ", ".join(map(str, bad_lines[:20])) + (", ..." if len(bad_lines) > 20 else "")
            logger.warning("%s: skipped %d malformed JSON line(s): %s", self.metadata, len(bad_lines), shown)
        self.num_bad_lines = len(bad_lines)
        missing = [c for c in (self.image_column, self.caption_column) if c not in columns]
        if missing:
            raise _missing_columns_error(self.metadata, missing, columns)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Record:
        file_name = self._files[index]
        caption = self._captions[index]
        if file_name is None:
            return None, caption, f"{self.metadata}[record {index}]"
        path = self.root / file_name
        return path, caption, str(path)


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("HFSource needs the Hugging Face datasets package: pip install datasets") from exc
    return datasets


class HFSource:
    """A Hugging Face ``datasets`` dataset: a hub name, a ``save_to_disk`` folder, or any folder or script
    ``load_dataset`` understands (e.g. an ``imagefolder`` with ``metadata.csv``).

    An ``Image`` column is read undecoded, so that decoding happens in :func:`open_image` (JPEG draft mode
    for big images) and a corrupt image is one skipped record rather than an exception inside ``datasets``.
    A string column is taken as image paths, a bytes column as encoded images.

    Args:
        name_or_path: Hub dataset name or local folder.
        split: Split to use.
        image_column: Column holding the image.
        caption_column: Column holding the caption (a string, or a list of strings).
        **load_kwargs: Passed to ``datasets.load_dataset`` (e.g. ``cache_dir``, ``revision``).

    Raises:
        ImportError: If ``datasets`` is not installed.
        ValueError: If the split or a column is missing.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "text",
        **load_kwargs: Any,
    ) -> None:
        datasets = _import_datasets()
        self.name = str(name_or_path)
        path = Path(name_or_path)
        saved = any((path / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json"))
        if path.is_dir() and saved:
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"{self.name}: no split {split!r}; splits: {sorted(dataset)}")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(self.name, split=split, **load_kwargs)
        missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
        if missing:
            raise _missing_columns_error(Path(self.name), missing, dataset.column_names)
        dataset = dataset.select_columns([image_column, caption_column])
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        if len(self) == 0:
            raise ValueError(f"{self.name} [{split}]: no records")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        row = self.dataset[int(index)]
        image = row[self.image_column]
        record_id = f"{self.name}[{index}]"
        if isinstance(image, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            if image.get("path"):
                record_id = f"{record_id} ({image['path']})"
            image = image.get("bytes") or image.get("path")
        return image, row[self.caption_column], record_id


def open_source(spec: str | os.PathLike, **kwargs: Any) -> FolderSource | HFSource:
    """Opens a map-style source from a short spec.

    Args:
        spec: ``hf:NAME`` (a hub dataset or a local ``datasets`` folder), a folder with ``metadata.csv`` /
            ``metadata.jsonl``, or such a metadata file itself.
        **kwargs: Passed to the source (``image_column``, ``caption_column``, ``split`` for ``hf:``).

    Returns:
        The source.

    Raises:
        ValueError: If the spec is none of these.
    """
    text = str(spec)
    if text.startswith("hf:"):
        return HFSource(text[3:], **kwargs)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path, **kwargs)
    if path.is_file() and path.name.lower().endswith((".csv", ".jsonl")):
        return FolderSource(path.parent, metadata=path, **kwargs)
    hint = " (webdataset shards: use WebDatasetSource)" if ".tar" in text else ""
    raise ValueError(
        f"cannot open data source {text!r}{hint}: expected 'hf:NAME', a folder with "
        f"{' or '.join(METADATA_NAMES)}, or a metadata file"
    )


# ---------------------------------------------------------------------------------------------------------
# Images and captions


def open_image(data: ImageData, max_pixels: int | None = None) -> Image.Image:
    """Opens an image lazily: the header is read, the pixels are not decoded yet (so JPEG draft mode works).

    Args:
        data: Encoded bytes, a path, or a PIL image (returned as is).
        max_pixels: Refuse images with more pixels; defaults to PIL's decompression-bomb limit
            ``Image.MAX_IMAGE_PIXELS`` (PIL only warns between 1x and 2x that limit; here both refuse).

    Returns:
        The image, not yet loaded.

    Raises:
        BadRecordError: If there is no image, it is not an image, or it is above the pixel limit.
        OSError: If the file is missing or unreadable.
    """
    if data is None:
        raise BadRecordError("no image")
    if isinstance(data, Image.Image):
        image = data
    else:
        if not isinstance(data, bytes):
            # Read the file in one go: a lazily opened file would hold a handle until the pixels are loaded.
            with open(data, "rb") as f:
                data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise BadRecordError(f"image above the decompression-bomb limit: {exc}") from exc
            except UnidentifiedImageError as exc:
                # PIL's message names the BytesIO object's address: replace it, so that reasons are reproducible.
                raise BadRecordError("not an image (PIL cannot identify the format)") from exc
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and image.width * image.height > limit:
        raise BadRecordError(f"image of {image.width}x{image.height} pixels is above the limit of {limit} pixels")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    Transparent pixels are composited on white: transparent web images (logos, product cut-outs) are mostly
    made to be shown on a light page, and PIL's plain convert would show whatever colour the hidden pixels
    hold, often black. 16- and 32-bit grayscale is scaled to 8 bits, not
    clipped (PIL's convert clips ``I;16`` at 255, turning most of the image white).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0  # float images are usually in [0, 1]
        elif image.mode != "F" and values.size and (image.mode.startswith("I;16") or values.max() > 255):
            values = values / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that shows the image upright (as ``ImageOps.exif_transpose``)."""


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); 1 when the EXIF block is absent or unreadable."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a corrupt EXIF block raises assorted types; it must not cost a decodable image
        return 1


class Transformed(NamedTuple):
    """Output of :class:`ImageTransform`."""

    pixel_values: torch.Tensor
    """(3, R, R) float32 in [-1, 1]."""
    flipped: bool
    original_size: tuple[int, int]
    """(height, width) of the image as stored (after EXIF rotation): SDXL's size conditioning."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image: SDXL's crop conditioning."""


class ImageTransform:
    """Resize the shorter side to ``resolution``, crop a square, maybe flip, and scale to [-1, 1].

    The paper's recipe is center crop + random horizontal flip at 512 px. Resampling is PIL's bicubic: PIL
    widens the filter with the downscale factor, so it is antialiased (unlike ``torch`` interpolation without
    ``antialias``); compared with Lanczos it overshoots (rings) less around hard edges such as the text and
    logos common in web images, and it costs less.

    Memory stays bounded for any input: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still covers
    the target size (``Image.draft``), only the crop window (plus a filter margin) is converted, and the
    resize first box-reduces by an integer factor (``reducing_gap``), so a 10000x200 image never becomes a
    25600x512 intermediate. Tiny images are upscaled.

    Every random choice comes from the generator passed in, in a fixed order: flip first (so the flip of a
    slot does not depend on the image size), then the crop's top, then its left.

    Args:
        resolution: Output side R.
        center_crop: Center crop if True, else a random crop.
        random_flip: Flip horizontally with probability 1/2.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = True) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip})"
        )

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Transformed:
        """Transforms one image.

        Args:
            image: A PIL image, ideally not loaded yet (see :func:`open_image`) so that JPEG draft mode helps.
            generator: Source of the flip and crop decisions.

        Returns:
            The pixels and the choices made.
        """
        size = self.resolution
        flipped = bool(torch.rand((), generator=generator) < 0.5) if self.random_flip else False

        stored_w, stored_h = image.size
        orientation = _exif_orientation(image)
        width, height = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
        scale = size / min(width, height)
        resized_w, resized_h = max(size, round(width * scale)), max(size, round(height * scale))
        if self.center_crop:
            top, left = (resized_h - size) // 2, (resized_w - size) // 2
        else:
            top = int(torch.randint(0, resized_h - size + 1, (), generator=generator))
            left = int(torch.randint(0, resized_w - size + 1, (), generator=generator))

        # Decode big JPEGs at a reduced scale that still covers the resized image (a no-op for other formats).
        image.draft(None, (math.ceil(stored_w * scale), math.ceil(stored_h * scale)))
        if orientation in _ORIENTATION_FIX:
            image = image.transpose(_ORIENTATION_FIX[orientation])  # loads the pixels
        # The crop window in the coordinates of the (possibly draft-reduced) loaded image.
        fx, fy = image.width / width, image.height / height
        box = (left / scale * fx, top / scale * fy, (left + size) / scale * fx, (top + size) / scale * fy)
        box = (box[0], box[1], min(box[2], image.width), min(box[3], image.height))
        # Cut the window with a margin for the filter's support before converting, to bound memory.
        margin = 2 * math.ceil(max(fx, fy) / scale) + 2
        x0, y0 = max(0, math.floor(box[0]) - margin), max(0, math.floor(box[1]) - margin)
        x1, y1 = min(image.width, math.ceil(box[2]) + margin), min(image.height, math.ceil(box[3]) + margin)
        window = to_rgb(image.crop((x0, y0, x1, y1)))
        out = window.resize(
            (size, size),
            Image.Resampling.BICUBIC,
            box=(box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0),
            reducing_gap=3.0,  # >= 3 is indistinguishable from a one-step resize (PIL docs)
        )
        if flipped:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)  # (3, R, R)
        pixels = pixels.to(torch.float32).div_(127.5).sub_(1.0)
        return Transformed(pixels, flipped, (height, width), (top, left))


def clean_caption(caption: Any) -> list[str]:
    """The usable captions of a record, stripped.

    Args:
        caption: A string, UTF-8 bytes, or a list of them (several captions per image).

    Returns:
        One or more non-empty captions.

    Raises:
        BadRecordError: If there is no usable caption (None, empty, not text, not valid UTF-8).
    """
    items = list(caption) if isinstance(caption, (list, tuple)) else [caption]
    captions, problems = [], []
    for item in items:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"caption is not valid UTF-8 ({exc})")
                continue
        if not isinstance(item, str):
            problems.append("no caption" if item is None else f"caption is a {type(item).__name__}, not text")
            continue
        try:
            item.encode("utf-8")  # lone surrogates: undecodable bytes kept by the CSV reader
        except UnicodeEncodeError:
            problems.append("caption is not valid UTF-8")
            continue
        if item.strip():
            captions.append(item.strip())
        else:
            problems.append("empty caption")
    if not captions:
        raise BadRecordError("; ".join(problems) if problems else "empty caption list")
    return captions


def load_sample(record: Record, transform: ImageTransform, seed: int, step: int, position: int) -> dict[str, Any]:
    """Decodes and transforms one record for slot ``(step, position)`` of the global batch.

    Args:
        record: ``(image, caption, record_id)`` from a source.
        transform: The image transform.
        seed: The run's seed.
        step: Global step of the batch.
        position: Position of the sample within the global batch.

    Returns:
        The sample fields ``pixel_values``, ``caption``, ``record_id``, ``flipped``, ``original_size``,
        ``crop_top_left``.

    Raises:
        BadRecordError: If the record is unusable; the message names the record and the error.
    """
    image, caption, record_id = record
    generator = sample_generator(seed, step, position, STREAM_DATA)
    try:
        captions = clean_caption(caption)
        out = transform(open_image(image), generator)
    except BadRecordError as exc:
        raise BadRecordError(f"{record_id}: {exc}") from exc
    except Exception as exc:
        # PIL's decoders raise many types on malformed input (OSError for truncated files, SyntaxError,
        # struct.error, IndexError, ZeroDivisionError, ...): any of them means this record is unusable.
        # Nothing systematic is hidden: MAX_CONSECUTIVE_BAD failures in a row still stop the run.
        raise BadRecordError(f"{record_id}: {type(exc).__name__}: {exc}") from exc
    choice = int(torch.randint(len(captions), (), generator=generator)) if len(captions) > 1 else 0
    return {
        "pixel_values": out.pixel_values,
        "caption": captions[choice],
        "record_id": record_id,
        "flipped": out.flipped,
        "original_size": out.original_size,
        "crop_top_left": out.crop_top_left,
    }


# ---------------------------------------------------------------------------------------------------------
# Sampling and datasets


class SampleRef(NamedTuple):
    """One slot of a global batch: which dataset index fills it, at which step, at which position."""

    index: int
    step: int
    position: int
    """Index within the *global* batch (not the process's share), so augmentation ignores world size."""


class GlobalBatchSampler:
    """Which dataset indices form each global batch, as a pure function of ``(seed, step)``.

    Epoch ``e`` visits the dataset in the order ``torch.randperm(num_samples)`` seeded with
    ``mix_seed(seed, e)``; global batch ``step`` takes the next ``global_batch_size`` indices of that order.
    A batch never spans two epochs: with ``drop_last`` the remainder of an epoch shorter than a batch is
    dropped; without it, the last batch is completed from the start of the same epoch's order. Process
    ``rank`` gets the contiguous slice ``[rank * L, (rank + 1) * L)`` with ``L = global_batch_size //
    world_size``, so the ranks' slices, in rank order, are exactly the single-process batch.

    Use it as a DataLoader ``batch_sampler``: each item is a list of :class:`SampleRef` for one step.

    Args:
        num_samples: Dataset size.
        global_batch_size: Samples per step over all processes (per optimizer step if you accumulate
            gradients: then split the process's slice into micro-batches yourself, or count micro-steps).
        seed: The run's seed.
        rank: This process's index.
        world_size: Number of processes.
        start_step: First step to yield (resume: the order continues exactly).
        drop_last: Drop each epoch's incomplete last batch (else pad it from the same epoch).
        max_steps: Stop before this step (``len()`` is then defined); None iterates forever.

    Raises:
        ValueError: On a batch size that does not split evenly over the processes, or an empty epoch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        drop_last: bool = True,
        max_steps: int | None = None,
    ) -> None:
        if global_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need global_batch_size >= 1 and 0 <= rank < world_size, got "
                f"global_batch_size={global_batch_size}, rank={rank}, world_size={world_size}"
            )
        if global_batch_size % world_size:
            lower = global_batch_size - global_batch_size % world_size
            raise ValueError(
                f"global batch size {global_batch_size} does not split evenly over {world_size} processes; "
                f"use a multiple of {world_size} (e.g. {lower or world_size} or {lower + world_size}), so that "
                f"every process gets the same share and results do not depend on the number of processes"
            )
        if num_samples < 1 or (drop_last and num_samples < global_batch_size):
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {global_batch_size} with drop_last=True"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.drop_last = drop_last
        self.max_steps = max_steps
        self.local_batch_size = global_batch_size // world_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def epoch_of(self, step: int) -> int:
        """The epoch that global batch ``step`` belongs to."""
        return step // self.steps_per_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The dataset order of ``epoch``: a permutation of ``range(num_samples)``."""
        if epoch != self._epoch:  # one permutation per epoch, reused by its steps
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._order = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        return self._order

    def global_indices(self, step: int) -> list[int]:
        """The dataset indices of global batch ``step``, all processes together."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        slots = torch.arange(offset * self.global_batch_size, (offset + 1) * self.global_batch_size)
        return self.epoch_order(epoch)[slots % self.num_samples].tolist()

    def batch(self, step: int) -> list[SampleRef]:
        """This process's share of global batch ``step``."""
        first = self.rank * self.local_batch_size
        indices = self.global_indices(step)[first : first + self.local_batch_size]
        return [SampleRef(index, step, first + j) for j, index in enumerate(indices)]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        steps = count(self.start_step) if self.max_steps is None else range(self.start_step, self.max_steps)
        for step in steps:
            yield self.batch(step)

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("GlobalBatchSampler without max_steps is infinite and has no len()")
        return max(0, self.max_steps - self.start_step)


def _log_skip(counter: int, reason: str) -> None:
    # Rate-limited: a dataset with 1% bad records would otherwise flood the log.
    if counter <= 10 or counter & (counter - 1) == 0:
        logger.warning("skipped bad record (%d so far in this worker): %s", counter, reason)


class DistillDataset(Dataset):
    """Map-style dataset of transformed samples, indexed by :class:`SampleRef`.

    ``dataset[ref]`` is a pure function of ``(source, transform, seed, ref)``: the same slot gives the same
    pixels in any process or worker. A bad record is replaced by index ``(index + k) % len`` for the
    smallest ``k`` that works, with the generator of the same slot, and the reasons are returned in
    ``skipped``; ``MAX_CONSECUTIVE_BAD`` bad records in a row raise.

    Args:
        source: Random access to raw records.
        transform: The image transform.
        seed: The run's seed.
        max_samples: Use only the first N records (quick runs); None uses all.

    Returns of ``__getitem__``: a dict with ``pixel_values`` (3, R, R) float32 in [-1, 1], ``caption`` str,
    ``index`` (the index actually used), ``step``, ``position``, ``flipped``, ``skipped`` (list of
    "record: reason"), ``record_id``, ``original_size`` (h, w) and ``crop_top_left`` (top, left).
    """

    def __init__(self, source: Source, transform: ImageTransform, seed: int, max_samples: int | None = None) -> None:
        self.length = len(source) if max_samples is None else min(len(source), max_samples)
        if self.length < 1:
            raise ValueError(f"the data source is empty (len {len(source)}, max_samples {max_samples})")
        self.source = source
        self.transform = transform
        self.seed = seed
        self._num_skipped = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        if not isinstance(ref, SampleRef):
            raise TypeError(
                f"DistillDataset is indexed by SampleRef(index, step, position), got {ref!r}; "
                "use GlobalBatchSampler as the DataLoader's batch_sampler"
            )
        skipped: list[str] = []
        for k in range(min(MAX_CONSECUTIVE_BAD, len(self))):
            index = (ref.index + k) % len(self)
            try:
                sample = load_sample(self.source[index], self.transform, self.seed, ref.step, ref.position)
            except BadRecordError as exc:
                skipped.append(str(exc))
                self._num_skipped += 1
                _log_skip(self._num_skipped, str(exc))
                continue
            return {**sample, "index": index, "step": ref.step, "position": ref.position, "skipped": skipped}
        raise RuntimeError(
            f"{len(skipped)} consecutive records from index {ref.index} are unusable; the data or its paths "
            f"are broken. First reasons:\n  " + "\n  ".join(skipped[:5])
        )


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collates samples into a batch (a module-level function, so that workers can pickle it).

    Returns:
        ``pixel_values`` (B, 3, R, R); ``caption`` and ``record_id`` lists; ``index``, ``step``, ``position``
        int64 (B,); ``flipped`` bool (B,); ``original_size`` and ``crop_top_left`` int64 (B, 2); ``skipped``:
        every sample's skip reasons, concatenated.
    """
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "record_id": [s["record_id"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "step": torch.tensor([s["step"] for s in samples], dtype=torch.long),
        "position": torch.tensor([s["position"] for s in samples], dtype=torch.long),
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "skipped": [reason for s in samples for reason in s["skipped"]],
    }


# ---------------------------------------------------------------------------------------------------------
# Webdataset shards


def _import_webdataset() -> Any:
    try:
        import webdataset
    except ImportError as exc:
        raise ImportError("WebDatasetSource needs the webdataset package: pip install webdataset") from exc
    return webdataset


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Expands brace patterns (``data/{00000..00099}.tar``) and ``::``-separated lists into shard URLs."""
    expand_urls = _import_webdataset().shardlists.expand_urls
    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [url for pattern in patterns for url in expand_urls(str(pattern))]


class WebDatasetSource(IterableDataset):
    """Streams image–text pairs from webdataset tar shards (for millions of pairs), split over processes and
    dataloader workers, and yields the same samples as :class:`DistillDataset`.

    Layout of the stream. In epoch ``e`` the shard list is shuffled with ``mix_seed(seed, e)``; process
    ``rank`` takes every ``world_size``-th shard of it, and its ``num_workers`` readers (dataloader workers)
    every ``num_workers``-th of those, so each shard is read by exactly one worker of one process per epoch.
    Each reader chains its epochs into an endless stream, passes it through a seeded shuffle buffer, and the
    DataLoader (``batch_size=self.batch_size``) collects a batch from one worker at a time, round robin: the
    process's batch ``i`` (step ``start_step + i``) is built by one reader from ``batch_size`` consecutive
    samples of its stream, and sample ``j`` of it sits at global position ``rank * batch_size + j``.

    Bad samples (undecodable image, missing or empty caption, no image key) are replaced by the next good
    sample of the same reader's stream (transformed with the replaced slot's generator), so the stream keeps
    one output per tar sample; their reasons are in ``skipped``. Unreadable shards or tar members are skipped
    and logged by the webdataset reader.

    What is deterministic:
        - Given (shards, seed, world_size, num_workers, batch_size), the whole stream: which sample fills
          which (step, position), its flip and crop (from ``sample_generator(seed, step, position,
          STREAM_DATA)``, as in the map-style path), and every replacement of a bad sample.
        - Resume: ``start_step=S`` gives exactly the batches S, S+1, ... of the uninterrupted run with the
          same world_size, num_workers and batch_size. Each worker re-reads and skips the first samples of its
          reader's stream (``samples_to_skip``): tar bytes only, no image decoding, but I/O proportional to S.
    What is not:
        - The data order changes with world_size, num_workers or batch_size (shards are dealt to readers);
          only the augmentation of a given (step, position) is fixed. Use the map-style sources when results
          must be identical across process and worker counts.
        - Readers advance through epochs independently: an "epoch" is per reader, not a global pass in
          lockstep, and which samples meet in one batch depends on the shuffle buffer.
        - ``index`` is -1 (streams have no global index); ``record_id`` is ``url:key``.

    Args:
        urls: Shard URLs or brace patterns (anything ``webdataset`` can open: local paths, ``pipe:``...).
        transform: The image transform.
        seed: The run's seed.
        batch_size: Samples per process per step (the DataLoader must use this batch size).
        rank: This process's index.
        world_size: Number of processes.
        start_step: First step to produce (resume).
        shuffle_buffer: Samples held by each reader's shuffle buffer (0 or 1: no sample shuffle).
        image_keys: Tar extensions tried for the image, in order.
        caption_keys: Tar extensions tried for the caption, in order (``json``: its ``json_caption_field``).
        json_caption_field: Caption field of a ``.json`` member.

    Raises:
        ImportError: If ``webdataset`` is not installed.
        ValueError: If the patterns expand to fewer shards than processes.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: ImageTransform,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        shuffle_buffer: int = 1000,
        image_keys: Sequence[str] = IMAGE_KEYS,
        caption_keys: Sequence[str] = CAPTION_KEYS,
        json_caption_field: str = "text",
    ) -> None:
        self.shards = expand_shards(urls)
        if len(self.shards) < world_size:
            raise ValueError(
                f"{len(self.shards)} shard(s) cannot feed {world_size} processes: each shard is read by exactly "
                "one reader, so use at least one shard per process (and per dataloader worker)"
            )
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}")
        self.transform = transform
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.shuffle_buffer = shuffle_buffer
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.caption_keys = tuple(k.lower() for k in caption_keys)
        self.json_caption_field = json_caption_field
        self._num_skipped = 0

    def shards_for(self, epoch: int, reader: int = 0, num_readers: int = 1) -> list[str]:
        """The shards that reader ``reader`` of ``num_readers`` in this process reads in ``epoch``."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        return [self.shards[i] for i in order][self.rank :: self.world_size][reader::num_readers]

    def samples_to_skip(self, worker: int, num_workers: int) -> tuple[int, int]:
        """For a resumed stream: (reader whose stream worker ``worker`` continues, samples it skips).

        In the uninterrupted run the process's batch ``i`` comes from worker ``i % num_workers``; after a
        resume at S the DataLoader asks worker ``w`` for batches S + w, S + w + num_workers, ..., which that
        run built with reader ``(S + w) % num_workers`` after ``(S + w) // num_workers`` earlier batches.
        """
        reader, batches_before = (self.start_step + worker) % num_workers, (self.start_step + worker) // num_workers
        return reader, batches_before * self.batch_size

    def _on_error(self, exc: Exception) -> bool:
        logger.warning("webdataset: skipping unreadable shard data: %s", exc)
        return True  # continue with the next member or shard

    def raw_samples(self, reader: int = 0, num_readers: int = 1) -> Iterator[dict[str, Any]]:
        """The endless stream of raw tar samples (dicts of bytes) of one reader, before the shuffle buffer."""
        from webdataset.tariterators import tarfile_samples

        for epoch in count():
            shards = self.shards_for(epoch, reader, num_readers)
            if not shards:
                raise ValueError(
                    f"{len(self.shards)} shards cannot feed {self.world_size} process(es) x {num_readers} "
                    "dataloader workers: each shard is read by exactly one worker, so use fewer workers or more "
                    "shards"
                )
            num_read = 0
            for sample in tarfile_samples(({"url": url} for url in shards), handler=self._on_error):
                num_read += 1
                yield sample
            if num_read == 0:
                raise RuntimeError(f"no sample could be read from the {len(shards)} shard(s) {shards[:3]}...")

    def _shuffled(self, samples: Iterator[dict[str, Any]], reader: int, num_readers: int) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(mix_seed(self.seed, STREAM_DATA, self.rank, self.world_size, reader, num_readers))
        buffer = list(islice(samples, self.shuffle_buffer))
        for sample in samples:  # endless: the buffer never needs draining
            slot = rng.randrange(len(buffer))
            yield buffer[slot]
            buffer[slot] = sample

    def _record(self, sample: dict[str, Any]) -> Record:
        record_id = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        caption: Any = None
        for key in self.caption_keys:
            if key not in sample:
                continue
            caption = sample[key]
            if key == "json":
                try:
                    caption = json.loads(caption).get(self.json_caption_field)
                except (ValueError, AttributeError):  # undecodable JSON, or not an object
                    caption = None
            if caption is not None:
                break
        return image, caption, record_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, skip = self.samples_to_skip(worker, num_workers)
        stream = islice(self._shuffled(self.raw_samples(reader, num_workers), reader, num_workers), skip, None)
        ahead: deque[dict[str, Any]] = deque()
        for batch_number in count():
            step = self.start_step + worker + batch_number * num_workers
            for j in range(self.batch_size):
                yield self._next_sample(stream, ahead, step, self.rank * self.batch_size + j)

    def _next_sample(self, stream: Iterator[dict], ahead: deque, step: int, position: int) -> dict[str, Any]:
        skipped: list[str] = []
        for k in range(MAX_CONSECUTIVE_BAD):
            while len(ahead) <= k:  # look ahead without consuming: the replacement also fills its own slot
                ahead.append(next(stream))
            try:
                sample = load_sample(self._record(ahead[k]), self.transform, self.seed, step, position)
            except BadRecordError as exc:
                skipped.append(str(exc))
                self._num_skipped += 1
                _log_skip(self._num_skipped, str(exc))
                continue
            ahead.popleft()
            return {**sample, "index": -1, "step": step, "position": position, "skipped": skipped}
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_BAD} consecutive samples of the shards are unusable. First reasons:\n  "
            + "\n  ".join(skipped[:5])
        )

    def dataloader(self, num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A DataLoader with the batch size and collate function this stream was laid out for."""
        return DataLoader(self, batch_size=self.batch_size, collate_fn=collate, num_workers=num_workers, **kwargs)
