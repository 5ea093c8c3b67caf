"""``bksdm cache``: encode a data set once (VAE latent distribution + text embeddings) for distillation.

The VAE encoder alone is about a third of a training step's MACs at 512 px (REFERENCE.md: 541G of the
encoder against ~1.6T for the teacher and student U-Net passes with their backward), and the text encoder
runs for every sample too; a cache removes both from the loop. For the transformer teachers the text encoders
weigh more still: SD3 runs two CLIPs and T5-XXL (4.8B parameters), FLUX.1 CLIP-L and T5-XXL, every step. What is
stored is exactly what :func:`bksdm.train.encoders.encode_images` and the family's ``encode_prompt``
(:mod:`bksdm.families`) return, so training on the cache equals training on the images (bit for bit in float32).
With flipping on, both flip variants are stored and the per-sample flip decision of the trainer picks one.

The text states are what the teacher's pipeline feeds its denoiser: SD-v1/v2 one CLIP's states; SDXL both CLIPs'
penultimate states and the pooled embedding; SD3 CLIP-L and CLIP-G concatenated, padded to T5's width, with
T5's states appended, and both CLIPs' pooled projections; FLUX.1 T5's states and CLIP-L's pooled output. T5-XXL's
states are 4096 wide, 2.7 MB a sample for SD3 (333 tokens) and 4.2 MB for FLUX.1-dev (512 tokens) in fp16, which is
why the default storage dtype is fp16; the sizes on disk are reported in ``cache.json`` and the log.

Layout of a cache folder::

    cache.json                 what was encoded, by which teacher (and family), at which resolution; counts; sizes
    shard-00000.safetensors    mean, std[, mean_flip, std_flip], text[, pooled]  (N rows each)
    shard-00000.json           captions and record ids of the rows; the source index range it covers
    ...

Shards are written atomically and a rerun skips the finished ones, so an interrupted cache resumes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bksdm import __version__
from bksdm.artifacts import atomic_file, write_text
from bksdm.devices import parse_dtype
from bksdm.families import family_of
from bksdm.loading import load_denoiser_config, load_pipeline, teacher_or_default
from bksdm.plan.render import human
from bksdm.seeding import STREAM_DATA, sample_generator
from bksdm.train.config import DistillConfig
from bksdm.train.data import BadRecordError, ImageTransform, SampleRef, load_sample, open_source, require_usable
from bksdm.train.encoders import encode_images, freeze, text_encoder_modules

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
FORMAT_VERSION = 1


class CacheError(ValueError):
    """The cache folder is missing, incomplete, or does not fit the training config."""


class _Records(Dataset):
    """Source records decoded and center-transformed without flipping (flips are encoded separately)."""

    def __init__(self, source, transform: ImageTransform, start: int, stop: int):
        self.source, self.transform, self.start, self.stop = source, transform, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.start + i
        try:
            # No randomness is drawn: no flip here, and a cache requires center crops.
            sample = load_sample(self.source[index], self.transform, 0, 0, 0)
        except BadRecordError as err:
            return {"index": index, "error": str(err)}
        return {"index": index, **sample}


def _collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return samples


def build_cache(
    cfg: DistillConfig,
    out: str | os.PathLike,
    *,
    shard_size: int = 1024,
    batch_size: int | None = None,
    dtype: str = "fp16",
    device: str | None = None,
) -> dict[str, Any]:
    """Encodes ``cfg.data.train`` with ``cfg.model.teacher``'s VAE and text encoders into ``out``.

    Args:
        cfg: The distillation config (model.teacher, data.train, resolution, crop, flip, columns are read).
        out: The cache folder; finished shards already there are kept (resume).
        shard_size: Source records per shard.
        batch_size: Encoder batch size; None sizes it to the memory available (at most
            :data:`MAX_AUTO_BATCH`, see :func:`auto_batch_size`).
        dtype: Storage dtype of every tensor: ``fp16`` (half the disk; the default, for T5-XXL's 4096-wide states
            above all), ``bf16``, or ``fp32`` (bit-exact with uncached training).
        device: Where to run the encoders (default: cuda if available).

    Returns:
        The cache's metadata (also written to ``out/cache.json``), with its size on disk under ``bytes``.
    """
    if batch_size is not None and batch_size < 1:
        raise CacheError(f"--batch-size {batch_size}: must be >= 1 (or left out to size it to the memory)")
    if shard_size < 1:
        raise CacheError(f"--shard-size {shard_size}: must be >= 1")
    if not cfg.data.train:
        raise CacheError("data.train is not set: give the image-text folder or hf:NAME to encode")
    if not cfg.data.center_crop:
        raise CacheError("a cache stores one crop per image: use data.center_crop=true (the paper's setting)")
    store = parse_dtype(dtype)
    teacher = teacher_or_default(cfg.model.teacher)
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = open_source(cfg.data.train, **_columns(cfg))  # bad data fails before the folder is made
    if out.exists() and not out.is_dir():
        raise CacheError(f"--out {out} is a file; give a folder for the cache")
    out.mkdir(parents=True, exist_ok=True)
    total = len(source) if cfg.data.max_samples is None else min(len(source), cfg.data.max_samples)
    meta = {
        "format": FORMAT_VERSION,
        "bksdm_version": __version__,
        "teacher": teacher,
        "data": cfg.data.train,
        "resolution": cfg.data.resolution,
        "flips": cfg.data.random_flip,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_source_records": total,
    }
    previous = out / CACHE_FILE
    if previous.is_file():
        old = json.loads(previous.read_text())
        changed = {k: (old.get(k), v) for k, v in meta.items() if k != "bksdm_version" and old.get(k) != v}
        if changed:
            raise CacheError(f"{out} holds a cache made with other settings {changed}; use another folder")
    _write_json(previous, {**meta, "complete": False})

    # Only what the cache encodes with: the teacher's denoiser (3.4 GB for SD's U-Net, 24 GB for FLUX.1's
    # transformer) is never loaded, only its config: FLUX's prompt length depends on it (512 T5 tokens for the
    # guidance-distilled FLUX.1-dev, 256 for schnell).
    denoiser_config = load_denoiser_config(teacher)
    family = family_of(denoiser_config)
    pipe = load_pipeline(teacher, device=device, **{family.denoiser: None})
    freeze(pipe.vae, *text_encoder_modules(pipe))
    if batch_size is None:
        batch_size = auto_batch_size(pipe.vae, cfg.data.resolution, device)
        logger.info("encoder batch size %d (sized to the memory available)", batch_size)
    transform = ImageTransform(cfg.data.resolution, center_crop=True, random_flip=False)
    num_shards = (total + shard_size - 1) // shard_size
    rows, skipped = 0, []
    for shard in tqdm(range(num_shards), desc="cache shards"):
        path = out / f"shard-{shard:05d}.safetensors"
        info_path = path.with_suffix(".json")
        if path.is_file() and info_path.is_file():  # finished by an earlier run
            info = json.loads(info_path.read_text())
            rows += len(info["captions"])
            skipped += info["skipped"]
            continue
        start, stop = shard * shard_size, min(total, (shard + 1) * shard_size)
        loader = DataLoader(
            _Records(source, transform, start, stop),
            batch_size=batch_size,
            num_workers=cfg.data.num_workers,
            collate_fn=_collate,
        )
        tensors: dict[str, list[torch.Tensor]] = {}
        captions, ids, shard_skipped = [], [], []
        for samples in loader:
            good = [s for s in samples if "error" not in s]
            shard_skipped += [s["error"] for s in samples if "error" in s]
            if not good:
                continue
            pixels = torch.stack([s["pixel_values"] for s in good])  # (B, 3, R, R)
            encoded = {}
            encoded["mean"], encoded["std"] = encode_images(pipe.vae, pixels)
            if cfg.data.random_flip:
                encoded["mean_flip"], encoded["std_flip"] = encode_images(pipe.vae, pixels.flip(-1))
            encoded["text"], pooled = family.encode_prompt(pipe, [s["caption"] for s in good], device, denoiser_config)
            if pooled is not None:
                encoded["pooled"] = pooled
            for key, value in encoded.items():
                tensors.setdefault(key, []).append(value.to("cpu", store))
            captions += [s["caption"] for s in good]
            ids += [str(s["record_id"]) for s in good]
        for reason in shard_skipped:
            logger.warning("skipped %s", reason)
        with atomic_file(path) as partial:
            save_file({k: torch.cat(v).contiguous() for k, v in tensors.items()}, str(partial))
        info = {"start": start, "stop": stop, "captions": captions, "record_ids": ids, "skipped": shard_skipped}
        _write_json(info_path, info)
        rows += len(captions)
        skipped += shard_skipped
    require_usable(rows, skipped, str(cfg.data.train))  # an all-bad data set is an error, not an empty cache
    sizes = cache_sizes(out, num_shards, rows)
    pooled_stored = "pooled" in sizes["per_sample_by_key"]
    meta.update(
        complete=True,
        num_samples=rows,
        num_skipped=len(skipped),
        num_shards=num_shards,
        family=family.name,
        scaling_factor=pipe.vae.config.scaling_factor,
        shift_factor=pipe.vae.config.get("shift_factor"),
        sdxl=family.name == "unet" and pooled_stored,  # read by caches' readers before families existed
        pooled=pooled_stored,
        bytes=sizes,
    )
    _write_json(previous, meta)
    logger.info("cache of %d samples: %s", rows, describe_sizes(sizes))
    return meta


_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def cache_sizes(folder: Path, num_shards: int, num_samples: int) -> dict[str, Any]:
    """The cache's size on disk: ``total`` bytes of its shards, ``per_sample`` (total / samples, headers and
    captions included) and ``per_sample_by_key``, the bytes of one row of each stored tensor (flips included)."""
    files = [folder / f"shard-{i:05d}{suffix}" for i in range(num_shards) for suffix in (".safetensors", ".json")]
    total = sum(f.stat().st_size for f in files if f.is_file())
    by_key: dict[str, int] = {}
    with safe_open(str(files[0]), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensor = handle.get_slice(key)
            row = 1
            for side in tensor.get_shape()[1:]:
                row *= side
            by_key[key] = row * _DTYPE_BYTES[tensor.get_dtype()]
    return {"total": total, "per_sample": total / max(num_samples, 1), "per_sample_by_key": by_key}


def describe_sizes(sizes: dict[str, Any]) -> str:
    """One line: ``1.9MB on disk, 80.3KB a sample (text 13.9KB, latents 65.5KB)``."""
    by_key = sizes["per_sample_by_key"]
    text = by_key.get("text", 0) + by_key.get("pooled", 0)
    latents = sum(v for k, v in by_key.items() if k.startswith(("mean", "std")))
    return (
        f"{human(sizes['total'], 'B')} on disk, {human(sizes['per_sample'], 'B')} a sample "
        f"(text {human(text, 'B')}, latents {human(latents, 'B')})"
    )


MAX_AUTO_BATCH = 16
ENCODER_BYTES_PER_CHANNEL_PIXEL = 24
"""Peak bytes of the VAE encoder per image, per first-stage channel and per pixel, in float32: SD's VAE (128
channels) measured 0.63 GiB per 512-px image (20.2 bytes), with margin. At 512 px that is 0.75 GiB an image."""


def auto_batch_size(vae: torch.nn.Module, resolution: int, device: str | torch.device) -> int:
    """The largest encoder batch (at most 16) whose activations fit in 80% of the memory available now."""
    from bksdm.sampling import available_memory

    dtype_bytes = torch.finfo(vae.dtype).bits // 8
    per_image = ENCODER_BYTES_PER_CHANNEL_PIXEL * vae.config.block_out_channels[0] * resolution**2 * dtype_bytes / 4
    available, _ = available_memory(device)
    return int(max(1, min(MAX_AUTO_BATCH, 0.8 * available // per_image)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=False))


def _columns(cfg: DistillConfig) -> dict[str, str]:
    """Column names for the source; hub data sets keep HFSource's own defaults unless the user set them."""
    if str(cfg.data.train).startswith("hf:"):
        columns = {"split": cfg.data.hf_split, "caption_column": cfg.data.caption_column}
        if cfg.data.image_column != "file_name":
            columns["image_column"] = cfg.data.image_column
        return columns
    return {"image_column": cfg.data.image_column, "caption_column": cfg.data.caption_column}


@dataclass
class _Row:
    shard: int
    row: int


class CachedDataset(Dataset):
    """The cache as a map-style dataset indexed by :class:`~bksdm.train.data.SampleRef`, like ``DistillDataset``.

    The flip of slot ``(step, position)`` is drawn exactly as :class:`~bksdm.train.data.ImageTransform` draws it
    (the first number of the slot's data generator), so cached and uncached runs see the same samples.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        seed: int,
        random_flip: bool = True,
        resolution: int | None = None,
        family: str | None = None,
    ):
        self.folder = Path(folder)
        meta_path = self.folder / CACHE_FILE
        if not meta_path.is_file():
            raise CacheError(f"{folder} is not a bksdm cache (no {CACHE_FILE}); make one with `bksdm cache`")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise CacheError(f"the cache in {folder} is incomplete; rerun `bksdm cache` to finish it")
        cached_family = self.meta.get("family", "unet")  # caches made before transformer teachers: U-Net ones
        if family is not None and cached_family != family:
            raise CacheError(
                f"the cache in {folder} holds the text states of a {cached_family} teacher, but this teacher is a "
                f"{family} one: cache the data set again with this teacher"
            )
        if resolution is not None and self.meta["resolution"] != resolution:
            raise CacheError(f"the cache was made at {self.meta['resolution']} px but data.resolution={resolution}")
        if random_flip and not self.meta["flips"]:
            raise CacheError("data.random_flip=true but the cache holds no flipped variants; recache with flips")
        self.seed, self.random_flip = seed, random_flip
        self.rows: list[_Row] = []
        self.captions: list[str] = []
        for shard in range(self.meta["num_shards"]):
            info = json.loads((self.folder / f"shard-{shard:05d}.json").read_text())
            self.rows += [_Row(shard, i) for i in range(len(info["captions"]))]
            self.captions += info["captions"]
        if not self.rows:
            raise CacheError(f"the cache in {folder} holds no samples")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _get(self, shard: int, key: str, row: int) -> torch.Tensor:
        handle = self._handles.get(shard)
        if handle is None:  # opened lazily, so each DataLoader worker has its own handles
            handle = safe_open(str(self.folder / f"shard-{shard:05d}.safetensors"), framework="pt")
            self._handles[shard] = handle
        return handle.get_slice(key)[row : row + 1][0].float()

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        where = self.rows[ref.index]
        flipped = False
        if self.random_flip:
            generator = sample_generator(self.seed, ref.step, ref.position, STREAM_DATA)
            flipped = bool(torch.rand((), generator=generator) < 0.5)
        suffix = "_flip" if flipped else ""
        item = {
            "mean": self._get(where.shard, "mean" + suffix, where.row),
            "std": self._get(where.shard, "std" + suffix, where.row),
            "text": self._get(where.shard, "text", where.row),
            "caption": self.captions[ref.index],
            "index": ref.index,
            "step": ref.step,
            "position": ref.position,
            "flipped": flipped,
            "skipped": [],
        }
        if self.meta.get("pooled", self.meta.get("sdxl")):
            item["pooled"] = self._get(where.shard, "pooled", where.row)
        return item

    def __getstate__(self) -> dict[str, Any]:  # safetensors handles do not pickle; workers reopen them
        return {**self.__dict__, "_handles": {}}
