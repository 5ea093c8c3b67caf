"""Sources: random access to raw image–text records ``(image, caption, record_id)``.

:class:`FolderSource` reads a folder of images plus ``metadata.csv`` / ``metadata.jsonl`` (the layout of the
paper's LAION-Aesthetics subsets), :class:`HFSource` a Hugging Face ``datasets`` dataset; :func:`open_source`
picks one from a short spec. Streaming tar shards are in :mod:`bksdm.data.shards`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ImageData = bytes | str | os.PathLike | Image.Image | None
"""An image as a source hands it over: encoded bytes, a file path, a PIL image, or ``None`` (missing)."""
Record = tuple[ImageData, Any, str]
"""A raw record ``(image, caption, record_id)``; the caption is unchecked (may be None, bytes, a list...)."""

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")


class Source(Protocol):
    """Random access to raw image–text records."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


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
