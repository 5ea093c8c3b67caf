"""Randomness keyed by position, so that results do not depend on batch size, workers or processes.

Every random choice that touches one training sample (its flip, its timestep, its noise) is drawn from a
generator seeded by ``(seed, step, position in the global batch)``. Splitting a global batch across 1 or N
processes, or resuming at step S, then draws exactly the same numbers. Pure: no global RNG is touched.
"""

from __future__ import annotations

import hashlib

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers: stable across runs, platforms and Python's hash randomisation."""
    digest = hashlib.blake2b(b"|".join(str(int(p)).encode() for p in parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, step: int, position: int, stream: int = 0, device: str | torch.device = "cpu"):
    """A torch Generator for one sample at one step; ``stream`` separates independent uses (data, noise)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, step, position, stream))
    return generator


STREAM_DATA = 1
"""Stream of data augmentation (flips, random crops)."""
STREAM_NOISE = 2
"""Stream of diffusion randomness (timestep, noise, latent sampling)."""
