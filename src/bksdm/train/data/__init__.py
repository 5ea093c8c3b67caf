"""Image–text data for distillation: sources, the image transform, a global batch sampler and datasets.

The data a run sees is a pure function of ``(seed, step, position in the global batch)``, never of the number
of processes or dataloader workers, so that a run split across N GPUs, or resumed at step S, trains on the
same samples with the same augmentations as one uninterrupted single-process run:

- :class:`GlobalBatchSampler` decides which dataset indices form global batch ``step`` (a seeded permutation
  per epoch); process ``rank`` takes its contiguous slice of that batch.
- :class:`DistillDataset` loads one :class:`SampleRef` and draws every random choice for it (flip, crop
  offset, which of several captions) from ``sample_generator(seed, step, position, STREAM_DATA)``.
- A bad record (missing or corrupt image, empty caption) is replaced by the next index, deterministically,
  so batches keep their size and stay reproducible; the reasons travel with the batch in ``skipped``. Data in
  which no record is usable raises :class:`UnusableDataError`.

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

The package is split by concept; everything public is re-exported here, so import from ``bksdm.train.data``:

- :mod:`bksdm.train.data.records`: what a source hands over (:data:`Record`, the :class:`Source` protocol) and
  :class:`DataError` (a ``ValueError``: missing, malformed or non-UTF-8 metadata, an unreachable hub, or
  :class:`UnusableDataError` when no record can be used).
- :mod:`bksdm.train.data.text_files`: strict reading of UTF-8 text files (the strict :func:`csv_rows`).
- :mod:`bksdm.train.data.sources`: :class:`FolderSource` (a folder plus its metadata file) and :func:`open_source`.
- :mod:`bksdm.train.data.hub`: :class:`HFSource` (a Hugging Face ``datasets`` data set).
- :mod:`bksdm.train.data.images`: decoding and transforming one record (:func:`open_image`, :func:`to_rgb`,
  :class:`ImageTransform`, :func:`clean_caption`, :func:`load_sample`, :class:`BadRecordError`).
- :mod:`bksdm.train.data.batch_sampling`: :class:`SampleRef`, :class:`GlobalBatchSampler`, :class:`DistillDataset`,
  :func:`collate`.
- :mod:`bksdm.train.data.shards`: :class:`WebDatasetSource`, :func:`expand_shards`.
"""

from bksdm.train.data.batch_sampling import MAX_CONSECUTIVE_BAD, DistillDataset, GlobalBatchSampler, SampleRef, collate
from bksdm.train.data.hub import HFSource
from bksdm.train.data.images import (
    BadRecordError,
    ImageTransform,
    Transformed,
    clean_caption,
    load_sample,
    open_image,
    to_rgb,
)
from bksdm.train.data.records import (
    DataError,
    ImageData,
    MissingPackageError,
    Record,
    Source,
    UnusableDataError,
    require_usable,
)
from bksdm.train.data.shards import CAPTION_KEYS, IMAGE_KEYS, WebDatasetSource, expand_shards
from bksdm.train.data.sources import METADATA_NAMES, FolderSource, open_source
from bksdm.train.data.text_files import csv_rows

__all__ = [
    "CAPTION_KEYS",
    "IMAGE_KEYS",
    "MAX_CONSECUTIVE_BAD",
    "METADATA_NAMES",
    "BadRecordError",
    "DataError",
    "DistillDataset",
    "FolderSource",
    "GlobalBatchSampler",
    "HFSource",
    "ImageData",
    "ImageTransform",
    "MissingPackageError",
    "Record",
    "SampleRef",
    "Source",
    "Transformed",
    "UnusableDataError",
    "WebDatasetSource",
    "clean_caption",
    "collate",
    "csv_rows",
    "expand_shards",
    "load_sample",
    "open_image",
    "open_source",
    "require_usable",
    "to_rgb",
]
