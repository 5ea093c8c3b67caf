"""Webdataset tar shards: :class:`WebDatasetSource` streams millions of pairs, split over processes and
dataloader workers, with the (weaker, documented) determinism guarantees in its docstring.
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import count, islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bksdm.seeding import STREAM_DATA, mix_seed
from bksdm.train.data.batch_sampling import MAX_CONSECUTIVE_BAD, _log_skip, collate
from bksdm.train.data.images import BadRecordError, ImageTransform, load_sample
from bksdm.train.data.records import MissingPackageError, Record, UnusableDataError, unusable_message

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "json")


def _import_webdataset() -> Any:
    try:
        import webdataset
    except ImportError as exc:
        raise MissingPackageError("webdataset shards need the webdataset package: pip install webdataset") from exc
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
                raise UnusableDataError(
                    f"no sample could be read from the {len(shards)} shard(s) {shards[:3]}...: are they tar files "
                    "of webdataset samples (KEY.jpg + KEY.txt)?"
                )

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
        raise UnusableDataError(
            unusable_message(f"{MAX_CONSECUTIVE_BAD} consecutive samples of the shards are unusable", skipped, "")
        )

    def dataloader(self, num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A DataLoader with the batch size and collate function this stream was laid out for."""
        return DataLoader(self, batch_size=self.batch_size, collate_fn=collate, num_workers=num_workers, **kwargs)
