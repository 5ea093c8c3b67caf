"""The MS-COCO 30K prompt set of the zero-shot text-to-image protocol (REFERENCE.md, "Evaluation protocol").

From the user's own ``captions_val2014.json`` (COCO annotations: ``{"images": [...], "annotations":
[{"image_id", "caption", ...}]}``), pick ``count`` images and one caption for each, reproducibly by seed:

- every image is ranked by a hash of ``(seed, image id)`` and the first ``count`` are taken, so the choice does
  not depend on the file's order, and a smaller set is a prefix of a larger one with the same seed (1K prompts
  for a quick check are the first 1K of the 30K; their generated images are reused when the run is extended);
- each chosen image's caption is picked by a hash of ``(seed, image id)`` among its captions in annotation-id
  order, so it does not depend on ``count`` either.

The records keep ``image_id`` and ``file_name``, so that each generated image can be matched with the real image
it stands for. (The paper used a fixed list published with the official code, ``mscoco_val2014_30k/metadata.csv``
with ``file_name,text`` columns; ``bksdm generate`` reads that file as it is, too.)
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from bksdm.artifacts import atomic_file
from bksdm.eval.prompts import PromptFileError
from bksdm.seeding import mix_seed

__all__ = ["COCO_30K", "coco_prompts", "load_coco_captions", "select_captions", "write_prompt_file"]

COCO_30K = 30_000
"""Prompts in the paper's protocol: 30K of val2014's 40,504 images, one caption each."""

_STREAM_IMAGES = 1  # hash streams: which images, which caption of an image
_STREAM_CAPTION = 2


def load_coco_captions(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a COCO captions annotation file.

    Raises:
        PromptFileError: Missing file, not JSON, or not COCO captions (e.g. ``instances_val2014.json``).
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(
            f"captions file {path} does not exist; it is annotations/captions_val2014.json inside "
            "annotations_trainval2014.zip from https://cocodataset.org/#download"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PromptFileError(f"captions file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PromptFileError(
            f"captions file {path} is not a COCO annotations file (expected an object with 'images' and "
            "'annotations' lists, as in captions_val2014.json)"
        )
    if not isinstance(data.get("images"), list):
        raise PromptFileError(f"captions file {path} has no 'images' list (expected COCO's captions_val2014.json)")
    bad = next(
        (a for a in data["annotations"] if not (isinstance(a, dict) and "image_id" in a and "caption" in a)), None
    )
    if bad is not None:
        raise PromptFileError(
            f"captions file {path}: an annotation has no image_id/caption ({str(bad)[:120]}); give the captions file "
            "(captions_val2014.json), not instances or keypoints"
        )
    return data


def select_captions(data: dict[str, Any], count: int | None = COCO_30K, seed: int = 0) -> list[dict[str, Any]]:
    """Pick ``count`` images and one caption per image, reproducibly by ``seed``.

    Args:
        data: A COCO captions annotation object (see :func:`load_coco_captions`).
        count: How many images (None: every image with a caption).
        seed: Seed of both choices.

    Returns:
        Records ``{"image_id", "file_name", "caption", "annotation_id"}`` in selection order. Captions have their
        whitespace normalised (COCO's carry stray newlines and trailing spaces).

    Raises:
        PromptFileError: ``count`` is not positive or exceeds the images that have captions.
    """
    captions: dict[Any, list[tuple[Any, int, str]]] = {}
    for position, ann in enumerate(data["annotations"]):
        text = " ".join(str(ann["caption"]).split())
        if text:
            captions.setdefault(ann["image_id"], []).append((ann.get("id", position), position, text))
    file_names = {img.get("id"): img.get("file_name") for img in data["images"] if isinstance(img, dict)}
    image_ids = [i for i in captions if i in file_names]
    if count is None:
        count = len(image_ids)
    if count < 1:
        raise PromptFileError(f"--count must be at least 1, got {count}")
    if count > len(image_ids):
        raise PromptFileError(
            f"asked for {count} prompts but the captions file has only {len(image_ids)} images with captions; "
            f"pass --count {len(image_ids)} or less (or --count all)"
        )
    ranked = sorted(image_ids, key=lambda i: (mix_seed(seed, _STREAM_IMAGES, _int_id(i)), str(i)))
    records = []
    for image_id in ranked[:count]:
        options = sorted(captions[image_id], key=lambda c: (_int_id(c[0]), c[1]))
        annotation_id, _, text = options[mix_seed(seed, _STREAM_CAPTION, _int_id(image_id)) % len(options)]
        records.append(
            {"image_id": image_id, "file_name": file_names[image_id], "caption": text, "annotation_id": annotation_id}
        )
    return records


def _int_id(value: Any) -> int:
    """COCO ids are integers; other ids hash through their text (stable across runs)."""
    if isinstance(value, int):
        return value
    return mix_seed(*str(value).encode())


def write_prompt_file(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as ``.jsonl`` (one object per line) or ``.csv`` (``file_name,caption,image_id,...``).

    The CSV puts ``file_name`` and the caption in its first two columns, the layout of the official BK-SDM
    ``metadata.csv``. Written atomically (:func:`bksdm.artifacts.atomic_file`), so a crash leaves no half file.

    Raises:
        PromptFileError: Unknown suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise PromptFileError(f"--out {path}: use a .jsonl or .csv file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial, partial.open("w", encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            columns = ["file_name", "caption", *[k for k in records[0] if k not in ("file_name", "caption")]]
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    return path


def coco_prompts(
    captions: str | os.PathLike, out: str | os.PathLike, count: int | None = COCO_30K, seed: int = 0
) -> tuple[int, int]:
    """The job of ``bksdm coco-prompts``: pick ``count`` images (None: all) of a COCO captions file and one caption
    each, reproducibly by ``seed``, and write them as a prompt file ``out`` (``.jsonl`` or ``.csv``).

    Returns:
        (prompts written, images in the captions file).

    Raises:
        PromptFileError: The captions file is missing or malformed, ``count`` exceeds it, or ``out`` has another
            suffix.
    """
    data = load_coco_captions(captions)
    records = select_captions(data, count, seed)
    write_prompt_file(records, out)
    return len(records), len(data["images"])
