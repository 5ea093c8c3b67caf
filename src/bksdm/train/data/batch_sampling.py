"""Map-style sampling: which records form each global batch, and the dataset that loads them.

:class:`GlobalBatchSampler` yields this process's :class:`SampleRef` slots of each global batch;
:class:`DistillDataset` turns a slot into a transformed sample (replacing bad records deterministically);
:func:`collate` stacks samples into a batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from itertools import count
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from bksdm.seeding import mix_seed
from bksdm.train.data.images import BadRecordError, ImageTransform, load_sample
from bksdm.train.data.records import Source, UnusableDataError, unusable_message

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 100
"""This many bad records in a row means the data (or its paths) is broken, not merely noisy: stop."""


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
    ``skipped``; ``MAX_CONSECUTIVE_BAD`` bad records in a row (or all of them, in a smaller data set) raise
    :class:`UnusableDataError`, a ``ValueError`` whose message survives a DataLoader worker.

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
        if len(skipped) == len(self):
            name = getattr(self.source, "metadata", None) or getattr(self.source, "name", None) or "the data"
            headline = f"all {len(self)} records of {name} are unusable"
        else:
            headline = f"{len(skipped)} consecutive records from index {ref.index} are unusable"
        raise UnusableDataError(unusable_message(headline, skipped))


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
