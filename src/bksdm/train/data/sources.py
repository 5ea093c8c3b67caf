"""Folder sources and :func:`open_source`: random access to raw image–text records ``(image, caption, record_id)``.

:class:`FolderSource` reads a folder of images plus ``metadata.csv`` / ``metadata.jsonl`` (the layout of the
paper's LAION-Aesthetics subsets); :func:`open_source` picks a source from a short spec: such a folder (or its
metadata file), or ``hf:NAME`` for a Hugging Face ``datasets`` data set (:mod:`bksdm.train.data.hub`).
Streaming tar shards are in :mod:`bksdm.train.data.shards`.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
from array import array
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bksdm.train.data.hub import HFSource
from bksdm.train.data.records import DataError, Record, missing_columns_error
from bksdm.train.data.text_files import CSV_ADVICE, check_utf8_start, csv_rows, utf8_error

logger = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")


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


class FolderSource:
    """A folder of images described by a metadata file (the layout of the paper's LAION-Aesthetics subsets).

    The metadata is ``metadata.csv`` (parsed strictly, see :func:`csv_rows`: captions may hold commas, quotes
    and newlines when quoted; a stray quote or a row with a field too many is an error naming the line) or
    ``metadata.jsonl`` (one JSON object per line; a caption may be a list of captions; a malformed line is an
    error naming it, as in a CSV). Both must be UTF-8. Image paths in it are relative to ``root``. Images are not
    opened here: a missing or broken file surfaces when the record is loaded, where :class:`DistillDataset`
    skips it.

    Args:
        root: The folder holding the images (and, unless ``metadata`` says otherwise, the metadata file).
        metadata: Path of the metadata file (absolute, or relative to ``root``); found in ``root`` if None.
        image_column: Column holding the image path.
        caption_column: Column holding the caption.

    Raises:
        DataError: If the folder or the metadata file does not exist, the file is empty, not UTF-8, malformed
            CSV or a JSONL line that is not a JSON object (naming the line), a column is missing (naming the
            file, the column and the columns present), the metadata format is unknown, or it holds no records.
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
            raise DataError(f"image folder not found: {self.root}")
        self.metadata = self._find_metadata(metadata)
        self.image_column = image_column
        self.caption_column = caption_column
        self._files = _StringTable()
        self._captions = _StringTable()
        if self.metadata.stat().st_size == 0:
            raise DataError(f"{self.metadata} is empty; {self._layout_hint()}")
        if self.metadata.suffix.lower() == ".csv":
            self._read_csv()
        elif self.metadata.suffix.lower() in (".jsonl", ".json"):
            self._read_jsonl()
        else:
            raise DataError(f"{self.metadata}: unknown metadata format (expected .csv or .jsonl)")
        self._files.freeze()
        self._captions.freeze()
        if len(self) == 0:
            raise DataError(f"{self.metadata} holds no records; {self._layout_hint()}")
        logger.info("%s: %d records", self.metadata, len(self))

    def _layout_hint(self) -> str:
        if self.metadata.suffix.lower() == ".csv":
            return (
                f"it needs a header line naming the columns ({self.image_column},{self.caption_column}) and then "
                f"one line per image, e.g. 0001.jpg,a photo of a cat"
            )
        example = json.dumps({self.image_column: "0001.jpg", self.caption_column: "a photo of a cat"})
        return f"it needs one JSON object per image and line, e.g. {example}"

    def _find_metadata(self, metadata: str | os.PathLike | None) -> Path:
        if metadata is not None:
            path = Path(metadata)
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise DataError(f"metadata file not found: {path}")
            return path
        found = [self.root / name for name in METADATA_NAMES if (self.root / name).is_file()]
        if not found:
            raise DataError(
                f"{self.root} has no {' or '.join(METADATA_NAMES)}: a data folder needs one, listing each image "
                f"file (relative to the folder) with its caption, e.g. metadata.csv with the lines "
                f"'file_name,text' and '0001.jpg,a photo of a cat' (or pass the metadata file itself)"
            )
        if len(found) > 1:
            logger.warning("%s holds both %s; using %s", self.root, " and ".join(METADATA_NAMES), found[0].name)
        return found[0]

    def _read_csv(self) -> None:
        rows = csv_rows(self.metadata)
        first = next(rows, None)
        if first is None:
            raise DataError(f"{self.metadata} holds only blank lines; {self._layout_hint()}")
        columns = first[1]
        missing = [c for c in (self.image_column, self.caption_column) if c not in columns]
        if missing:
            raise missing_columns_error(self.metadata, missing, columns)
        image_at, caption_at = columns.index(self.image_column), columns.index(self.caption_column)
        for line, row in rows:
            for field in row:
                if "\n" in field or "\r" in field:
                    self._check_swallowed_rows(line, field, len(columns), image_at)
            self._files.append(row[image_at] or None)
            self._captions.append(row[caption_at])

    def _check_swallowed_rows(self, line: int, field: str, width: int, image_at: int) -> None:
        """Refuses a multi-line field whose later lines look like rows of this file.

        A stray double quote that another one closes lines later reads as valid CSV: one record whose field
        holds the rows in between. A line inside a field that parses as a full row naming an image file is
        almost certainly such a swallowed row, not a caption.
        """
        suffixes = _image_suffixes()
        for offset, text in enumerate(field.splitlines()[1:], start=1):
            parsed = next(csv.reader([text]), [])
            if len(parsed) == width and Path(parsed[image_at].strip()).suffix.lower() in suffixes:
                raise DataError(
                    f"{self.metadata}, line {line}: a double quote in the record that starts there is closed only "
                    f"{offset} line(s) later, so the rows in between became part of one field (e.g. "
                    f"{text[:80]!r}); {CSV_ADVICE}"
                )

    def _read_jsonl(self) -> None:
        check_utf8_start(self.metadata)
        bad_lines: list[int] = []
        columns: set[str] = set()
        with self.metadata.open("rb") as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    text = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise utf8_error(self.metadata) from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as err:
                    row, reason = None, f"not valid JSON ({err.msg} at character {err.pos + 1})"
                except RecursionError:
                    row, reason = None, "JSON nested too deeply to read"
                else:
                    reason = f"a JSON {type(row).__name__ if row is not None else 'null'}, not an object"
                if not isinstance(row, dict):
                    bad_lines.append((line_number, reason))
                    continue
                columns.update(row)
                image = row.get(self.image_column)
                self._files.append(image if isinstance(image, str) and image else None)
                self._captions.append(row.get(self.caption_column))
        if not columns and not bad_lines:
            raise DataError(f"{self.metadata} holds only blank lines; {self._layout_hint()}")
        if not columns:
            raise DataError(
                f"{self.metadata}: none of its {len(bad_lines)} line(s) is a JSON object (first bad line: "
                f"{bad_lines[0][0]}, {bad_lines[0][1]}); {self._layout_hint()}"
            )
        if bad_lines:
            # Never drop records silently: a data set shortened without a word trains on less than the user
            # gave, or fails later on a count that names no line (as a stray quote in a CSV would).
            line_number, reason = bad_lines[0]
            more = f" (and {len(bad_lines) - 1} more malformed line(s))" if len(bad_lines) > 1 else ""
            raise DataError(
                f"{self.metadata}, line {line_number}: {reason}{more}; {self._layout_hint()}, each on one line "
                f"(a caption's line breaks written as \\n); fix or delete the line"
            )
        missing = [c for c in (self.image_column, self.caption_column) if c not in columns]
        if missing:
            raise missing_columns_error(self.metadata, missing, columns)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Record:
        file_name = self._files[index]
        caption = self._captions[index]
        if file_name is None:
            return None, caption, f"{self.metadata}[record {index}]"
        path = self.root / file_name
        return path, caption, str(path)


@functools.cache
def _image_suffixes() -> frozenset[str]:
    return frozenset(s.lower() for s in Image.registered_extensions())


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
