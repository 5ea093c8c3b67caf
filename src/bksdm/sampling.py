"""The sampling settings a user gives (steps, guidance, size, batch, strength): checked before any work.

One place for the rules, so ``generate``, ``img2img`` and ``serve`` accept and refuse the same values with the
same message: the option, the value and the fix. Found by trying bad values on every command (issue 11):
``--height 0`` silently gave the native size, ``--height -64`` a traceback, ``--guidance nan`` or ``-5`` turned
guidance off without a word (and wrote a bare ``NaN`` into settings.json), and ``--height 100000`` allocated
until the kernel killed the process at 18.7 GB.

The size ceiling is an estimate of the memory one pipeline call needs at that size and batch, compared with
what the device has free once the weights are loaded. Measured on the SD-v1.4 architecture (fp32, 2-core CPU,
torch 2.13, diffusers 0.42; peak RSS above the loaded weights):

=========================================  ==========  ===================================
call                                       measured    :func:`generation_bytes`'s term
=========================================  ==========  ===================================
VAE decode, 1 x 256 px                     331 MiB     9 x 128 x 256^2 x 4 B = 288 MiB
VAE decode, 4 x 256 px                     915 MiB     1152 MiB
VAE decode, 1 x 512 px                     1046 MiB    1152 MiB
U-Net step, 512 px, batch 2 (guidance)     407 MiB     48 x 320 x 64^2 x 2 x 4 B = 480 MiB
=========================================  ==========  ===================================

The VAE decoder's full-resolution activations dominate; the attention maps (batch x heads x (h*w/64)^2) are
never materialised by PyTorch's ``scaled_dot_product_attention``, which diffusers uses by default (measured:
a 2 x 8 x 4096^2 fp32 map is 1 GiB, the SDPA call peaked 15 MiB above its inputs), so they count only when the
U-Net runs an attention processor that builds them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SAMPLING_TABLE",
    "SamplingDefaults",
    "SamplingError",
    "available_memory",
    "check_batch_size",
    "check_guidance",
    "check_memory",
    "check_side",
    "check_steps",
    "check_strength",
    "generation_bytes",
    "largest_batch",
    "pipeline_bytes",
    "sampling_defaults",
    "unet_activation_bytes",
    "vae_activation_bytes",
]

UNET_TENSORS_PER_CHANNEL = 48
"""U-Net activations alive at once, in units of (first-stage channels x latent pixels x batch): 39 measured."""
VAE_TENSORS_PER_CHANNEL = 9
"""VAE decoder/encoder activations alive at once, in units of (first-stage channels x pixels x batch): 8 measured."""


class SamplingError(ValueError):
    """A sampling setting that cannot work: the message names the option, the value and the fix."""


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings a command uses for the options the user leaves out."""

    steps: int
    guidance_scale: float
    height: int | None = None
    """None: the model's native size (its U-Net's sample size times the VAE's factor)."""
    width: int | None = None
    strength: float = 0.8
    """img2img only: how far the input is noised."""
    source: str = "bksdm.sampling.SAMPLING_TABLE"


SAMPLING_TABLE = {
    "text-to-image": SamplingDefaults(steps=25, guidance_scale=7.5),  # the BK-SDM paper's evaluation
    "image-to-image": SamplingDefaults(steps=50, guidance_scale=7.5, strength=0.8),  # diffusers' img2img defaults
}
"""Defaults for a model that records none, per task."""


def sampling_defaults(model: str | os.PathLike | None = None, task: str = "text-to-image") -> SamplingDefaults:
    """The settings ``model`` records in its ``bksdm_toy.json`` (steps, guidance, size), else the table's for ``task``.

    The shapes-world teachers record the guidance and steps they sample best with; a hub id or a folder without
    the record gets :data:`SAMPLING_TABLE`. ``strength`` always comes from the table.

    Raises:
        SamplingError: The record is not readable JSON.
    """
    from bksdm.artifacts import MODEL_RECORD_FILE

    base = SAMPLING_TABLE[task]
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
    if total <= 0:
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


def check_side(value: Any, option: str, factor: int | None = None) -> int:
    """An image side in pixels: a positive int and, when ``factor`` is given, a multiple of it.

    Args:
        value: The side.
        option: The option's name, for the message (``--height``).
        factor: The VAE's scale factor (8 for SD): latents are ``side / factor`` wide.

    Raises:
        SamplingError: Not a positive whole number, or not a multiple of ``factor``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = f", a multiple of {factor}" if factor else ""
        raise SamplingError(f"{option} {value}: give a positive size in pixels{hint}, e.g. 512")
    if factor and value % factor:
        lower, upper = value - value % factor, value - value % factor + factor
        fix = f"{lower} or {upper}" if lower else f"{upper}"
        raise SamplingError(f"{option} {value} is not a multiple of the VAE's factor {factor}; give {fix}")
    return value


def check_strength(strength: Any, steps: int, option: str = "--strength") -> float:
    """An img2img strength in (0, 1] that leaves at least one of ``steps`` denoising steps to run.

    The pipeline runs the last ``int(steps * strength)`` of ``steps`` steps.

    Raises:
        SamplingError: ``steps`` < 1, ``strength`` not a finite number in (0, 1], or no step left to run.
    """
    check_steps(steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise SamplingError(f"{option} {strength}: give a number in (0, 1], e.g. 0.8")
    if not 0.0 < strength <= 1.0:
        raise SamplingError(f"{option} must be in (0, 1] (0: keep the image, 1: ignore it), got {strength}")
    if int(steps * strength) < 1:
        raise SamplingError(
            f"{option} {strength} with --steps {steps} runs int({steps} x {strength}) = 0 denoising steps; "
            f"raise {option} to at least {1 / steps:g} or --steps to at least {int(1 / strength) + 1}"
        )
    return float(strength)


# ------------------------------------------------------------------------------------------------- memory


def unet_activation_bytes(
    unet_config: Any, latent_pixels: int, batch: int, dtype_bytes: int = 4, *, attention_maps: bool = False
) -> int:
    """Bytes of activations one U-Net call holds at its peak (estimate; see the module's table).

    Args:
        unet_config: The U-Net's config (a mapping or a diffusers config object).
        latent_pixels: Latent height x width.
        batch: The U-Net's batch (twice the images under classifier-free guidance).
        dtype_bytes: Bytes per element.
        attention_maps: Whether attention materialises its (batch, heads, tokens, tokens) maps.
    """
    unet = dict(unet_config)
    channels = list(unet["block_out_channels"])
    total = UNET_TENSORS_PER_CHANNEL * channels[0] * latent_pixels * batch * dtype_bytes
    if attention_maps:
        heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
        stages = [i for i, kind in enumerate(unet["down_block_types"]) if "Attn" in kind]
        # scores and their softmax, per stage; the stages run one after the other
        total += max((2 * batch * heads[i] * (latent_pixels / 4**i) ** 2 * dtype_bytes for i in stages), default=0)
    return int(total)


def vae_activation_bytes(vae_config: Any, height: int, width: int, batch: int, dtype_bytes: int = 4) -> int:
    """Bytes of activations one VAE decode (or encode) of ``batch`` images holds at its peak (estimate)."""
    channels = dict(vae_config)["block_out_channels"][0]
    return int(VAE_TENSORS_PER_CHANNEL * channels * height * width * batch * dtype_bytes)


def generation_bytes(
    unet_config: Any,
    vae_config: Any,
    height: int,
    width: int,
    batch: int,
    *,
    guidance: bool,
    unet_dtype_bytes: int = 4,
    vae_dtype_bytes: int = 4,
    attention_maps: bool = False,
) -> int:
    """Bytes of activations one pipeline call needs above its weights (estimate; see the module's table).

    The U-Net steps and the VAE decode (or encode, for img2img) run one after the other, so the peak is the
    larger of the two, plus the decoded images.

    Args:
        unet_config, vae_config: The pipeline's U-Net and VAE configs (mappings or diffusers config objects).
        height, width: Image size in pixels.
        batch: Images per call.
        guidance: Whether classifier-free guidance runs (it doubles the U-Net's batch).
        unet_dtype_bytes, vae_dtype_bytes: Bytes per element of each network's activations.
        attention_maps: Whether the U-Net's attention materialises its maps (not with PyTorch's SDPA).

    Returns:
        The estimate in bytes.
    """
    factor = 2 ** (len(dict(vae_config)["block_out_channels"]) - 1)
    latent_pixels = (height // factor) * (width // factor)
    unet = unet_activation_bytes(
        unet_config, latent_pixels, batch * (2 if guidance else 1), unet_dtype_bytes, attention_maps=attention_maps
    )
    vae = vae_activation_bytes(vae_config, height, width, batch, vae_dtype_bytes)
    images = 3 * height * width * batch * (4 + 4 + 1)  # the decoded float tensor, its numpy copy, 8-bit pixels
    return max(unet, vae) + images


def available_memory(device: torch.device | str) -> tuple[int, str]:
    """Bytes a computation on ``device`` can still allocate, and where that figure comes from.

    CUDA: the driver's free memory plus what PyTorch holds cached but unused. CPU: the kernel's
    ``MemAvailable`` (free memory plus what the page cache can give back), lowered to a cgroup's remaining
    limit inside a container that has one.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + cached), f"free on cuda:{index}"
    available, source = _mem_available()
    limit = _cgroup_room()
    if limit is not None and limit < available:
        return limit, "left under this container's memory limit"
    return available, source


def _mem_available() -> tuple[int, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available on this machine"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free on this machine"
    except (ValueError, OSError, AttributeError):
        return 2**62, "unknown (not checked)"


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit, or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    try:
        return max(int(limit) - used, 0)
    except ValueError:
        return None


def _attention_maps(unet) -> bool:
    """Whether some attention processor of ``unet`` builds its maps (every one but PyTorch's SDPA / xFormers)."""
    processors = getattr(unet, "attn_processors", {}) or {}
    return any(not (type(p).__name__.endswith("2_0") or "XFormers" in type(p).__name__) for p in processors.values())


def _dtype_bytes(module) -> int:
    try:
        return next(module.parameters()).element_size()
    except (StopIteration, AttributeError):
        return 4


def pipeline_bytes(pipe, height: int, width: int, batch: int, guidance: bool) -> int:
    """:func:`generation_bytes` for a loaded diffusers pipeline (its configs, dtypes and attention processors).

    The VAE counts in fp32 when its config asks for an upcast (``force_upcast``) and the pipeline runs in fp16.
    """
    vae_bytes = _dtype_bytes(pipe.vae)
    if vae_bytes == 2 and getattr(pipe.vae.config, "force_upcast", False):
        vae_bytes = 4
    return generation_bytes(
        pipe.unet.config,
        pipe.vae.config,
        height,
        width,
        batch,
        guidance=guidance,
        unet_dtype_bytes=_dtype_bytes(pipe.unet),
        vae_dtype_bytes=vae_bytes,
        attention_maps=_attention_maps(pipe.unet),
    )


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
        f"{what} at batch {batch} needs about {_gib(need)} of memory for its activations, but {_gib(free)} is "
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


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"
