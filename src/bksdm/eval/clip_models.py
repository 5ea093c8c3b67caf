"""CLIP image and text embedders for the CLIP score: OpenCLIP (the paper's ViT-g/14) or Hugging Face CLIP.

The paper scores with OpenCLIP ``ViT-g-14`` / ``laion2b_s34b_b88k`` (its ``eval_clip_score.py``), which is our
default. OpenCLIP imports torchvision, so it is optional and imported only when asked for; any Hugging Face
``CLIPModel`` (a hub id or a folder written by ``save_pretrained``, with its processor) works without it.

Model specs (``--clip-model``):

- ``open_clip:ViT-g-14`` (default) -- an OpenCLIP architecture; ``--clip-pretrained`` names its weights: a
  tag (``laion2b_s34b_b88k``, downloaded into the Hugging Face cache) or a local checkpoint file;
- ``hf:openai/clip-vit-large-patch14`` or ``hf:/path/to/folder`` -- a transformers ``CLIPModel`` + processor;
- a bare existing folder with a ``config.json`` -- the same as ``hf:FOLDER``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "ClipEmbedder",
    "ClipNotAvailableError",
    "HFClip",
    "OpenClip",
    "load_clip",
]

DEFAULT_CLIP_MODEL = "open_clip:ViT-g-14"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"


class ClipNotAvailableError(FileNotFoundError):
    """The CLIP model's library or weights are missing; the message says what to install or download."""


class ClipEmbedder(Protocol):
    """What the CLIP score needs of a model."""

    name: str

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images → embeddings (N, D), not normalised."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → embeddings (N, D), not normalised."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _tensor(output) -> torch.Tensor:
    # transformers < 5 returns the projected embeddings; 5.x returns an output whose pooler_output holds them.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClip:
    """A transformers ``CLIPModel`` with its ``CLIPProcessor`` (hub id or ``save_pretrained`` folder)."""

    def __init__(self, ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import CLIPModel, CLIPProcessor

        local = Path(ref).expanduser()
        is_folder = local.is_dir()
        if not is_folder and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
            raise ClipNotAvailableError(f"no such folder: {ref} (give a CLIPModel folder or a hub id)")
        try:
            self.model = CLIPModel.from_pretrained(local if is_folder else ref, local_files_only=_offline())
            self.processor = CLIPProcessor.from_pretrained(local if is_folder else ref, local_files_only=_offline())
        except OSError as err:
            raise ClipNotAvailableError(
                f"cannot load the Hugging Face CLIP model '{ref}' ({err}). Online: `huggingface-cli download {ref}` "
                "(into the Hugging Face cache, then HF_HUB_OFFLINE=1 works); or save model and processor with "
                "save_pretrained into a folder and pass --clip-model hf:/that/folder"
            ) from err
        self.model = self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.name = f"hf:{ref}"
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return _tensor(out).float().cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        # Long captions are cut at the text encoder's length (77 for CLIP), as OpenCLIP's tokenizer does.
        tokens = self.processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        )
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return _tensor(out).float().cpu().numpy()


class OpenClip:
    """An OpenCLIP model (``open_clip.create_model_and_transforms``) with its preprocessing and tokenizer."""

    def __init__(
        self, arch: str, pretrained: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        try:
            import open_clip
        except ImportError as err:  # open_clip itself, or torchvision under it
            raise ClipNotAvailableError(
                f"the CLIP score with OpenCLIP ({arch}) needs the open_clip package ({err}): `pip install "
                "open_clip_torch` together with the torchvision build that matches your torch; or score with a "
                "Hugging Face CLIP instead: --clip-model hf:openai/clip-vit-large-patch14"
            ) from err
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
        except Exception as err:  # unknown tags, missing files and hub failures come as several error types
            hint = ""
            try:
                cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
                if cfg.get("hf_hub"):
                    repo = cfg["hf_hub"].rstrip("/")
                    hint = f" Online: `huggingface-cli download {repo}` (into the Hugging Face cache);"
            except Exception:  # the tag lookup is only for the hint
                pass
            raise ClipNotAvailableError(
                f"cannot load OpenCLIP {arch} / {pretrained} ({err}).{hint} or download the checkpoint file and "
                "pass it with --clip-pretrained /path/to/open_clip_pytorch_model.bin"
            ) from err
        self.model = model.to(dtype=dtype).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device, self.dtype = torch.device(device), dtype
        self.name = f"open_clip:{arch}/{pretrained}"

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images])
        return self.model.encode_image(pixels.to(self.device, self.dtype)).float().cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu().numpy()


def load_clip(
    spec: str = DEFAULT_CLIP_MODEL,
    pretrained: str = DEFAULT_CLIP_PRETRAINED,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipEmbedder:
    """Load the CLIP model a spec names (see the module docstring for the forms).

    Raises:
        ClipNotAvailableError: The library or the weights are missing (the message says what to do).
        ValueError: A spec of no known form.
    """
    if spec.startswith("open_clip:"):
        return OpenClip(spec.removeprefix("open_clip:"), pretrained, device=device, dtype=dtype)
    if spec.startswith("hf:"):
        return HFClip(spec.removeprefix("hf:"), device=device, dtype=dtype)
    if (Path(spec).expanduser() / "config.json").is_file():
        return HFClip(spec, device=device, dtype=dtype)
    raise ValueError(
        f"unknown CLIP model '{spec}': use open_clip:ARCH (e.g. open_clip:ViT-g-14, weights by --clip-pretrained), "
        "hf:HUB_ID (e.g. hf:openai/clip-vit-large-patch14) or hf:/path/to/CLIPModel/folder"
    )
