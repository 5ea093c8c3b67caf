"""Prompt files: what ``bksdm generate`` reads, in the formats people already have.

- ``.txt``: one prompt per non-empty line;
- ``.json``: a list of strings, or of objects with a prompt column (``prompt``, ``caption`` or ``text``, looked up
  in that order);
- ``.jsonl``: one JSON object (or string) per line, same columns;
- ``.csv``: a header row naming a prompt column (the official BK-SDM ``metadata.csv`` has ``file_name,text``).

Other columns of a record (a COCO ``image_id``, a ``file_name``) are kept as its ``extra`` fields, so that
generated images can be matched with the real ones they stand for. A prompt's index is its position in the file
(after skipping empty ``.txt`` lines); seeds and image names derive from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PROMPT_COLUMNS", "PromptFileError", "PromptRecord", "read_prompts"]

PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "caption", "text")
"""Column names read as the prompt, in order of preference."""

SUFFIXES: tuple[str, ...] = (".txt", ".json", ".jsonl", ".csv")


class PromptFileError(ValueError):
    """A prompt file is missing, empty or malformed (the message names the file, the line and the fix)."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and the other fields its record carried (e.g. ``image_id``)."""

    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | os.PathLike) -> list[PromptRecord]:
    """Read a prompt file (``.txt``, ``.json``, ``.jsonl`` or ``.csv``).

    Args:
        path: The file.

    Returns:
        The prompts in file order.

    Raises:
        PromptFileError: The file is missing, has an unknown suffix, holds no prompts, or a record has no
            non-empty prompt column.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(
            f"prompt file {path}: unknown suffix '{path.suffix}'; use .txt (one prompt per line), .json, .jsonl or "
            f".csv (with a {'/'.join(PROMPT_COLUMNS)} column)"
        )
    from bksdm.train.data.text_files import check_utf8_start, utf8_error

    check_utf8_start(path, PromptFileError)  # UTF-16/32 named as such, not read as mangled text
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8-sig").splitlines()
            records = [PromptRecord(line.strip()) for line in lines if line.strip()]
        elif suffix == ".csv":
            records = _read_csv(path)
        elif suffix == ".jsonl":
            records = [
                _record(json.loads(line), path, f"line {n}")
                for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1)
                if line.strip()
            ]
        else:
            records = _read_json(path)
    except json.JSONDecodeError as err:
        raise PromptFileError(
            f"prompt file {path} is not valid JSON{'L' if suffix == '.jsonl' else ''}: {err}"
        ) from None
    except UnicodeDecodeError:
        raise utf8_error(path, PromptFileError) from None
    if not records:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return records


def _read_json(path: Path) -> list[PromptRecord]:
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        raise PromptFileError(
            f"{path} looks like a COCO annotations file, not a prompt list; build the prompt file first with "
            f"`bksdm coco-prompts --captions {path} --out prompts.jsonl`"
        )
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise PromptFileError(
            f"prompt file {path}: expected a JSON list of prompts (strings, or objects with a "
            f"{'/'.join(PROMPT_COLUMNS)} field), got {type(data).__name__}"
        )
    return [_record(item, path, f"item {n}") for n, item in enumerate(data)]


def _read_csv(path: Path) -> list[PromptRecord]:
    # Strict: a stray quote or a row with a field too many is an error naming the line, never prompts lost.
    from bksdm.train.data.text_files import csv_rows

    rows = csv_rows(path, PromptFileError)
    _, columns = next(rows, (1, []))
    column = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if column is None:
        raise PromptFileError(
            f"prompt file {path}: the header row ({', '.join(columns) or 'empty'}) names no prompt column; "
            f"name one of {', '.join(PROMPT_COLUMNS)}"
        )
    records = []
    for n, row in rows:
        fields = dict(zip(columns, row, strict=True))
        text = fields.pop(column).strip()
        if not text:
            raise PromptFileError(f"prompt file {path}, line {n}: empty '{column}'")
        records.append(PromptRecord(text, fields))
    return records


def _record(item: Any, path: Path, where: str) -> PromptRecord:
    if isinstance(item, str):
        if not item.strip():
            raise PromptFileError(f"prompt file {path}, {where}: empty prompt")
        return PromptRecord(item.strip())
    if not isinstance(item, dict):
        raise PromptFileError(f"prompt file {path}, {where}: expected a string or an object, got {type(item).__name__}")
    column = next((c for c in PROMPT_COLUMNS if c in item), None)
    if column is None:
        raise PromptFileError(
            f"prompt file {path}, {where}: no prompt field (fields: {', '.join(item) or 'none'}); "
            f"name it one of {', '.join(PROMPT_COLUMNS)}"
        )
    text = item[column]
    if not isinstance(text, str) or not text.strip():
        raise PromptFileError(f"prompt file {path}, {where}: '{column}' must be a non-empty string, got {text!r}")
    return PromptRecord(text.strip(), {k: v for k, v in item.items() if k != column})
