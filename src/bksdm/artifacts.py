"""The folders between stages: atomic writes and what a failed write tells the user.

Every file or folder bksdm hands to a later stage (a checkpoint, a student pipeline, a cache shard, a generated
image, a report) is written under a hidden partial name beside its final place and renamed when complete, so a
crash, a kill or a full disk never leaves something that looks complete. A write that fails removes its
partial and raises :class:`WriteFailed`, whose message names the target, the cause and, for a full disk, the
free space; the CLI prints it and exits with status 1 (a fault, not a usage error).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_FILE",
    "MODEL_RECORD_FILE",
    "PARTIAL_SUFFIX",
    "SETTINGS_FILE",
    "WriteFailed",
    "atomic_dir",
    "atomic_file",
    "replace_dir",
    "write_text",
]

PARTIAL_SUFFIX = ".partial"

# The file names of the folders one stage hands to the next.
SETTINGS_FILE = "settings.json"
"""In a folder of generated images: what decided the images (model, steps, guidance, size, seed ...) and the runs."""
MANIFEST_FILE = "manifest.jsonl"
"""In a folder of generated images: one JSON line per image (index, prompt, seed, file, the prompt file's fields)."""
MODEL_RECORD_FILE = "bksdm_toy.json"
"""In a model folder (the shapes-world teachers): the sampling settings it was validated with, and its provenance."""
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""Files of a folder that count as images (compared lower-case): the formats PIL reads that bksdm accepts."""


class WriteFailed(OSError):
    """Writing an output failed (full disk, read-only file system, no permission, an I/O error).

    Nothing partial is left at the target; what was there before (the last complete checkpoint, an earlier
    image) is untouched.
    """


def partial_path(final: Path) -> Path:
    """The hidden name a ``final`` file or folder is written under: ``.NAME.partial`` beside it."""
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def describe_failure(err: BaseException, target: Path) -> str:
    """One sentence for a failed write of ``target``: the cause, and the free space when the disk is full."""
    text = str(err)
    no_space = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
    if no_space:
        return f"could not write {target}: no space left on device ({_free(target)} free); free some space"
    if getattr(err, "errno", None) == errno.EROFS:
        return f"could not write {target}: the file system is read-only; choose a writable output folder"
    if isinstance(err, PermissionError):
        return f"could not write {target}: permission denied; choose a folder you can write to"
    cause = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {text}"
    return f"could not write {target}: {cause}"


def _free(path: Path) -> str:
    for parent in [path, *path.parents]:
        if parent.exists():
            return f"{shutil.disk_usage(parent).free / 2**20:,.0f} MiB"
    return "unknown"


def _is_write_error(err: BaseException) -> bool:
    """OSError, and the errors libraries raise for one without subclassing it (safetensors, torch's zip)."""
    if isinstance(err, OSError):
        return True
    name = type(err).__name__
    return name == "SafetensorError" or (isinstance(err, RuntimeError) and "unexpected pos" in str(err))


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a partial path to write; renames it to ``final`` when the block ends without an error.

    On any error the partial file is removed; write errors (full disk, read-only, permissions) become
    :class:`WriteFailed`, others propagate unchanged. An existing ``final`` is replaced only by a complete file.
    """
    final = Path(final)
    partial = partial_path(final)
    try:
        yield partial
        os.replace(partial, final)
    except BaseException as err:
        partial.unlink(missing_ok=True)
        if _is_write_error(err) and not isinstance(err, WriteFailed):
            raise WriteFailed(getattr(err, "errno", None) or errno.EIO, describe_failure(err, final)) from err
        raise


def write_text(final: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``final`` through :func:`atomic_file`; returns the path."""
    final = Path(final)
    with atomic_file(final) as partial:
        partial.write_text(text, encoding="utf-8")
    return final


@contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yields an empty partial folder to fill; it becomes ``final`` when the block ends without an error.

    Args:
        final: The folder to produce.
        replace: Replace an existing ``final`` (only once the new one is complete); else refuse it.

    Raises:
        WriteFailed: a write error inside the block (the partial folder is removed, ``final`` untouched).
        FileExistsError: ``final`` exists and ``replace`` is False.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(errno.EEXIST, f"{final} exists", str(final))
    partial = partial_path(final)
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
        partial.mkdir(parents=True)
        yield partial
        replace_dir(partial, final)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if _is_write_error(err) and not isinstance(err, WriteFailed):
            raise WriteFailed(getattr(err, "errno", None) or errno.EIO, describe_failure(err, final)) from err
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Moves folder ``src`` to ``dst``; an existing ``dst`` is deleted only once ``src`` is in its place."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)
