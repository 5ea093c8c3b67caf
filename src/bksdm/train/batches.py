"""Training batches for the distillation loop, from images (encoded on the fly) or from a ``bksdm cache``.

Either way the loop receives, per micro step of this process, the VAE latent distribution, the text states
and the family's added conditioning (SDXL's pooled embedding and time ids, SD3's / FLUX's pooled projections and
FLUX.1-dev's guidance), and the samples' positions in the global batch, which key their noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from bksdm.train.cache import CachedDataset, _columns
from bksdm.train.data import DistillDataset, GlobalBatchSampler, ImageTransform, WebDatasetSource, collate, open_source
from bksdm.train.encoders import encode_images


def _collate_cached(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("mean", "std", "text")}
    if "pooled" in samples[0]:
        batch["pooled"] = torch.stack([s["pooled"] for s in samples])
    batch["position"] = torch.tensor([s["position"] for s in samples], dtype=torch.long)
    batch["step"] = torch.tensor([s["step"] for s in samples], dtype=torch.long)
    batch["skipped"] = []
    return batch


def make_loader(cfg, rank: int, world_size: int, start_micro_step: int, family: str | None = None) -> DataLoader:
    """The DataLoader of this process: cached, map-style images, or webdataset shards.

    Micro step ``m`` of the run is global batch ``m`` of the sampler (``batch_size × world_size`` samples);
    this process loads its contiguous slice. ``family`` (the teacher's, e.g. ``"sd3"``) is checked against a cache's.
    """
    d, t = cfg.data, cfg.train
    if d.cache:
        dataset = CachedDataset(d.cache, t.seed, random_flip=d.random_flip, resolution=d.resolution, family=family)
        collate_fn = _collate_cached
    else:
        if not d.train:
            raise ValueError("data.train is not set: give an image-text folder, hf:NAME, or shards (or data.cache)")
        transform = ImageTransform(d.resolution, center_crop=d.center_crop, random_flip=d.random_flip)
        if ".tar" in str(d.train):
            source = WebDatasetSource(
                d.train, transform, t.seed, t.batch_size, rank=rank, world_size=world_size, start_step=start_micro_step
            )
            return source.dataloader(num_workers=d.num_workers)
        dataset = DistillDataset(open_source(d.train, **_columns(cfg)), transform, t.seed, max_samples=d.max_samples)
        collate_fn = collate
    sampler = GlobalBatchSampler(
        len(dataset), t.batch_size * world_size, t.seed, rank=rank, world_size=world_size, start_step=start_micro_step
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        # Workers forked from the trainer would keep the pages of every tensor the trainer later writes (student,
        # gradients, AdamW, EMA: copy-on-write leaves the old page to the workers): +3 GB of 4 workers' memory at
        # SD size after one step, growing. Forkserver workers start from a small process instead.
        multiprocessing_context="forkserver" if d.num_workers > 0 and _has_forkserver() else None,
    )


def _has_forkserver() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def prepare_batch(batch: dict[str, Any], models, cfg, device: torch.device) -> dict[str, Any]:
    """Turns a loader batch into the loop's inputs: ``mean``, ``std``, ``text``, positions, micro step, and the
    family's ``added_cond_kwargs`` when it has any (SDXL, the transformers)."""
    if "pixel_values" in batch:  # images: run the frozen encoders now
        mean, std = encode_images(models.pipe.vae, batch["pixel_values"].to(device))
        text, pooled = models.family.encode_prompt(models.pipe, list(batch["caption"]), device)
    else:
        mean, std, text, pooled = batch["mean"], batch["std"], batch["text"], batch.get("pooled")
    out = {
        "mean": mean.to(device),
        "std": std.to(device),
        "text": text.to(device),
        "positions": batch["position"],
        "micro_step": int(batch["step"][0]),
        "skipped": len(batch["skipped"]),
    }
    added = models.family.conditioning(pooled, cfg.data.resolution, device, models.teacher.config)
    if added is not None:
        out["added_cond_kwargs"] = added
    return out


def batch_stream(cfg, models, accelerator, start_micro_step: int) -> Iterator[dict[str, Any]]:
    """Endless prepared micro batches of this process, starting at ``start_micro_step``."""
    loader = make_loader(
        cfg, accelerator.process_index, accelerator.num_processes, start_micro_step, family=models.family.name
    )
    for batch in loader:
        yield prepare_batch(batch, models, cfg, accelerator.device)
