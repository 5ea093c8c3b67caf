"""Finding what the user points at: plans (preset names or YAML files) and teachers (hub ids or folders).

Teachers load through diffusers' own ``from_pretrained``, so hub ids, local folders, the Hugging Face cache and
offline mode (``HF_HUB_OFFLINE=1``) all behave as in diffusers. Failures say what to do next.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from bksdm.plan.spec import PRESETS, Plan, PlanError, plan_from_dict

BUNDLED_TEACHER = Path(__file__).parent / "world" / "assets" / "teacher"
"""The shapes-world teacher shipped with bksdm: the default of every command that takes a teacher."""

PLAN_FILE = "bksdm_plan.yaml"
"""Name of the file, next to a student pipeline's model_index.json, recording the plan that made it."""


def load_plan(spec: str | os.PathLike) -> Plan:
    """A preset by name (``bk-base``, ``bk-small``, ``bk-tiny``, ``identity``) or a plan YAML file.

    A student folder written by ``bksdm prune`` also works: its recorded plan is loaded.

    Raises:
        PlanError: the spec is neither a preset nor a readable plan file, or the file is malformed.
    """
    spec = str(spec)
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir() and (path / PLAN_FILE).is_file():
        path = path / PLAN_FILE
    if not path.is_file():
        raise PlanError(spec, [f"not a preset ({', '.join(sorted(PRESETS))}) and no plan file at {path}"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlanError(spec, [f"{path} is not valid YAML: {err}"]) from None
    if isinstance(data, dict) and "plan" in data and isinstance(data["plan"], dict):
        data = data["plan"]  # a student's bksdm_plan.yaml wraps the plan with its provenance
    return plan_from_dict(data, source=path.stem)


class TeacherNotFoundError(FileNotFoundError):
    """The teacher is neither a local diffusers folder nor reachable on the hub."""


def teacher_or_default(ref: str | os.PathLike | None) -> str:
    """``ref``, or the bundled shapes teacher when no teacher is given."""
    if ref:
        return str(ref)
    if not (BUNDLED_TEACHER / "model_index.json").is_file():
        raise TeacherNotFoundError(
            f"no teacher given and the bundled shapes teacher is missing from {BUNDLED_TEACHER}; "
            "reinstall bksdm, or retrain it with `python -m bksdm.world.train_teacher --out` that folder"
        )
    return str(BUNDLED_TEACHER)


def _hub_hint(ref: str, err: Exception) -> TeacherNotFoundError:
    """One line for a hub reference that could not be loaded: why (offline, unreachable, no such repo) and the fix."""
    causes = []
    cause: BaseException | None = err
    while cause is not None and len(causes) < 8:
        causes.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or _hub_offline()
    if "RepositoryNotFoundError" in causes and not offline:
        why = "the hub has no such repo (or it is private or gated: log in with `huggingface-cli login`)"
    elif offline:
        why = "offline mode is on (HF_HUB_OFFLINE) and it is not in the Hugging Face cache"
    else:
        why = "it is not in the Hugging Face cache and the hub could not be reached (or lacks the files)"
    return TeacherNotFoundError(
        f"cannot load '{ref}': no local folder of that name, and {why}; give a local diffusers folder, or run "
        f"`huggingface-cli download {ref}` on a machine with network (offline mode reads the cache it fills)"
    )


def _is_hub_error(err: BaseException) -> bool:
    """Whether loading a hub id failed for want of the hub: OSError/ValueError (what diffusers raises for a
    missing repo or file) or any error of the HTTP and hub client libraries."""
    if isinstance(err, (OSError, ValueError)):
        return True
    module = type(err).__module__.split(".")[0]
    return module in ("huggingface_hub", "httpx", "httpx2", "httpcore", "requests", "urllib3")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - diffusers depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def is_local(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names an existing local folder."""
    return Path(ref).is_dir()


def looks_like_path(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` can only be a local path, never a hub repo id (``name`` or ``owner/name``).

    Absolute and ``./``, ``../``, ``~`` paths, paths with more than one ``/`` or a backslash, and anything the
    hub's own rule refuses as a repo id count as paths: looking them up on the hub can only fail, after a
    connection attempt, with a message about the hub rather than about the missing folder.
    """
    if isinstance(ref, os.PathLike):
        return True
    text = str(ref)
    if not text or text.startswith(("/", ".", "~")) or "\\" in text or text.endswith("/") or text.count("/") > 1:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def check_model_ref(ref: str | os.PathLike, what: str = "") -> None:
    """Fail in one line when ``ref`` is a local path that is not a folder, before anything asks the hub.

    Args:
        ref: A folder or a hub id.
        what: The option or key, for the message (``--model``, ``model.student``).

    Raises:
        TeacherNotFoundError: ``ref`` names a file, or a path that does not exist.
    """
    path = Path(ref)
    if path.is_dir():
        return
    label = f"{what} {ref}" if what else str(ref)
    if path.exists():
        raise TeacherNotFoundError(f"{label} is a file, not a folder: give a diffusers model folder or a hub id")
    if looks_like_path(ref):
        raise TeacherNotFoundError(f"{label}: no such folder; check the path (or give a hub id such as owner/name)")


def load_unet_config(ref: str | os.PathLike) -> dict[str, Any]:
    """The teacher U-Net's config, without loading any weights (a pipeline folder/id, or a U-Net folder).

    Raises:
        TeacherNotFoundError: neither a local folder nor a reachable hub repo.
    """
    from diffusers import UNet2DConditionModel

    check_model_ref(ref)
    ref = str(ref)
    if is_local(ref):
        folder = Path(ref)
        unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        if not (unet_dir / "config.json").is_file():
            raise TeacherNotFoundError(
                f"{ref} is a folder but holds neither unet/config.json (a diffusers pipeline) nor config.json "
                "(a diffusers U-Net)"
            )
        return dict(UNet2DConditionModel.load_config(unet_dir))
    try:
        return dict(UNet2DConditionModel.load_config(ref, subfolder="unet"))
    except Exception as err:  # diffusers raises several error types for hub failures
        raise _hub_hint(ref, err) from err


def load_pipeline(ref: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu", **components: Any):
    """Loads a whole diffusers pipeline (SD-v1/v2, SDXL, ...) with the class its model_index.json names.

    ``components`` replace the pipeline's own (e.g. ``unet=student``), which are then not loaded at all.

    Raises:
        TeacherNotFoundError: neither a local folder nor a reachable hub repo.
    """
    from diffusers import DiffusionPipeline

    check_model_ref(ref)
    ref = str(ref)
    if is_local(ref) and not (Path(ref) / "model_index.json").is_file():
        raise TeacherNotFoundError(f"{ref} has no model_index.json: give the folder of a whole diffusers pipeline")
    try:
        pipe = DiffusionPipeline.from_pretrained(ref, torch_dtype=dtype, **components)
    except Exception as err:
        if is_local(ref) or not _is_hub_error(err):
            raise
        raise _hub_hint(ref, err) from err
    return pipe.to(device)


def use_scheduler(pipe, name: str | None) -> None:
    """Replace ``pipe``'s scheduler by the diffusers scheduler class ``name``, made from the same config (same
    training schedule and prediction type). ``None`` keeps the pipeline's own.

    Raises:
        ValueError: ``name`` is not a diffusers scheduler class (the message lists the model's compatible ones).
    """
    import logging

    import diffusers

    if name is None:
        return
    cls = getattr(diffusers, name, None)
    compatible = sorted(c.__name__ for c in getattr(pipe.scheduler, "compatibles", []))
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(
            f"--scheduler {name}: not a diffusers scheduler class; this model's compatible schedulers: "
            f"{', '.join(compatible)}"
        )
    if name not in compatible:
        own = type(pipe.scheduler).__name__
        logging.getLogger(__name__).warning("%s is not listed as compatible with %s", name, own)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def parse_dtype(name: str) -> torch.dtype:
    """``fp32``/``float32``, ``fp16``/``float16``, ``bf16``/``bfloat16`` → torch dtype."""
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype '{name}'; use fp32, fp16 or bf16")
    return table[name]


class DeviceError(ValueError):
    """A ``--device`` this machine cannot run on (unknown, or CUDA/MPS without the hardware)."""


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """The torch device a ``--device`` value names, checked against this machine; None: CUDA if available.

    Every command that takes ``--device`` resolves it here, so an unknown name (``tpu``), CUDA on a machine
    without it, or a GPU index past the last one gives the same one-line error rather than a traceback.

    Args:
        name: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, or None for the default.
        option: The option's name, for the message.

    Raises:
        DeviceError: The name is not a device bksdm runs on, or this machine lacks it.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{option} {name}: not a device bksdm runs on; use cpu, cuda or cuda:N (mps on Apple)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} {name}: CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{option} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option} {name}: MPS (Apple GPUs) is not available on this machine; use --device cpu")
    return device
