"""Hugging Face ``datasets`` as a source of image–text records, with the hub's faults as :class:`DataError`."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bksdm.train.data.records import DataError, MissingPackageError, Record, missing_columns_error


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
            raise missing_columns_error(Path(self.name), missing, dataset.column_names)
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
