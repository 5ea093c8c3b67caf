"""What a data source hands over, and how data fails.

A source gives random access to raw records ``(image, caption, record_id)`` (:class:`Source`); the sources
themselves are in :mod:`bksdm.train.data.sources` (folders with a metadata file), :mod:`bksdm.train.data.hub`
(Hugging Face ``datasets``) and :mod:`bksdm.train.data.shards` (webdataset tar shards). Every data fault is a
:class:`DataError` (a ``ValueError``) whose message names the file, the line or the record and says how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

ImageData = bytes | str | os.PathLike | Image.Image | None
"""An image as a source hands it over: encoded bytes, a file path, a PIL image, or ``None`` (missing)."""
Record = tuple[ImageData, Any, str]
"""A raw record ``(image, caption, record_id)``; the caption is unchecked (may be None, bytes, a list...)."""


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


class Source(Protocol):
    """Random access to raw image–text records."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


def missing_columns_error(path: Path, missing: list[str], present: Iterable[str]) -> DataError:
    """The error for a metadata file or data set that lacks a named column, listing the columns it has."""
    return DataError(
        f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}; "
        f"columns present: {sorted(present)}. Pass image_column=/caption_column= to name yours."
    )
