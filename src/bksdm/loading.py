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

from bksdm.plan.spec import ALL_PRESETS, Plan, PlanError, plan_from_dict

BUNDLED_TEACHER = Path(__file__).parent / "world" / "assets" / "teacher"
"""The shapes-world teacher shipped with bksdm: the default of every command that takes a teacher."""
BUNDLED_SD3_TEACHER = Path(__file__).parent / "world" / "assets" / "teacher-sd3"
"""The shapes-world teacher with SD3's architecture (a joint-attention transformer), shipped with bksdm."""
BUNDLED_NAMES = ("bundled", "bundled-sd3")
"""The names every command that takes a teacher or model accepts for the bundled teachers (instead of a folder)."""


def bundled_teachers() -> dict[str, Path]:
    """Each name of :data:`BUNDLED_NAMES` and its folder (read when asked, so a test may point one elsewhere)."""
    return dict(zip(BUNDLED_NAMES, (BUNDLED_TEACHER, BUNDLED_SD3_TEACHER), strict=True))


DENOISER_FOLDERS = ("unet", "transformer")
"""The pipeline subfolders that hold a denoiser (a U-Net, or a diffusion transformer for SD3 / FLUX.1)."""

PLAN_FILE = "bksdm_plan.yaml"
"""Name of the file, next to a student pipeline's model_index.json, recording the plan that made it."""


def load_plan(spec: str | os.PathLike) -> Plan:
    """A preset by name (``bk-base``, ``bk-small``, ``bk-tiny``, ``identity``) or a plan YAML file.

    A student folder written by ``bksdm prune`` also works: its recorded plan is loaded.

    Raises:
        PlanError: the spec is neither a preset nor a readable plan file, or the file is malformed.
    """
    spec = str(spec)
    if spec in ALL_PRESETS:
        return ALL_PRESETS[spec]
    path = Path(spec)
    if path.is_dir() and (path / PLAN_FILE).is_file():
        path = path / PLAN_FILE
    if not path.is_file():
        raise PlanError(spec, [f"not a preset ({', '.join(sorted(ALL_PRESETS))}) and no plan file at {path}"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlanError(spec, [f"{path} is not valid YAML: {err}"]) from None
    if isinstance(data, dict) and "plan" in data and isinstance(data["plan"], dict):
        data = data["plan"]  # a student's bksdm_plan.yaml wraps the plan with its provenance
    return plan_from_dict(data, source=path.stem)


class TeacherNotFoundError(FileNotFoundError):
    """The teacher is neither a local diffusers folder nor reachable on the hub."""


def bundled_ref(ref: str | os.PathLike) -> str | os.PathLike:
    """The folder of a bundled teacher named in :data:`BUNDLED_NAMES` (``bundled``, ``bundled-sd3``), else ``ref``.

    A local folder of the same name wins (``./bundled`` is a folder the user made).

    Raises:
        TeacherNotFoundError: The named bundled teacher is missing from the installation.
    """
    name = str(ref)
    if name not in BUNDLED_NAMES or Path(ref).is_dir():
        return ref
    folder = bundled_teachers()[name]
    if not (folder / "model_index.json").is_file():
        what, trainer = ("shapes", "train_teacher") if name == "bundled" else ("SD3-shaped shapes", "train_dit_teacher")
        raise TeacherNotFoundError(
            f"the bundled {what} teacher is missing from {folder} ('{name}'); reinstall bksdm, or retrain it with "
            f"`python -m bksdm.world.{trainer} --out` that folder"
        )
    return str(folder)


def teacher_or_default(ref: str | os.PathLike | None) -> str:
    """``ref`` (a bundled teacher's name resolved to its folder), or the bundled shapes teacher when none is given."""
    return str(bundled_ref(ref or "bundled"))


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
    """Whether ``ref`` names an existing local folder (a bundled teacher's name counts)."""
    return Path(ref).is_dir() or (str(ref) in BUNDLED_NAMES and bundled_teachers()[str(ref)].is_dir())


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
    ref = bundled_ref(ref)
    path = Path(ref)
    if path.is_dir():
        return
    label = f"{what} {ref}" if what else str(ref)
    if path.exists():
        raise TeacherNotFoundError(f"{label} is a file, not a folder: give a diffusers model folder or a hub id")
    if looks_like_path(ref):
        raise TeacherNotFoundError(f"{label}: no such folder; check the path (or give a hub id such as owner/name)")


def check_pipeline_ref(ref: str | os.PathLike, what: str = "") -> None:
    """As :func:`check_model_ref`, and a local folder must hold a whole pipeline (``model_index.json``).

    Raises:
        TeacherNotFoundError: ``ref`` is a file, a path that does not exist, or a folder with no model_index.json.
    """
    check_model_ref(ref, what)
    ref = bundled_ref(ref)
    if is_local(ref) and not (Path(ref) / "model_index.json").is_file():
        label = f"{what} {ref}" if what else str(ref)
        raise TeacherNotFoundError(f"{label} has no model_index.json: give the folder of a whole diffusers pipeline")


def load_denoiser_config(ref: str | os.PathLike) -> dict[str, Any]:
    """The denoiser's config, without loading any weights: a pipeline folder or hub id (its ``unet/`` or
    ``transformer/``), or a denoiser folder. diffusers' ``_class_name`` is kept, so
    :func:`bksdm.families.family_of` can tell the family.

    Raises:
        TeacherNotFoundError: neither a local folder nor a reachable hub repo, or a folder with no denoiser.
    """
    from diffusers import UNet2DConditionModel  # any model class reads config.json; _class_name says whose it is

    check_model_ref(ref)
    ref = str(bundled_ref(ref))
    if is_local(ref):
        folder = Path(ref)
        for sub in (*DENOISER_FOLDERS, ""):
            if (folder / sub / "config.json").is_file():
                return dict(UNet2DConditionModel.load_config(folder / sub))
        raise TeacherNotFoundError(
            f"{ref} is a folder but holds neither unet/config.json nor transformer/config.json (a diffusers pipeline) "
            "nor config.json (a diffusers U-Net or transformer)"
        )
    errors = []
    for sub in DENOISER_FOLDERS:
        try:
            return dict(UNet2DConditionModel.load_config(ref, subfolder=sub))
        except Exception as err:  # diffusers raises several error types for hub failures
            errors.append(err)
    raise _hub_hint(ref, errors[0]) from errors[-1]


def load_pipeline(ref: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu", **components: Any):
    """Loads a whole diffusers pipeline (SD-v1/v2, SDXL, ...) with the class its model_index.json names.

    ``components`` replace the pipeline's own (e.g. ``unet=student``), which are then not loaded at all.

    Raises:
        TeacherNotFoundError: neither a local folder nor a reachable hub repo.
    """
    from diffusers import DiffusionPipeline

    check_pipeline_ref(ref)
    ref = str(bundled_ref(ref))
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


class UnetError(ValueError):
    """A ``--unet`` that holds no U-Net, cannot be found, or does not fit the model it replaces the U-Net of."""


UNET_FIT_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type")
"""What a swapped-in U-Net must share with the model's: it reads the same latents and text states and predicts
the same target (a student made from that teacher does; one made from another teacher usually does not)."""


def unet_location(ref: str | os.PathLike, option: str = "--unet") -> tuple[str, str | None]:
    """Where a U-Net reference points: (folder or hub id, subfolder).

    A pipeline folder (``unet/config.json``: a student from ``bksdm prune`` or ``distill``) gives its ``unet``,
    a U-Net folder (``config.json``) itself, a hub id its pipeline's ``unet``.

    Raises:
        UnetError: A local folder that holds neither.
        TeacherNotFoundError: A path that is a file or does not exist (no hub request is made for it).
    """
    ref = bundled_ref(ref)
    path = Path(ref)
    if path.is_dir():
        if (path / "unet" / "config.json").is_file():
            return str(path), "unet"
        if (path / "config.json").is_file():
            return str(path), None
        raise UnetError(
            f"{option} {ref}: the folder holds neither unet/config.json (a student pipeline, e.g. from bksdm prune "
            "or distill) nor config.json (a U-Net folder)"
        )
    check_model_ref(ref, option)
    return str(ref), "unet"


def unet_config_of(ref: str | os.PathLike, option: str = "--unet") -> dict[str, Any]:
    """The config of the U-Net ``ref`` points at (see :func:`unet_location`), without loading weights.

    Raises:
        UnetError: No U-Net there (a local folder without one, or a hub id that cannot be read).
        TeacherNotFoundError: A path that is a file or does not exist.
    """
    from diffusers import UNet2DConditionModel

    folder, subfolder = unet_location(ref, option)
    try:
        return dict(UNet2DConditionModel.load_config(folder, subfolder=subfolder))
    except (OSError, ValueError) as err:
        raise UnetError(
            f"{option} {ref}: no such folder, and no pipeline with a unet/ of that name on the hub or in its cache "
            f"({type(err).__name__}); give a student pipeline folder or a U-Net folder"
        ) from None


def check_unet_fits(
    unet_config: dict[str, Any],
    model_config: dict[str, Any],
    unet: str,
    model: str,
    options: tuple[str, str] = ("--unet", "--model"),
) -> None:
    """Refuse a U-Net whose :data:`UNET_FIT_KEYS` differ from the model's own U-Net's.

    Raises:
        UnetError: The message lists every difference and the fix.
    """
    wrong = [
        f"{k} {unet_config.get(k)} (model: {model_config.get(k)})"
        for k in UNET_FIT_KEYS
        if unet_config.get(k) != model_config.get(k)
    ]
    if wrong:
        raise UnetError(
            f"{options[0]} {unet} does not fit {options[1]} {model}: {', '.join(wrong)}; pass as {options[1]} the "
            "teacher the student was made from"
        )


def load_unet(ref: str | os.PathLike, dtype: torch.dtype = torch.float32, option: str = "--unet"):
    """A ``UNet2DConditionModel`` in eval mode from a pipeline folder, a U-Net folder or a hub pipeline id.

    Raises:
        UnetError: No U-Net there.
        TeacherNotFoundError: A path that is a file or does not exist.
    """
    from diffusers import UNet2DConditionModel

    folder, subfolder = unet_location(ref, option)
    return UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype).eval()


def load_pipeline_with_unet(
    model: str | os.PathLike,
    unet: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scheduler: str | None = None,
    options: tuple[str, str] = ("--unet", "--model"),
):
    """The pipeline to sample with: ``model``, its U-Net replaced by ``unet``'s, its scheduler by ``scheduler``.

    The U-Net's fit is checked from the two configs before any weights are read, and the model's own U-Net is
    then not loaded at all. The progress bar is off (the commands draw their own).

    Args:
        model: A diffusers pipeline folder or hub id.
        unet: A student pipeline folder, a U-Net folder or a hub pipeline id (see :func:`unet_location`); None
            keeps the model's.
        dtype: Dtype of every component.
        device: Where the pipeline goes.
        scheduler: A diffusers scheduler class name (see :func:`use_scheduler`); None keeps the model's.
        options: The option names of ``unet`` and ``model``, for messages.

    Raises:
        TeacherNotFoundError: The model (or a U-Net path) cannot be found.
        UnetError: The U-Net cannot be found or does not fit the model.
        ValueError: ``scheduler`` is not a diffusers scheduler class.
    """
    components: dict[str, Any] = {}
    if unet is not None:
        given = unet_config_of(unet, options[0])
        try:
            expected = load_denoiser_config(model)
        except TeacherNotFoundError as err:
            raise TeacherNotFoundError(f"{options[1]}: {err}") from None
        check_unet_fits(given, expected, str(unet), str(model), options)
        components["unet"] = load_unet(unet, dtype, options[0])
    try:
        pipe = load_pipeline(model, dtype, str(device), **components)
    except TeacherNotFoundError as err:
        raise TeacherNotFoundError(f"{options[1]}: {err}") from None
    use_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
