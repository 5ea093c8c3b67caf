"""Sources: random access to raw image–text records ``(image, caption, record_id)``.

:class:`FolderSource` reads a folder of images plus ``metadata.csv`` / ``metadata.jsonl`` (the layout of the
paper's LAION-Aesthetics subsets), :class:`HFSource` a Hugging Face ``datasets`` dataset; :func:`open_source`
picks one from a short spec. Streaming tar shards are in :mod:`bksdm.train.data.shards`.
"""

from __future__ import annotations

import codecs
import csv
import functools
import json
import logging
import os
import socket
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ImageData = bytes | str | os.PathLike | Image.Image | None
"""An image as a source hands it over: encoded bytes, a file path, a PIL image, or ``None`` (missing)."""
Record = tuple[ImageData, Any, str]
"""A raw record ``(image, caption, record_id)``; the caption is unchecked (may be None, bytes, a list...)."""

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")

CSV_ADVICE = (
    "a field that holds commas, double quotes or line breaks must be in double quotes, with each double quote "
    'inside it doubled (""), as csv writers and spreadsheets write it'
)


class DataError(ValueError):
    """The data cannot be read as given: a missing folder or metadata file, a malformed or non-UTF-8 metadata
    file, a hub data set that cannot be reached, or records that are all unusable. The message names the file
    (and the line) and says how to fix it."""


class UnusableDataError(DataError):
    """Every record tried in a row was unusable (missing, corrupt or empty): the data or its paths are broken.

    Raised inside a DataLoader worker, it reaches the main process re-created by torch from a message that
    wraps the worker's whole traceback; the constructor keeps only the original message, so that the user
    sees the cause, not a traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__}") and marker in message:
            message = message[message.rindex(marker) + len(marker) :].rstrip("\n")
        super().__init__(message)


def require_usable(num_usable: int, skipped: list[str], data: str) -> None:
    """Refuses data of which not one record could be used (e.g. at the end of ``bksdm cache``).

    Args:
        num_usable: Records that loaded.
        skipped: The reasons of those that did not (``"record: reason"``).
        data: The data spec, for the message.

    Raises:
        UnusableDataError: If ``num_usable`` is 0, with the first reasons and what to check.
    """
    if num_usable == 0:
        raise UnusableDataError(unusable_message(f"all {len(skipped)} records of {data} are unusable", skipped))


PATHS_HINT = " (image paths in a metadata file are relative to its folder)"


def unusable_message(headline: str, skipped: list[str], hint: str = PATHS_HINT) -> str:
    """``headline``, the first reasons, and what usually causes it."""
    reasons = "\n  ".join(skipped[:5]) + ("\n  ..." if len(skipped) > 5 else "")
    return f"{headline}: the data or its paths are broken{hint}. First reasons:\n  {reasons}"


class MissingPackageError(DataError, ImportError):
    """An optional package a data source needs is not installed (the message gives the install command)."""


# Byte-order marks of the encodings a spreadsheet or an editor may save text in (UTF-32 first: its
# little-endian mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def check_utf8_start(path: Path, error: type[ValueError] = DataError) -> None:
    """Refuses a text file saved as UTF-16 or UTF-32, before its header is read as mangled column names.

    A UTF-8 byte-order mark is fine (readers strip it). UTF-16/32 are recognised by their byte-order mark, or
    without one by NUL bytes in the first line (text never holds NUL; UTF-16 puts one beside every ASCII
    character).

    Raises:
        error: Naming the file, the encoding found and how to save it as UTF-8.
    """
    with path.open("rb") as f:
        head = f.read(4096)
    for bom, name in _BOMS:
        if head.startswith(bom):
            found = f"is saved as {name} (it starts with a {name} byte-order mark)"
            break
    else:
        if b"\x00" not in head.split(b"\n", 1)[0]:
            return
        name = "UTF-16"
        found = "holds NUL bytes in its first line: it is probably saved as UTF-16 or UTF-32 without a byte-order mark"
    raise error(
        f"{path} {found}, but bksdm reads text files as UTF-8. Save it as UTF-8 (a spreadsheet's 'CSV UTF-8' "
        f"format, or: iconv -f {name} -t UTF-8 {path.name} > utf8-{path.name})"
    )


def utf8_error(path: Path, error: type[ValueError] = DataError) -> ValueError:
    """The error for a file that is not valid UTF-8: its first bad line, the byte offset and the bytes.

    Called after a decoder failed; scans the file again line by line (only on that error path).
    """
    offset = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = line[err.start : err.start + 8]
                return error(
                    f"{path}, line {number} (byte {offset + err.start}): {bad!r} is not UTF-8 text, and bksdm reads "
                    f"text files as UTF-8. Save the file as UTF-8 (from Latin-1 or Windows-1252, e.g.: iconv -f "
                    f"CP1252 -t UTF-8 {path.name} > utf8-{path.name})"
                )
            offset += len(line)
    return error(f"{path} is not UTF-8 text; save it as UTF-8")


def csv_rows(path: Path, error: type[ValueError] = DataError) -> Iterator[tuple[int, list[str]]]:
    """The records of a UTF-8 CSV file, header first, each with the line it starts on; strictly parsed.

    Python's ``csv`` module is lenient by default: an unbalanced double quote makes it read every following
    line, up to the next quote or the end of the file, into one field, and a row with a field too many or
    too few passes. Here these are errors naming the line: a quote that is never closed, text after a
    closing quote, and a row whose field count differs from the header's. Blank lines are skipped. A
    UTF-8 byte-order mark is dropped.

    Raises:
        error: An encoding that is not UTF-8, or malformed CSV; the message names the file and the line.
    """
    check_utf8_start(path, error)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        header: list[str] | None = None
        start = 1  # the line the next record starts on
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not any(field.strip() for field in row):
                    continue  # a blank line
                if header is None:
                    header = row
                elif len(row) != len(header):
                    raise error(
                        f"{path}, line {line}: {len(row)} field{'s' if len(row) != 1 else ''}, but the header has "
                        f"{len(header)} ({','.join(header)}); {CSV_ADVICE}"
                    )
                yield line, row
        except csv.Error as err:
            if "end of data" in str(err):
                raise error(
                    f"{path}, line {start}: a double quote opened in the record that starts there is never closed "
                    f"(the field runs to the end of the file, line {reader.line_num}); {CSV_ADVICE}"
                ) from None
            if "field limit" in str(err):
                raise error(
                    f"{path}, line {start}: the record that starts there has a field longer than "
                    f"{csv.field_size_limit()} characters (by line {reader.line_num}): a double quote opened there "
                    f"and not closed?; {CSV_ADVICE}"
                ) from None
            where = f"line {reader.line_num}"
            if reader.line_num != start:
                where += f" (in the record that starts on line {start}: a double quote opened there?)"
            raise error(f"{path}, {where}: malformed CSV ({err}); {CSV_ADVICE}") from None
        except UnicodeDecodeError:
            raise utf8_error(path, error) from None


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


def _missing_columns_error(path: Path, missing: list[str], present: Iterable[str]) -> DataError:
    return DataError(
        f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}; "
        f"columns present: {sorted(present)}. Pass image_column=/caption_column= to name yours."
    )


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
            raise _missing_columns_error(self.metadata, missing, columns)
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


@functools.cache
def _image_suffixes() -> frozenset[str]:
    return frozenset(s.lower() for s in Image.registered_extensions())


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise MissingPackageError("hf: data needs the Hugging Face datasets package: pip install datasets") from exc
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
        DataError: If the split or a column is missing, the data set does not exist, or the hub cannot be
            reached (found within seconds, not after the hub client's half a minute of retries).
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
            dataset = _load_dataset(datasets, self.name, split, load_kwargs)
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


HUB_PROBE_TIMEOUT_S = 5.0
"""How long to wait for a TCP connection to the hub before calling it unreachable."""

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached, or None if a TCP connection opens (or a proxy is set).

    The hub client retries a failed request five times with backoff (about 25 s, then a traceback); one
    connection attempt tells the same in milliseconds when there is no network (DNS fails at once).
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None  # only the proxy knows; let the client try
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"
    return None


def _load_dataset(datasets: Any, name: str, split: str, load_kwargs: dict[str, Any]) -> Any:
    """``datasets.load_dataset`` with the hub's faults turned into :class:`DataError` messages."""
    local = Path(name).expanduser().exists()
    if not local and name.startswith(("/", "./", "../", "~")):
        raise DataError(f"hf:{name}: no such folder (hf: takes a hub data set name or a local datasets folder)")
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    if not local and not offline:
        reason = _hub_unreachable(datasets.config.HF_ENDPOINT)
        if reason is not None:
            raise DataError(
                f"hf:{name}: cannot reach the Hugging Face Hub ({reason}). Check the network; if the data set "
                f"was downloaded before, set HF_HUB_OFFLINE=1 to use the cached copy; or give a local copy (a "
                f"folder with metadata.csv, or hf:FOLDER saved with save_to_disk)"
            )
    try:
        return datasets.load_dataset(name, split=split, **load_kwargs)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(f"hf:{name}: {err} Check the name (and, for a gated data set, your login)") from None
    except ConnectionError as err:
        if offline:
            raise DataError(
                f"hf:{name}: HF_HUB_OFFLINE is set and the data set is not in the local cache "
                f"({datasets.config.HF_DATASETS_CACHE}); download it once with network (unset HF_HUB_OFFLINE), "
                f"or give a local copy"
            ) from None
        raise DataError(f"hf:{name}: cannot reach the Hugging Face Hub ({err}); check the network") from None
    except FileNotFoundError as err:
        raise DataError(f"hf:{name}: {err}") from None
    except ValueError as err:  # e.g. an unknown split: the library's message names the splits
        raise DataError(f"hf:{name}: {err}") from None


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
