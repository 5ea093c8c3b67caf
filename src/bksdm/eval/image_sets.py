"""The images an evaluation scores: a folder's manifest (or its image files), read the paper's way, in batches.

Prompts come from a manifest: JSON lines with at least ``file`` (relative to the manifest's folder) and
``prompt`` -- what ``bksdm generate`` writes as ``manifest.jsonl`` (:data:`bksdm.artifacts.MANIFEST_FILE`) --
looked for in the images folder when not given; without one, every image file of the folder counts
(:data:`bksdm.artifacts.IMAGE_SUFFIXES`). An image that cannot be read is skipped, named and counted, as the data
loader skips bad records.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from bksdm.artifacts import IMAGE_SUFFIXES, MANIFEST_FILE

__all__ = [
    "MAX_RESIZE",
    "EvaluationError",
    "ImageRecord",
    "UnreadableImage",
    "check_resize",
    "describe_images",
    "find_images",
    "image_batches",
    "paper_resize",
    "read_manifest",
]

logger = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """A user error in what was given to evaluate (missing folder, no prompts for CLIP, no FID reference, ...)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image to score and, when a manifest gives them, its prompt and seed."""

    file: Path
    prompt: str | None = None
    seed: int | None = None
    index: int | None = None


def read_manifest(path: str | Path) -> list[ImageRecord]:
    """Read a JSON-lines manifest: one object per image with ``file`` and ``prompt`` (``seed``, ``index`` optional).

    ``file`` is relative to the manifest's folder (or absolute). Lines without ``file`` (e.g. a header with the
    generation settings) are skipped.

    Raises:
        EvaluationError: The file is missing, a line is not JSON, or no line names a file.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"manifest {path} not found")
    from bksdm.train.data.text_files import check_utf8_start, utf8_error

    check_utf8_start(path, EvaluationError)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise utf8_error(path, EvaluationError) from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvaluationError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(entry, dict) or "file" not in entry:
            continue
        file, prompt = entry["file"], entry.get("prompt")
        if not isinstance(file, str) or not file.strip():
            raise EvaluationError(f"{path}:{number}: 'file' must be a file name (a string), got {file!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise EvaluationError(f"{path}:{number}: 'prompt' must be a string, got {prompt!r}")
        records.append(
            ImageRecord(
                file=path.parent / file,
                prompt=prompt,
                seed=_optional_int(entry, "seed", path, number),
                index=_optional_int(entry, "index", path, number),
            )
        )
    if not records:
        raise EvaluationError(f"{path}: no line names an image (need JSON lines with 'file' and 'prompt' keys)")
    return records


def _optional_int(entry: dict[str, Any], key: str, path: Path, number: int) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise EvaluationError(f"{path}:{number}: '{key}' must be an integer, got {value!r}")
    return int(value)


def _manifest_of(folder: Path, manifest: str | Path | None) -> Path | None:
    """The manifest :func:`find_images` reads: the one given, else ``manifest.jsonl`` in the folder, if any."""
    if manifest is None and (folder / MANIFEST_FILE).is_file():
        return folder / MANIFEST_FILE
    return Path(manifest) if manifest is not None else None


def _image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted; a symlink that is not a folder counts even when it leads nowhere
    (a loop, a missing target), so that reading it fails and it is named and counted as unreadable."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and _is_image_file(p))


def _is_image_file(path: Path) -> bool:
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def describe_images(images: str | Path, manifest: str | Path | None, count: int) -> str:
    """Where ``count`` images came from, for messages: the manifest (and how many image files the folder holds
    beside it, when that differs) or the folder."""
    folder = Path(images)
    used = _manifest_of(folder, manifest)
    if used is None:
        return f"{folder} holds {count} image(s)"
    text = f"the manifest {used} lists {count} image(s)"
    if folder.is_dir():
        on_disk = len(_image_files(folder))
        if on_disk != count:
            text += (
                f", but {folder} holds {on_disk} image file(s): is the manifest from another or an unfinished "
                f"run? (give --manifest FILE, or move the manifest away to score every image of the folder)"
            )
    return text


def find_images(images: str | Path, manifest: str | Path | None = None) -> list[ImageRecord]:
    """The images to score: a manifest's entries (given, or ``manifest.jsonl`` in the folder), else every image
    file in the folder in sorted order (without prompts).

    Raises:
        EvaluationError: The folder is missing or empty, or a manifest's file is missing.
    """
    folder = Path(images)
    if not folder.is_dir():
        raise EvaluationError(f"image folder {folder} not found")
    manifest = _manifest_of(folder, manifest)
    if manifest is not None:
        records = read_manifest(manifest)
        missing = [r.file for r in records if not _is_image_file(r.file)]  # a broken symlink: read and counted
        if missing:
            raise EvaluationError(
                f"{len(missing)} of the {len(records)} image(s) that the manifest {manifest} lists are missing, e.g. "
                f"{missing[0]} (generation unfinished? run bksdm generate again: it resumes; or give the manifest "
                f"of these images with --manifest)"
            )
        return records
    files = _image_files(folder)
    if not files:
        raise EvaluationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [ImageRecord(file=p) for p in files]


def paper_resize(image: Image.Image, size: int = 256, jpeg_quality: int | None = 75) -> Image.Image:
    """Resize the way the BK-SDM evaluation did: a bicubic squash to ``size`` x ``size`` (no crop), saved as JPEG.

    The official scripts call ``Image.resize((256, 256))`` (Pillow's default filter for RGB/L images is bicubic)
    and save to ``.jpg`` with Pillow's default quality 75, for the real MS-COCO images and the generated ones
    alike; the JPEG round trip is repeated here in memory (``jpeg_quality=None`` skips it).
    """
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        buffer.seek(0)
        image = Image.open(buffer)
        image.load()
    return image.convert("RGB")


def _load(path: Path, resize: int | None, jpeg_quality: int | None) -> Image.Image:
    """Reads one image; raises :class:`UnreadableImage` for a missing, corrupt or oversized one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                image = im if im.mode in ("RGB", "L") else im.convert("RGB")
                image = paper_resize(image, resize, jpeg_quality) if resize else image.convert("RGB")
    except Exception as err:  # PIL raises many types on malformed input (OSError, SyntaxError, bombs, ...)
        raise UnreadableImage(f"{path}: {type(err).__name__}: {err}") from None
    return image


class UnreadableImage(Exception):
    """One image that cannot be scored (skipped and counted, as the data loader skips bad records)."""


def image_batches(
    records: Sequence[ImageRecord],
    batch_size: int,
    resize: int | None,
    jpeg_quality: int | None,
    progress: bool,
    skipped: list[str],
) -> Iterator[tuple[list[ImageRecord], list[Image.Image]]]:
    """Batches of readable images with their records; unreadable ones are appended to ``skipped``."""
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        chunk, images = [], []
        for record in records[start : start + batch_size]:
            try:
                images.append(_load(record.file, resize, jpeg_quality))
            except UnreadableImage as err:
                skipped.append(str(err))
                logger.warning("skipped unreadable image %s", err)
                continue
            chunk.append(record)
        if chunk:
            yield chunk, images


MAX_RESIZE = 4096
"""Largest ``resize`` / ``ref_resize`` (the paper's is 256): a batch of 50 images at 4096 px is 2.5 GB."""


def check_resize(value: Any, option: str = "--resize") -> int | None:
    """A paper-style resize side: None (no resize) or a whole number of pixels from 1 to :data:`MAX_RESIZE`.

    Raises:
        EvaluationError: 0, negative, not a whole number, or too large.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESIZE:
        raise EvaluationError(
            f"{option} {value}: give the side in pixels to resize to, from 1 to {MAX_RESIZE} (the paper's is "
            f"256), or leave {option} out to score the images at their own size"
        )
    return value
