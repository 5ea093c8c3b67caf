"""Training checkpoints that hold every tensor once, in safetensors, and never unpickle anything.

A checkpoint is a folder ``OUT/checkpoints/checkpoint-NNNNNNN``::

    unet/, unet_ema/ (transformer/, transformer_ema/ for SD3 / FLUX students), text_encoder/,
    pytorch_lora_weights.safetensors
                                the recipe's weights in diffusers' own format (loadable as they are); the
                                trainer reads them back on resume, they are never stored a second time
    training_state.safetensors  the optimizer's tensors and the RNG state of the main process
    config.yaml / run.json      the recipe's settings
    trainer_state.json          written last, its presence marks a complete checkpoint: format, recipe, step,
                                the optimizer's param groups, the learning-rate schedule, fingerprints of the
                                trained models

accelerate's ``save_state`` is not used: it stores the model a second time (``model.safetensors`` beside
``unet/``), objects registered for checkpointing as pickles (``custom_checkpoint_0.pkl``, loaded with
``weights_only=False``: a checkpoint folder from elsewhere could run code) and the RNG state as pickles. Here
nothing is read with ``pickle``: tensors through safetensors, everything else as JSON, so a crafted file makes
resume fail with :class:`CheckpointError` and runs nothing. The same format serves ``bksdm distill`` and
``bksdm dreambooth``.

Every process of a multi-process run holds the same replicated state (DDP), so the main process writes and every
process reads; a sharded state (``train.sharding=fsdp``, :mod:`bksdm.train.sharding`) is gathered by every process
into the same whole tensors first, and placed back as shards on reading. DeepSpeed ZeRO is not supported.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bksdm.artifacts import atomic_dir, write_text
from bksdm.train.sharding import full, is_sharded, placed_like

__all__ = [
    "CHECKPOINT_PREFIX",
    "STATE_FILE",
    "CheckpointError",
    "OutputInUseError",
    "checkpoint_step",
    "claim_output",
    "complete_checkpoints",
    "find_checkpoint",
    "load_module",
    "read_checkpoint",
    "read_weights",
    "remove_entries",
    "restore_training_state",
    "rotate_checkpoints",
    "trim_metrics",
    "write_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.safetensors"
FORMAT = 2  # 1: accelerate's save_state (pickles); refused on resume


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed: not complete, not bksdm's, damaged, or made for another model."""


class OutputInUseError(ValueError):
    """The output folder holds another run, and neither resuming nor overwriting it was asked for."""


# ------------------------------------------------------------------------------------------------ finding


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint folder's name (``checkpoint-0000042`` -> 42)."""
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def complete_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in ``out/checkpoints`` (with their state file), oldest first."""
    found = [
        p
        for p in Path(out, "checkpoints").glob(CHECKPOINT_PREFIX + "*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """``latest`` -> the newest complete checkpoint in ``out`` (None if there is none); a path -> that checkpoint.

    Raises:
        CheckpointError: the path is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        done = complete_checkpoints(out)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); use 'latest' or a path")
    return path


def claim_output(out: Path, *, resume: str | None, overwrite: bool, markers: tuple[str, ...]) -> list[Path]:
    """Checks that ``out`` can be this run's folder, refusing one that holds another run.

    A fresh run into a folder with another run's checkpoints or logs would mix the two: rotation deletes the new
    run's checkpoints (the old ones sort newer), the logs interleave, and ``--resume latest`` later resumes the
    old run under the new settings.

    Args:
        out: The output folder.
        resume: The run's resume setting; when set, the folder's run is the one being continued.
        overwrite: Accept a folder with another run: its entries (``markers``, ``checkpoints``, ``logs``) are
            returned for the main process to delete (:func:`remove_entries`) before the run writes anything.
        markers: The recipe's own entries besides ``checkpoints`` and ``logs`` (e.g. ``config.yaml``, ``student``).

    Returns:
        The entries to delete first (empty unless ``overwrite``).

    Raises:
        OutputInUseError: ``out`` is a file, or holds another run and neither ``resume`` nor ``overwrite`` is set.
    """
    if out.exists() and not out.is_dir():
        raise OutputInUseError(f"output folder {out} is a file; choose a folder")
    entries = [out / name for name in ("checkpoints", "logs", *markers)]
    present = [p for p in entries if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
    if resume or not present:
        return []
    if overwrite:
        return present
    done = complete_checkpoints(out)
    what = f"checkpoints up to step {checkpoint_step(done[-1])}" if done else ", ".join(p.name for p in present)
    raise OutputInUseError(
        f"{out} holds another run ({what}): continue it with --resume latest, replace it with --overwrite "
        "(deletes its checkpoints and logs), or choose another output folder"
    )


def rotate_checkpoints(out: Path, keep: int) -> list[Path]:
    """Deletes all but the newest ``keep`` (at least 1) complete checkpoints in ``out``; returns those deleted.

    Incomplete folders (no state file: a write in progress or cut short) are left alone.
    """
    old = complete_checkpoints(out)[: -max(keep, 1)]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def remove_entries(paths: list[Path]) -> None:
    """Deletes what :func:`claim_output` returned (main process only)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def trim_metrics(file: Path, step: int) -> None:
    """Drops log records after ``step`` (written after the checkpoint a run resumes from), so none repeat."""
    if not file.is_file():
        return
    kept = [line for line in file.read_text().splitlines() if line.strip() and _record_step(line) <= step]
    write_text(file, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


# ------------------------------------------------------------------------------------------------ writing


def write_checkpoint(
    accelerator,
    out: Path,
    step: int,
    keep: int,
    *,
    recipe: str,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    write_files: Callable[[Path], None],
    fingerprints: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``out/checkpoints/checkpoint-NNNNNNN`` atomically, then keeps only the newest ``keep`` checkpoints.

    Every process must call it (it synchronises); files are written by the main process only. A write that
    fails (full disk) removes the partial folder and raises :class:`~bksdm.artifacts.WriteFailed`; the earlier
    checkpoints are untouched.

    Args:
        accelerator: The run's Accelerator.
        out: The run's output folder.
        step: The optimizer step reached.
        keep: How many checkpoints to keep (at least 1).
        recipe: ``distill`` or ``dreambooth``: a checkpoint of one recipe is not resumed by the other.
        optimizer: Its tensors go to ``training_state.safetensors``, its param groups to ``trainer_state.json``.
        lr_scheduler: Its state (plain numbers) goes to ``trainer_state.json``.
        write_files: Writes the recipe's weights and settings into the folder it is given.
        fingerprints: What identifies the trained models (configs), compared on resume.
        extra: More of the recipe's state as plain numbers (e.g. the EMA's step count), read back from
            ``trainer_state.json``'s ``extra``.

    Returns:
        The checkpoint folder.
    """
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    failure: BaseException | None = None
    # A sharded optimizer state is gathered by every process together; a replicated one is read by the main one.
    sharded = is_sharded(_parameters(optimizer))
    gathered = _optimizer_tensors(optimizer, keep=accelerator.is_main_process) if sharded else None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with atomic_dir(final) as folder:
                write_files(folder)
                tensors, groups = gathered or _optimizer_tensors(optimizer)
                rng_tensors, rng = _rng_state()
                tensors.update(rng_tensors)
                save_file(tensors, str(folder / TRAINING_STATE_FILE))
                state = {
                    "format": FORMAT,
                    "recipe": recipe,
                    "step": step,
                    "time": time.time(),
                    "optimizer": groups,
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "rng": rng,
                    "fingerprints": dict(fingerprints or {}),
                    "extra": dict(extra or {}),
                }
                (folder / STATE_FILE).write_text(json.dumps(state, indent=1, allow_nan=False))
            rotate_checkpoints(out, keep)
        except BaseException as err:  # every process must learn of it, or the others wait forever
            failure = err
    failed = accelerator.reduce(torch.tensor(int(failure is not None), device=accelerator.device), "sum")
    if failure is not None:
        raise failure
    if int(failed):  # the main process failed and says why; the others stop with it
        raise CheckpointError(f"the main process could not write {final}")
    return final


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, keep: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state: tensors by ``optimizer.<param index>.<name>`` (whole: ``sharding.full``), the rest as
    JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = full(value, keep).detach().to("cpu").contiguous()
            elif value is None or isinstance(value, (bool, int, float, str)):
                scalars.setdefault(str(index), {})[name] = value
            else:
                raise TypeError(f"optimizer state {name!r} of type {type(value).__name__} cannot be checkpointed")
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in the order of its state dict's indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The main process's RNG state: its arrays as tensors (for safetensors), the rest as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    return tensors, plain


# ------------------------------------------------------------------------------------------------ reading


def read_checkpoint(folder: Path, recipe: str, fingerprints: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``, checked to belong to ``recipe`` and to models like these.

    Raises:
        CheckpointError: unreadable, of an older format, of another recipe, or made for other models.
    """
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: {STATE_FILE} is not readable JSON ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {folder} was written by an older bksdm, whose checkpoints hold pickles (which can run "
            "code when loaded); it is not loaded. Its weights are in its unet/ folder: start a new run from them "
            f"(e.g. model.student={folder})"
        )
    if state.get("recipe") != recipe:
        raise CheckpointError(f"checkpoint {folder} is a {state.get('recipe')} checkpoint, not {recipe}'s")
    for name, expected in (fingerprints or {}).items():
        found = state.get("fingerprints", {}).get(name)
        if found != expected:
            diff = _first_difference(found, expected)
            raise CheckpointError(
                f"checkpoint {folder} was made for another {name} ({diff}); resume with the settings it was made "
                "with (its config), or start a new run in another output folder"
            )
    return state


def _first_difference(found: Any, expected: Any) -> str:
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in sorted(set(found) | set(expected)):
            if found.get(key) != expected.get(key):
                return f"{key}: checkpoint {found.get(key)!r}, this run {expected.get(key)!r}"
    return f"checkpoint {found!r}, this run {expected!r}"


def read_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/STEM.safetensors``, or of its shards listed in ``STEM.safetensors.index.json``.

    Raises:
        CheckpointError: missing or not a valid safetensors file (nothing else is ever read).
    """
    index = folder / f"{stem}.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [f"{stem}.safetensors"]
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            tensors.update(load_file(str(folder / name)))
        return tensors
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint file missing: {err.filename or err}") from err
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}/{stem}: not a valid safetensors checkpoint file ({err})") from err


def load_module(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Loads ``tensors`` into ``module`` strictly: every key present, none extra, every shape equal.

    Raises:
        CheckpointError: listing what differs (a checkpoint made with another plan or model).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or extra or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} tensors differ in shape (e.g. {k}: {tuple(tensors[k].shape)} stored, "
                f"{tuple(own[k].shape)} here)"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise CheckpointError(
            f"the checkpoint's {what} does not fit this run's: {'; '.join(parts)}. It was made with another plan "
            "or model: resume with the settings it was made with, or start a new run in another output folder"
        )
    module.load_state_dict({k: placed_like(own[k], v) for k, v in tensors.items()}, strict=True)


def restore_training_state(folder: Path, state: dict[str, Any], optimizer, lr_scheduler) -> None:
    """Loads the optimizer, the learning-rate schedule and the RNG state written by :func:`write_checkpoint`."""
    tensors = read_weights(folder, Path(TRAINING_STATE_FILE).stem)
    groups = state["optimizer"]["param_groups"]
    params = _parameters(optimizer)
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            param = params[int(index)] if int(index) < len(params) else None
            if param is not None and value.shape == param.shape:  # a moment of a sharded parameter: its shard
                value = placed_like(param, value)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer"].get("scalars", {}).items():
        per_param.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: the optimizer state does not fit this run ({err})") from err
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    rng = state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            "MT19937",
            tensors["rng.numpy"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
