"""Trains the shapes-world attribute classifier that ships in ``bksdm/world/assets/classifier/``.

    python -m bksdm.world.train_classifier --out src/bksdm/world/assets/classifier

Every training image is freshly rendered from the world with seed :data:`~bksdm.world.classifier.TRAIN_SEED`
(batch ``k`` is pairs ``k*B .. k*B+B-1``), so no image is seen twice and nothing is read from disk; accuracy is
then measured on the disjoint :data:`~bksdm.world.classifier.HELD_OUT_SEED`, on clean renders and on augmented
ones. Writes ``model.safetensors`` and ``config.json`` (architecture, the command, accuracies, seconds, machine).
The defaults take about five minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from bksdm.artifacts import atomic_file, write_text
from bksdm.profiling import cpu_model
from bksdm.world.classifier import (
    HELD_OUT_SEED,
    TRAIN_SEED,
    ClassifierConfig,
    ShapesClassifier,
    attribute_accuracy,
    config_dict,
)
from bksdm.world.shapes import pairs, sample, to_array

logger = logging.getLogger("bksdm.world.train_classifier")


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perturbations that keep every attribute true, drawn per image: images (B, 3, H, W) in [-1, 1].

    Renders are perfectly flat and sharp; images decoded from a diffusion model, especially a tiny, distilled
    one, are not: they come out slightly blurred, grainy and a little off in tone. The classifier must read
    those as well as it reads renders, or prompt accuracy would blame the generator for the judge's brittleness.
    So: contrast and brightness jitter, a small per-channel tint, a Gaussian blur (sigma up to 1 pixel) on half
    of the images, and Gaussian noise. Nothing geometric: a flip would move the shape to another quadrant and a
    zoom would change its size class, and both are attributes.
    """
    b = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean  # contrast
    x = x + uniform(-0.1, 0.1, 1, 1, 1) + uniform(-0.05, 0.05, 3, 1, 1)  # brightness, tint
    x = _blur(x, uniform(0.0, 1.0) * (torch.rand(b, generator=generator) < 0.5))
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.1, 1, 1, 1)  # noise, std up to 5% of range
    return x.clamp(-1, 1)  # pipelines clamp decoded images to the same range


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur with a 5-tap separable kernel; ``sigma`` (B,) in pixels, 0 = unchanged."""
    taps = torch.arange(-2, 3, dtype=x.dtype)  # (5,)
    kernel = torch.exp(-(taps**2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (B, 5)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    b, c, h, w = x.shape
    # One group per (image, channel): every image gets its own kernel in a single conv call.
    weight = kernel.repeat_interleave(c, dim=0)  # (B*C, 5)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), weight[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), weight[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def training_batch(step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of the training stream: images (B, 3, 64, 64) in [-1, 1] and labels (B, n_attributes)."""
    drawn = [sample(TRAIN_SEED, step * batch + i) for i in range(batch)]
    images = torch.from_numpy(to_array([image for image, _ in drawn]))
    labels = torch.tensor([scene.labels() for _, scene in drawn])
    return images, labels


def _machine() -> str:
    """What trained it, for the record in config.json: CPU model, core count, torch build and threads."""
    return f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} on {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for model.safetensors and config.json")
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the augmentation")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: %(default)s; see the comment in main)",
    )
    parser.add_argument("--eval-count", type=int, default=2000, help="held-out images to measure accuracy on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # One thread by default: the model is too small for intra-op parallelism to pay much, and on a shared
    # 2-core machine two threads spin-waiting on each other were 8x slower than one (1.2 vs 0.14 s per step).
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = ClassifierConfig()
    model = ShapesClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "classifier: %d parameters, widths %s; %d steps of %d images", n_params, config.widths, args.steps, args.batch
    )

    start = time.perf_counter()
    model.train()
    progress = tqdm(range(args.steps), desc="train classifier", mininterval=2)
    running_loss, running_acc = 0.0, 0.0
    for step in progress:
        images, labels = training_batch(step, args.batch)
        logits = model(augment(images, generator))
        loss = sum(F.cross_entropy(out, labels[:, a]) for a, out in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Exponential moving averages: a readable trend without an extra evaluation pass.
        all_right = torch.stack([out.argmax(1) == labels[:, a] for a, out in enumerate(logits)]).all(0)
        running_loss = 0.98 * running_loss + 0.02 * loss.item() if step else loss.item()
        accuracy = all_right.float().mean().item()
        running_acc = 0.98 * running_acc + 0.02 * accuracy if step else accuracy
        progress.set_postfix(loss=f"{running_loss:.4f}", acc=f"{running_acc:.3f}", refresh=False)
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            logger.info(
                "step %d: loss %.4f, train accuracy (all four, augmented) %.3f", step + 1, running_loss, running_acc
            )
    seconds = time.perf_counter() - start

    model.eval()
    held_out = list(pairs(HELD_OUT_SEED, args.eval_count))
    scenes = [scene for _, scene in held_out]
    clean = torch.from_numpy(to_array([image for image, _ in held_out]))
    accuracy = attribute_accuracy(model, clean, scenes)
    augmented = attribute_accuracy(model, augment(clean, torch.Generator().manual_seed(HELD_OUT_SEED)), scenes)
    logger.info(
        "held-out accuracy (seed %d, %d images): %s",
        HELD_OUT_SEED,
        args.eval_count,
        ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()),
    )
    logger.info("held-out accuracy, augmented: %s", ", ".join(f"{k} {v:.4f}" for k, v in augmented.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / "model.safetensors") as partial:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial)
    training = {
        "command": " ".join(["python -m bksdm.world.train_classifier", *(sys.argv[1:] if argv is None else argv)]),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "train_seed": TRAIN_SEED,
        "held_out_seed": HELD_OUT_SEED,
        "held_out_images": args.eval_count,
        "accuracy": accuracy,
        "accuracy_augmented": augmented,
        "parameters": n_params,
        "seconds": round(seconds, 1),
        "machine": _machine(),
    }
    write_text(args.out / "config.json", json.dumps({**config_dict(config), "training": training}, indent=2) + "\n")
    logger.info("saved %s in %.0f s", args.out, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
