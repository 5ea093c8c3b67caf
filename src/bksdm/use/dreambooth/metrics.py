"""DreamBooth's subject-fidelity metrics: DINO, CLIP-I and CLIP-T (Ruiz et al., CVPR 2023, Sec. 4.1).

- **DINO**: mean cosine similarity, over every (generated, real) pair, of the self-supervised DINO ViT's
  class-token embeddings (the paper: ``dino_vits16``, ``facebook/dino-vits16`` on the hub). DINO is trained
  to tell instances apart, so it rewards the *same* subject more than a look-alike of its class.
- **CLIP-I**: the same with CLIP image embeddings.
- **CLIP-T**: mean cosine similarity between each generated image's CLIP embedding and its prompt's: does the
  image still follow the prompt.

The BK-SDM paper reports all three for its personalised students (REFERENCE.md, "Downstream"). Models load
from a local folder (works offline) or a hub id; when the weights are missing the error says what to download.
CLIP models are loaded by :func:`bksdm.eval.clip_models.load_clip` (so OpenCLIP works too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "DinoEmbedder",
    "MetricModelError",
    "SubjectScores",
    "clip_spec",
    "load_dino",
    "mean_pairwise_cosine",
    "paired_cosine",
    "subject_scores",
]

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
"""DreamBooth's DINO model (ViT-S/16 trained with DINO), as a transformers ``ViTModel``."""
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
"""CLIP model used by default for CLIP-I and CLIP-T (a transformers ``CLIPModel``)."""


class MetricModelError(ValueError):
    """A metric model that cannot be loaded; the message says what to download or pass."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


class DinoEmbedder:
    """A DINO / DINOv2 vision transformer (``ViTModel`` / ``Dinov2Model``) and its image processor.

    The embedding of an image is the class token of the last hidden state (after the final layer norm), the
    feature DINO's own k-NN evaluation and DreamBooth's metric use.
    """

    def __init__(self, ref: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        local = Path(ref).expanduser()
        where = local if local.is_dir() else ref
        if not local.is_dir() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
            raise MetricModelError(f"--dino-model {ref}: no such folder (give a ViTModel/Dinov2Model folder or hub id)")
        try:
            config = AutoConfig.from_pretrained(where, local_files_only=_offline())
            kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}  # DINO has no pooler
            self.model = AutoModel.from_pretrained(where, local_files_only=_offline(), **kwargs)
            self.processor = AutoImageProcessor.from_pretrained(where, local_files_only=_offline())
        except (OSError, ValueError) as err:
            raise MetricModelError(
                f"cannot load the DINO model '{ref}' ({str(err).splitlines()[0]}). Online: `huggingface-cli download "
                f"{DEFAULT_DINO_MODEL}` (fills the Hugging Face cache; HF_HUB_OFFLINE=1 then works), or pass a local "
                "folder holding config.json, the weights and preprocessor_config.json (save_pretrained of the model "
                "and its image processor) with --dino-model"
            ) from err
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.name = ref

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Images → class-token embeddings (N, D), not normalised."""
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            hidden = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, D)
            parts.append(hidden[:, 0].float().cpu().numpy())
        return np.concatenate(parts)


def load_dino(ref: str = DEFAULT_DINO_MODEL, device: str | torch.device = "cpu") -> DinoEmbedder:
    """Loads a DINO model from a folder or the hub.

    Raises:
        MetricModelError: The weights are not there (the message says what to download).
    """
    return DinoEmbedder(ref, device)


def clip_spec(ref: str) -> str:
    """A ``--clip-model`` value as :func:`bksdm.eval.clip_models.load_clip` reads it: bare hub ids mean ``hf:ID``."""
    if ref.startswith(("hf:", "open_clip:")) or Path(ref).expanduser().is_dir():
        return ref
    return f"hf:{ref}"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_pairwise_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over every pair (row of ``a`` (N, D), row of ``b`` (M, D))."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mean_pairwise_cosine needs at least one embedding on each side")
    return float((_normalise(a) @ _normalise(b).T).mean())


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``a`` with row i of ``b``: (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"paired_cosine: shapes differ, {a.shape} vs {b.shape}")
    return np.sum(_normalise(a) * _normalise(b), axis=-1)


@dataclass
class SubjectScores:
    """DreamBooth's metrics for one set of generated images."""

    dino: float | None
    """Mean DINO cosine similarity, generated vs real subject images (None: no DINO model)."""
    clip_i: float | None
    """Mean CLIP image-image cosine similarity, generated vs real (None: no CLIP model)."""
    clip_t: float | None
    """Mean CLIP image-text cosine similarity of each generated image with its prompt (None: no CLIP model)."""
    num_generated: int
    num_real: int


def subject_scores(
    generated: Sequence[Image.Image],
    real: Sequence[Image.Image],
    prompts: Sequence[str],
    dino=None,
    clip=None,
) -> SubjectScores:
    """DINO, CLIP-I and CLIP-T of generated images against the real subject images.

    Args:
        generated: The generated images.
        real: The real images of the subject (the instance images).
        prompts: One prompt per generated image (CLIP-T).
        dino: A :class:`DinoEmbedder`, or None to skip DINO.
        clip: A CLIP embedder from :func:`bksdm.eval.clip_models.load_clip`, or None to skip CLIP-I and CLIP-T.

    Raises:
        ValueError: No images on a side, or not one prompt per generated image.
    """
    if not generated or not real:
        raise ValueError(f"need generated and real images, got {len(generated)} and {len(real)}")
    if len(prompts) != len(generated):
        raise ValueError(f"{len(generated)} generated images but {len(prompts)} prompts (one per image needed)")
    dino_score = clip_i = clip_t = None
    if dino is not None:
        dino_score = mean_pairwise_cosine(dino.embed_images(generated), dino.embed_images(real))
    if clip is not None:
        generated_embeds = clip.embed_images(generated)
        clip_i = mean_pairwise_cosine(generated_embeds, clip.embed_images(real))
        clip_t = float(paired_cosine(generated_embeds, clip.embed_texts(prompts)).mean())
    return SubjectScores(dino_score, clip_i, clip_t, len(generated), len(real))
