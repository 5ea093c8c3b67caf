"""The folder of generated images that ``bksdm generate`` writes and ``evaluate``/``report`` read.

::

    OUT/settings.json    what determines the images (model, U-Net, scheduler, steps, guidance, size, dtype,
                         seed, resize, ...), the versions, and one entry per run (processes, batch size, device)
    OUT/manifest.jsonl   one line per prompt: index, prompt, seed, file, plus the prompt file's other fields
                         (e.g. a COCO image_id)
    OUT/000000.png ...   one image per prompt, named by index

This module holds the writing side of that contract and the checks a resumed run makes: a folder made with
other settings, or whose images were drawn for other prompts or seeds, is refused (mixing them would corrupt an
evaluation); a broken record is named with the fix; an image that is there but does not read is drawn again.
The file names are :data:`bksdm.artifacts.SETTINGS_FILE` and :data:`bksdm.artifacts.MANIFEST_FILE`.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bksdm.artifacts import MANIFEST_FILE, SETTINGS_FILE, WriteFailed, atomic_file, describe_failure, write_text
from bksdm.eval.prompts import PromptRecord

__all__ = [
    "GenerateError",
    "GenerationSettings",
    "check_resume",
    "image_name",
    "read_settings",
    "record_run",
    "save_image",
    "unreadable_reason",
    "write_records",
]

_RESERVED = ("index", "prompt", "seed", "file")


class GenerateError(ValueError):
    """A user error of ``bksdm generate`` (the message says what is wrong and how to fix it)."""


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides what the images look like (compared when a run resumes)."""

    model: str
    unet: str | None
    scheduler: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None
    dtype: str
    seed: int | None
    """The base seed of :func:`bksdm.eval.generate.prompt_seed`; None when the seeds were given one per prompt
    (the manifest records every image's seed either way)."""
    resize: int | None
    safety_checker: bool


def image_name(index: int, total: int) -> str:
    """File name of image ``index`` in a set of ``total``: zero-padded to 6 digits or more."""
    return f"{index:0{max(6, len(str(total - 1)))}d}.png"


def canonical(ref: str) -> str:
    """Local folders as absolute paths (the same folder compares equal from any working directory)."""
    return str(Path(ref).resolve()) if Path(ref).is_dir() else ref


def check_resume(
    out: Path, settings: GenerationSettings, prompts: Sequence[PromptRecord], names: list[str], seeds: list[int]
) -> None:
    """Refuse a folder whose images were made with other settings, for other prompts or from other seeds.

    Raises:
        GenerateError: ``out`` is a file, a non-empty folder without a settings record, a folder made otherwise,
            or its records are broken (the message names the difference or the file, and the fix).
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise GenerateError(f"--out {out} is a file; give a folder")
    settings_file = out / SETTINGS_FILE
    if not settings_file.is_file():
        if any(out.iterdir()):
            raise GenerateError(f"--out {out} is not empty and holds no {SETTINGS_FILE}; give a new or empty folder")
        return
    previous = read_settings(settings_file).get("settings", {})
    if not isinstance(previous, dict):
        raise GenerateError(_broken_record(settings_file, "its 'settings' entry is not a JSON object"))
    current = json.loads(json.dumps(asdict(settings)))
    changed = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in current.items() if previous.get(k) != v]
    if changed:
        raise GenerateError(
            f"--out {out} holds images made with other settings ({'; '.join(changed)}); use a new --out, or delete "
            "the folder to start over"
        )
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        return
    for number, line in enumerate(_read_text(manifest).splitlines(), start=1):
        entry = _manifest_entry(manifest, number, line)
        if entry is None:
            continue
        i = entry["index"]
        if i >= len(prompts) or not (out / names[i]).is_file():
            continue
        if entry["prompt"] != prompts[i].prompt:
            raise GenerateError(
                f"--out {out}: image {names[i]} was made for the prompt {entry['prompt']!r}, but prompt {i} of the "
                f"prompt file is {prompts[i].prompt!r}; use a new --out for another prompt file"
            )
        if settings.seed is None and entry.get("seed") != seeds[i]:
            raise GenerateError(
                f"--out {out}: image {names[i]} was drawn from seed {entry.get('seed')!r}, not {seeds[i]}; use a new "
                "--out for other seeds"
            )


def _broken_record(path: Path, problem: str) -> str:
    return (
        f"{path} is broken ({problem}); it records how the images in {path.parent} were made, so bksdm cannot "
        f"tell whether they match this command: restore the file, or delete the folder (or use a new --out) to "
        "start over"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GenerateError(_broken_record(path, f"not UTF-8 text at byte {err.start}")) from None


def read_settings(path: Path) -> dict[str, Any]:
    """``OUT/settings.json`` as written by an earlier run.

    Raises:
        GenerateError: The file is not UTF-8, not JSON, or not a JSON object (the message names it and the fix).
    """
    try:
        record = json.loads(_read_text(path), parse_constant=_refuse_constant)
    except ValueError as err:
        if isinstance(err, GenerateError):
            raise
        raise GenerateError(_broken_record(path, f"not valid JSON: {err}")) from None
    if not isinstance(record, dict):
        raise GenerateError(_broken_record(path, "not a JSON object"))
    return record


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _manifest_entry(path: Path, number: int, line: str) -> dict[str, Any] | None:
    """Line ``number`` of ``OUT/manifest.jsonl``: an entry with an integer index and a prompt (None if blank)."""
    if not line.strip():
        return None
    try:
        entry = json.loads(line, parse_constant=_refuse_constant)
    except ValueError as err:
        raise GenerateError(_broken_record(path, f"line {number} is not valid JSON: {err}")) from None
    if not isinstance(entry, dict) or type(entry.get("index")) is not int or not isinstance(entry.get("prompt"), str):
        raise GenerateError(_broken_record(path, f"line {number} is not an entry with an index and a prompt"))
    return entry


def unreadable_reason(path: Path) -> str | None:
    """Why the image at ``path`` cannot be kept on resume (None when it is a whole PNG).

    A run of an older version killed mid-write, or a disk that filled before writes were atomic, can leave a
    truncated image under its final name. PIL's ``verify`` reads every chunk and checks its CRC without decoding
    the pixels (well under a millisecond for a 512 px image), so it finds any truncation before the last chunk.
    """
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return f"a {image.format} file, not a PNG"
            image.verify()
    except Exception as err:  # PIL raises assorted types (OSError, SyntaxError, struct.error) for a broken file
        return f"{type(err).__name__}: {err}"
    return None


def _json(record: Any, **kwargs: Any) -> str:
    """Strict JSON: a NaN or infinity is an error here, never a bare ``NaN`` that JSON readers refuse."""
    return json.dumps(record, allow_nan=False, **kwargs)


def save_image(image, path: Path) -> None:
    """Write under a partial name, then rename: a crash or a full disk never leaves a half image that counts as done.

    Raises:
        WriteFailed: The image could not be written (full disk, read-only folder); the partial file is removed.
    """
    with atomic_file(path) as partial:
        image.save(partial, format="PNG")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteFailed(err.errno or errno.EIO, describe_failure(err, out)) from err


def write_records(
    out: Path,
    settings: GenerationSettings,
    versions: dict[str, str],
    prompts: Sequence[PromptRecord],
    names: list[str],
    seeds: list[int],
) -> None:
    """Create ``out`` and write its settings record (keeping earlier runs) and its manifest, before any image.

    Raises:
        GenerateError: An earlier settings record is broken.
        WriteFailed: A write failed (nothing partial is left).
    """
    _make_folder(out)
    settings_path = out / SETTINGS_FILE
    runs = read_settings(settings_path).get("runs", []) if settings_path.is_file() else []
    runs = runs if isinstance(runs, list) else []
    record = {"settings": asdict(settings), "versions": versions, "runs": runs}
    write_text(settings_path, _json(record, indent=2) + "\n")
    lines = []
    for i, (p, name) in enumerate(zip(prompts, names, strict=True)):
        extra = {(f"source_{k}" if k in _RESERVED else k): v for k, v in p.extra.items()}
        entry = {"index": i, "prompt": p.prompt, "seed": seeds[i], "file": name, **extra}
        lines.append(_json(entry, ensure_ascii=False))
    write_text(out / MANIFEST_FILE, "\n".join(lines) + "\n")


def record_run(out: Path, started: float, seconds: float, **run: Any) -> None:
    """Append one run (start time, seconds and ``run``'s fields) to ``out``'s settings record."""
    record = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), "seconds": round(seconds, 3)}
    record["runs"].append({**entry, **run})
    write_text(out / SETTINGS_FILE, _json(record, indent=2) + "\n")
