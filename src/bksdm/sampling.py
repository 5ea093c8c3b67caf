"""The sampling settings a user gives (steps, guidance, size, batch, strength): checked before any work.

One place for the rules, so ``generate``, ``img2img`` and ``serve`` accept and refuse the same values with the
same message: the option, the value and the fix. Found by trying bad values on every command (issue 11):
``--height 0`` silently gave the native size, ``--height -64`` a traceback, ``--guidance nan`` or ``-5`` turned
guidance off without a word (and wrote a bare ``NaN`` into settings.json), and ``--height 100000`` allocated
until the kernel killed the process at 18.7 GB.

The size ceiling compares the memory one pipeline call needs at that size and batch with what the device has free
once the weights are loaded (:mod:`bksdm.memory`, which holds the estimates and their measurements).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

# check_memory and largest_batch call the estimates through this module's names; the estimates lived here before
# bksdm.memory and are still imported from here (train/cache.py, eval/profile.py).
from bksdm.memory import (
    available_memory,
    generation_bytes,
    gib,
    pipeline_bytes,
    unet_activation_bytes,
    vae_activation_bytes,
)

__all__ = [
    "SAMPLING_TABLE",
    "SamplingDefaults",
    "SamplingError",
    "available_memory",
    "check_batch_size",
    "check_guidance",
    "check_memory",
    "check_negative_prompt",
    "check_side",
    "check_steps",
    "check_strength",
    "classifier_free",
    "embedded_guidance",
    "generation_bytes",
    "largest_batch",
    "latent_patch",
    "pipe_kind",
    "pipeline_bytes",
    "sampling_defaults",
    "sampling_kind",
    "side_factor",
    "steps_run",
    "unet_activation_bytes",
    "vae_activation_bytes",
]


class SamplingError(ValueError):
    """A sampling setting that cannot work: the message names the option, the value and the fix."""


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings a command uses for the options the user leaves out."""

    steps: int
    guidance_scale: float
    height: int | None = None
    """None: the model's native size (its denoiser's sample size times the VAE's factor)."""
    width: int | None = None
    strength: float = 0.8
    """img2img only: how far the input is noised."""
    source: str = "bksdm.sampling.SAMPLING_TABLE"
    embedded_guidance: bool = False
    """The guidance scale is an input of the denoiser (FLUX.1), not classifier-free guidance: the denoiser's batch
    is not doubled and there is no negative prompt."""


SAMPLING_TABLE: dict[tuple[str, str], SamplingDefaults] = {
    ("text-to-image", "unet"): SamplingDefaults(25, 7.5),  # the BK-SDM paper's evaluation
    ("image-to-image", "unet"): SamplingDefaults(50, 7.5),  # diffusers' StableDiffusionImg2ImgPipeline defaults
    # SD3 / SD3.5: StableDiffusion3Pipeline's own defaults (28 steps, CFG 7.0; its __call__ in diffusers 0.42, as
    # diffusers' SD3 docs), StableDiffusion3Img2ImgPipeline's 50 steps. Size: the transformer's sample_size x 8.
    ("text-to-image", "sd3"): SamplingDefaults(28, 7.0),
    ("image-to-image", "sd3"): SamplingDefaults(50, 7.0),
    # FLUX.1-dev (guidance-distilled): FluxPipeline's defaults, 28 steps and guidance 3.5, the value fed to its
    # guidance embedding (diffusers' FLUX docs); img2img the same (FluxImg2ImgPipeline's own 7.0 is no value dev
    # was distilled at). Its transformer records no sample_size: 1024 px is what FluxPipeline draws by default.
    ("text-to-image", "flux"): SamplingDefaults(28, 3.5, 1024, 1024, embedded_guidance=True),
    ("image-to-image", "flux"): SamplingDefaults(28, 3.5, embedded_guidance=True),
    # FLUX.1-schnell (timestep-distilled, no guidance embedding): 4 steps, guidance 0 (diffusers' FLUX docs).
    ("text-to-image", "flux-schnell"): SamplingDefaults(4, 0.0, 1024, 1024, embedded_guidance=True),
    ("image-to-image", "flux-schnell"): SamplingDefaults(4, 0.0, embedded_guidance=True),
}
"""Defaults for a model that records none, per (task, :func:`sampling_kind`); strength 0.8 for every model."""


KIND_NAMES = {"unet": "SD / SDXL", "sd3": "SD3", "flux": "FLUX.1-dev", "flux-schnell": "FLUX.1-schnell"}
"""The models each :func:`sampling_kind` stands for, in words (for help texts)."""


def table_help(task: str, setting: str) -> str:
    """One setting of :data:`SAMPLING_TABLE` for every kind of model, for an option's help: ``"25 for SD / SDXL,
    28 for SD3, ..."``."""
    return ", ".join(f"{getattr(SAMPLING_TABLE[(task, k)], setting):g} for {name}" for k, name in KIND_NAMES.items())


def sampling_kind(denoiser: Any) -> str:
    """The :data:`SAMPLING_TABLE` row of a denoiser (module or config): its family's name (:mod:`bksdm.families`),
    ``"flux-schnell"`` for a FLUX.1 transformer without guidance embedding.

    Raises:
        UnknownFamilyError: A denoiser of no family bksdm knows.
    """
    from bksdm.families import family_of

    name = family_of(denoiser).name
    config = denoiser.config if isinstance(denoiser, torch.nn.Module) else denoiser
    return "flux-schnell" if name == "flux" and not config.get("guidance_embeds", True) else name


def sampling_defaults(
    model: str | os.PathLike | None = None, task: str = "text-to-image", denoiser: Any = None
) -> SamplingDefaults:
    """The settings ``model`` records in its ``bksdm_toy.json`` (steps, guidance, size), else the table's for
    ``task`` and the model's denoiser.

    The shapes-world teachers record the guidance and steps they sample best with; a hub id or a folder without
    the record gets :data:`SAMPLING_TABLE`. ``strength`` always comes from the table.

    Args:
        model: The model's folder or hub id.
        task: ``"text-to-image"`` or ``"image-to-image"``.
        denoiser: The model's denoiser config (:func:`bksdm.loading.load_denoiser_config`) or module; None: a U-Net.

    Raises:
        SamplingError: The record is not readable JSON.
    """
    from bksdm.artifacts import MODEL_RECORD_FILE

    base = SAMPLING_TABLE[(task, "unet" if denoiser is None else sampling_kind(denoiser))]
    file = Path(model) / MODEL_RECORD_FILE if model is not None else None
    if file is None or not file.is_file():
        return base
    try:
        recorded = json.loads(file.read_text(encoding="utf-8")).get("sampling", {})
    except (ValueError, AttributeError) as err:
        raise SamplingError(
            f"{file} is not a JSON object with a 'sampling' entry ({err}); restore or delete it"
        ) from None
    return replace(
        base,
        steps=int(recorded.get("num_inference_steps", base.steps)),
        guidance_scale=float(recorded.get("guidance_scale", base.guidance_scale)),
        height=recorded.get("height"),
        width=recorded.get("width"),
        source=str(file),
    )


def pipe_kind(pipe) -> str:
    """:func:`sampling_kind` of a loaded pipeline's denoiser; ``"unet"`` for any pipeline with a U-Net (also one
    whose U-Net is wrapped or compiled, which the family registry would not name)."""
    from bksdm.families import denoiser_of

    return "unet" if isinstance(getattr(pipe, "unet", None), torch.nn.Module) else sampling_kind(denoiser_of(pipe))


def latent_patch(pipe) -> int:
    """Latent pixels per token side: 1 for a U-Net, 2 for SD3 (2x2 patches) and FLUX.1 (latents packed 2x2)."""
    return 1 if pipe_kind(pipe) == "unet" else 2


def side_factor(pipe) -> int:
    """What an image side must be a multiple of: the VAE's factor x :func:`latent_patch` (8 for SD, 16 for SD3 and
    FLUX.1, whose pipelines refuse (SD3) or silently round (FLUX) other sizes)."""
    return int(pipe.vae_scale_factor) * latent_patch(pipe)


def embedded_guidance(pipe) -> bool:
    """Whether ``pipe``'s guidance scale is an input of its denoiser (FLUX.1): see
    :attr:`SamplingDefaults.embedded_guidance`."""
    return SAMPLING_TABLE[("text-to-image", pipe_kind(pipe))].embedded_guidance


def classifier_free(pipe, guidance_scale: float) -> bool:
    """Whether a call at ``guidance_scale`` runs classifier-free guidance, doubling the denoiser's batch: above 1,
    except with :func:`embedded_guidance`."""
    return guidance_scale > 1 and not embedded_guidance(pipe)


def check_negative_prompt(negative_prompt: str | None, embedded: bool, option: str = "--negative-prompt") -> None:
    """Refuse a negative prompt for a model with embedded guidance: FluxPipeline would ignore it without a word.

    Raises:
        SamplingError: A negative prompt for a FLUX.1 model.
    """
    if negative_prompt and embedded:
        raise SamplingError(
            f"{option}: FLUX.1 models take no negative prompt (their guidance scale is an input of the transformer, "
            "not classifier-free guidance, and the pipeline would ignore it); leave it out"
        )


def check_steps(steps: Any, option: str = "--steps", max_steps: int | None = None) -> int:
    """``steps`` as an int of at least 1 (and at most ``max_steps``, the scheduler's training steps).

    Raises:
        SamplingError: Not a whole number, below 1, or above ``max_steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise SamplingError(f"{option} {steps!r}: give a whole number of denoising steps, e.g. 25")
    if steps < 1:
        raise SamplingError(f"{option} {steps}: needs at least 1 denoising step (the paper's setting is 25)")
    if max_steps is not None and steps > max_steps:
        raise SamplingError(
            f"{option} {steps}: the model's scheduler was trained with {max_steps} timesteps, so it can take at "
            f"most {max_steps} steps; give {max_steps} or fewer"
        )
    return steps


def check_scheduler_steps(scheduler: Any, steps: int, option: str = "--steps") -> int:
    """``steps`` checked against what ``scheduler`` can really take: it is asked for that many timesteps.

    A scheduler trained on T timesteps with ``steps_offset`` 1 (PNDM, DDIM as SD configures them) can take at
    most T - 1 steps: at T its last timestep is T, one past its noise table (an IndexError mid-generation).

    Raises:
        SamplingError: The scheduler cannot take that many steps (the message gives the most it can).
    """
    check_steps(steps, option)
    total = int(scheduler.config.get("num_train_timesteps", 0) or 0)
    # Flow-matching schedulers (SD3, FLUX.1) space sigmas in (0, 1] and index no noise table: any count works.
    if total <= 0 or type(scheduler).__name__.startswith("FlowMatch"):
        return steps
    fits = steps <= total  # beyond it, schedules repeat timesteps (PNDM: 5000 steps all at t=1)
    if fits:
        trial = type(scheduler).from_config(scheduler.config)
        try:
            trial.set_timesteps(steps)
            fits = int(torch.as_tensor(trial.timesteps).max()) < total
        except (ValueError, IndexError, RuntimeError):
            fits = False
    if not fits:
        most = total - int(scheduler.config.get("steps_offset", 0) or 0)
        raise SamplingError(
            f"{option} {steps}: the model's {type(scheduler).__name__} (trained on {total} timesteps) can take "
            f"at most {most} steps; give {most} or fewer"
        )
    return steps


def check_guidance(guidance: Any, option: str = "--guidance") -> float:
    """``guidance`` as a finite float that is 0, or 1 and above.

    Diffusers applies classifier-free guidance only for scales above 1: any value up to 1 gives the images of
    scale 1 (no guidance), and NaN compares false, so it too turned guidance off without a word. 0 and 1 are the
    conventional ways to say "no guidance" (few-step models use 0) and are kept; values between them, negative
    ones and non-finite ones are refused.

    Raises:
        SamplingError: Not a number, not finite, negative, or strictly between 0 and 1.
    """
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise SamplingError(f"{option} {guidance!r}: give a number, e.g. 7.5 (1 or 0: no guidance)")
    value = float(guidance)
    if not math.isfinite(value):
        raise SamplingError(f"{option} {guidance}: the guidance scale must be a finite number, e.g. 7.5")
    if value < 0:
        raise SamplingError(
            f"{option} {guidance:g}: the guidance scale cannot be negative; give 1 (or 0) for no guidance or a "
            "scale above 1, e.g. 7.5"
        )
    if 0 < value < 1:
        raise SamplingError(
            f"{option} {guidance:g}: guidance applies only above 1, so a scale between 0 and 1 gives exactly the "
            "images of 1 (no guidance); give 1 (or 0) for no guidance or a scale above 1, e.g. 7.5"
        )
    return value


def check_batch_size(batch_size: Any, option: str = "--batch-size") -> int:
    """``batch_size`` as an int of at least 1.

    Raises:
        SamplingError: Not a whole number, or below 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SamplingError(f"{option} {batch_size}: give a whole number of images per call, at least 1")
    return batch_size


def check_side(value: Any, option: str, factor: int | None = None, patch: int = 1) -> int:
    """An image side in pixels: a positive int and, when ``factor`` is given, a multiple of ``factor x patch``.

    Args:
        value: The side.
        option: The option's name, for the message (``--height``).
        factor: The VAE's scale factor (8 for SD): latents are ``side / factor`` wide.
        patch: The denoiser's :func:`latent_patch` (2 for the transformers).

    Raises:
        SamplingError: Not a positive whole number, or not a multiple of ``factor``.
    """
    what = f"the VAE's factor {factor}"
    if factor and patch > 1:
        what = f"{factor * patch} (the VAE's factor {factor} x the transformer's {patch}x{patch} latent patches)"
        factor *= patch
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = f", a multiple of {factor}" if factor else ""
        raise SamplingError(f"{option} {value}: give a positive size in pixels{hint}, e.g. 512")
    if factor and value % factor:
        lower, upper = value - value % factor, value - value % factor + factor
        fix = f"{lower} or {upper}" if lower else f"{upper}"
        raise SamplingError(f"{option} {value} is not a multiple of {what}; give {fix}")
    return value


def steps_run(steps: int, strength: float, kind: str = "unet") -> int:
    """How many of ``steps`` denoising steps an img2img call at ``strength`` runs, as diffusers' ``get_timesteps``
    counts them: ``int(steps x strength)`` for SD's pipelines (``kind`` ``"unet"``); for the flow pipelines (SD3,
    FLUX.1) ``steps - int(steps - steps x strength)``, which rounds up (10 steps at 0.25: 3, not 2)."""
    if kind == "unet":
        return int(steps * strength)
    return steps - int(max(steps - min(steps * strength, steps), 0))


def check_strength(strength: Any, steps: int, option: str = "--strength", kind: str = "unet") -> float:
    """An img2img strength in (0, 1] that leaves at least one of ``steps`` denoising steps to run.

    The pipeline runs the last :func:`steps_run` of ``steps`` steps (``kind``: the model's :func:`sampling_kind`).

    Raises:
        SamplingError: ``steps`` < 1, ``strength`` not a finite number in (0, 1], or no step left to run.
    """
    check_steps(steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise SamplingError(f"{option} {strength}: give a number in (0, 1], e.g. 0.8")
    if not 0.0 < strength <= 1.0:
        raise SamplingError(f"{option} must be in (0, 1] (0: keep the image, 1: ignore it), got {strength}")
    if steps_run(steps, strength, kind) < 1:
        raise SamplingError(
            f"{option} {strength} with --steps {steps} runs int({steps} x {strength}) = 0 denoising steps; "
            f"raise {option} to at least {1 / steps:g} or --steps to at least {int(1 / strength) + 1}"
        )
    return float(strength)


# ------------------------------------------------------------------------------------------------- memory


def check_memory(
    pipe, height: int, width: int, batch: int, guidance: bool, device: torch.device | str, *, what: str
) -> None:
    """Refuse a call that would need more memory than ``device`` has free, before it starts.

    Args:
        pipe: The loaded pipeline (its weights are already in memory, so the free memory excludes them).
        height, width, batch, guidance: The call.
        device: Where it runs.
        what: What is being made, for the message (``"--height 1024 --width 1024"``, ``"big.png (8000x8000)"``).

    Raises:
        SamplingError: The estimate exceeds the free memory; the message gives both, and the largest batch
            that fits when one does.
    """
    need = pipeline_bytes(pipe, height, width, batch, guidance)
    free, source = available_memory(device)
    if need <= free:
        return
    fits = largest_batch(pipe, height, width, batch, guidance, device)
    if batch > 1 and pipeline_bytes(pipe, height, width, fits, guidance) <= free:
        fix = f"lower --batch-size to {fits} or less, or the size"
    else:
        fix = "give a smaller size"
    raise SamplingError(
        f"{what} at batch {batch} needs about {gib(need)} of memory for its activations, but {gib(free)} is "
        f"{source}; {fix}"
    )


def largest_batch(pipe, height: int, width: int, batch: int, guidance: bool, device: torch.device | str) -> int:
    """The largest batch up to ``batch`` whose call fits in ``device``'s free memory (at least 1)."""
    free, _ = available_memory(device)
    low, high = 1, max(batch, 1)  # the need grows with the batch: bisect for the last k that fits
    while low < high:
        middle = (low + high + 1) // 2
        if pipeline_bytes(pipe, height, width, middle, guidance) <= free:
            low = middle
        else:
            high = middle - 1
    return low
