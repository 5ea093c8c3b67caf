"""The demo's logic, without HTTP: the loaded pipelines, their shared sampling settings, generation and timing.

:class:`DemoApp` answers requests as plain Python (validate, generate, encode); :mod:`bksdm.use.serve.server`
wraps it in an HTTP server, :mod:`bksdm.use.serve.page` is the page it serves.

Every model draws from the same seed for a request, so the images differ only by the model (the same
initial latent), and the same prompt and seed always give the same image. Generation is serialised with a
lock: one request at a time uses the models, others wait. :meth:`DemoApp.stop` ends a generation in progress
after its current denoising step.
"""

from __future__ import annotations

import base64
import inspect
import io
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bksdm.eval.generate import generate_images
from bksdm.sampling import check_guidance, check_scheduler_steps, check_side, check_steps, latent_patch, pipe_kind
from bksdm.use.serve.api import MAX_PROMPT_CHARS, MAX_SEED, parse_generate_request, stopping_error

__all__ = ["DemoApp", "SamplingSettings", "ServedModel", "default_sampling", "load_models"]


@dataclass(frozen=True)
class SamplingSettings:
    """How every model samples: the same settings for all, so only the model differs between images."""

    steps: int = 25
    """Denoising steps per image."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (1 turns guidance off); for FLUX.1 the value fed to its guidance embedding."""
    height: int | None = None
    """Image height in pixels (None: the pipeline's native size; FluxPipeline's is 1024)."""
    width: int | None = None
    """Image width in pixels (None: the pipeline's native size)."""

    def __post_init__(self) -> None:  # the rules of every sampling command (bksdm.sampling)
        check_steps(self.steps, "steps")
        check_guidance(self.guidance_scale, "guidance")
        for option, side in (("height", self.height), ("width", self.width)):
            if side is not None:
                check_side(side, option, 8)


def default_sampling(
    teacher: str,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> SamplingSettings:
    """Sampling settings: the given values, else the shapes teacher's recorded ones, else the table's for the
    teacher's denoiser (:data:`bksdm.sampling.SAMPLING_TABLE`: 25 / 7.5 for SD, 28 / 7.0 for SD3, 28 / 3.5 at
    1024 px for FLUX.1-dev, 4 / 0 for schnell).

    Args:
        teacher: The teacher's folder or hub id.
        steps: ``--steps``, or None.
        guidance: ``--guidance``, or None.
        height, width: ``--height`` / ``--width``, or None.

    Returns:
        The :class:`SamplingSettings` for :class:`DemoApp`.

    Raises:
        ValueError: steps below 1 or a negative guidance scale.
        TeacherNotFoundError: A teacher without a record that is no pipeline folder or readable hub id.
    """
    from bksdm.eval.generate import model_denoiser
    from bksdm.sampling import sampling_defaults
    from bksdm.world.teacher import SETTINGS_FILE, recommended_settings

    if (Path(teacher) / SETTINGS_FILE).is_file():  # a shapes-world teacher records how it samples best
        recorded = recommended_settings(teacher)
        base = {
            "steps": recorded["num_inference_steps"],
            "guidance_scale": recorded["guidance_scale"],
            "height": recorded["height"],
            "width": recorded["width"],
        }
    else:
        table = sampling_defaults(teacher, denoiser=model_denoiser(teacher, option="--teacher"))
        base = {"steps": table.steps, "guidance_scale": table.guidance_scale}
        base |= {"height": table.height, "width": table.width}
    given = {"steps": steps, "guidance_scale": guidance, "height": height, "width": width}
    return SamplingSettings(**(base | {k: v for k, v in given.items() if v is not None}))


@dataclass(frozen=True)
class ServedModel:
    """One pipeline on the page."""

    name: str
    """Label on the page and in the API (``teacher``, ``student``, ``student 2``, ...)."""
    source: str
    """Where it was loaded from (folder or hub id), shown under the label."""
    pipe: Any
    """A diffusers text-to-image pipeline (SD, SDXL, SD3, FLUX.1)."""

    @property
    def denoiser_params(self) -> int:
        """Parameters of the pipeline's denoiser (its U-Net or transformer)."""
        from bksdm.families import denoiser_of

        return sum(p.numel() for p in denoiser_of(self.pipe).parameters())

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/models`` lists of the model: name, source, its denoiser (``"U-Net"`` or
        ``"transformer"``) and its parameters (also as ``unet_params`` for a U-Net)."""
        kind = "U-Net" if pipe_kind(self.pipe) == "unet" else "transformer"
        entry = {"name": self.name, "source": self.source, "denoiser": kind, "denoiser_params": self.denoiser_params}
        return entry | ({"unet_params": entry["denoiser_params"]} if kind == "U-Net" else {})


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class DemoApp:
    """The demo's logic, without HTTP: the models, their sampling settings, and one lock around generation.

    Args:
        models: The pipelines to show, in page order (the teacher first); names must be unique.
        settings: Sampling settings shared by every model.

    Raises:
        ValueError: no models, or two models with the same name.
    """

    def __init__(self, models: Sequence[ServedModel], settings: SamplingSettings | None = None) -> None:
        if not models:
            raise ValueError("the demo needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique (got {names})")
        self.models = list(models)
        self.settings = settings or SamplingSettings()
        for model in self.models:  # refused at start, not at every request
            check_scheduler_steps(model.pipe.scheduler, self.settings.steps, "steps")
            for option, side in (("height", self.settings.height), ("width", self.settings.width)):
                if side is not None:
                    check_side(side, option, model.pipe.vae_scale_factor, latent_patch(model.pipe))
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def busy(self) -> bool:
        """Whether a generation (or the warm-up) is running."""
        return self._lock.locked()

    def stop(self) -> None:
        """Refuse new generations (503) and end the one in progress after its current denoising step.

        Called from another thread (the server's, at Ctrl-C); the generating thread then raises
        :class:`RequestError` with status 503. Final: the app does not generate again.
        """
        self._stopping.set()

    def info(self) -> dict[str, Any]:
        """What ``GET /api/models`` answers: the models and the sampling settings."""
        return {
            "models": [m.describe() for m in self.models],
            "steps": self.settings.steps,
            "guidance_scale": self.settings.guidance_scale,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_seed": MAX_SEED,
        }

    def warm_up(self) -> None:
        """Run each model once for one step, so that one-time costs do not land in the first timed request."""
        with self._lock:
            for model in self.models:
                generate_images(
                    model.pipe,
                    ["warm up"],
                    [0],
                    steps=1,
                    guidance_scale=self.settings.guidance_scale,
                    batch_size=1,
                    height=self.settings.height,
                    width=self.settings.width,
                )

    def generate(self, prompt: str, seed: int) -> dict[str, Any]:
        """One image per model for ``prompt`` from ``seed``, with each model's wall-clock time.

        Returns:
            ``{"prompt", "seed", "steps", "guidance_scale", "models": [{"name", "source", "image", "seconds",
            "width", "height"}]}`` where ``image`` is a ``data:image/png;base64,...`` URL.
        """
        results = []
        with self._lock:  # one request at a time: timings stay honest and memory stays bounded
            for model in self.models:
                if self._stopping.is_set():  # queued behind the lock while the server was stopped
                    raise stopping_error()
                started = time.perf_counter()
                (image,) = generate_images(
                    _Stoppable(model.pipe, self._stopping),
                    [prompt],
                    [seed],
                    steps=self.settings.steps,
                    guidance_scale=self.settings.guidance_scale,
                    batch_size=1,
                    height=self.settings.height,
                    width=self.settings.width,
                )
                seconds = time.perf_counter() - started  # PIL output: the device has finished
                results.append(
                    {
                        "name": model.name,
                        "source": model.source,
                        "image": _png_data_url(image),
                        "seconds": round(seconds, 4),
                        "width": image.width,
                        "height": image.height,
                    }
                )
        return {
            "prompt": prompt,
            "seed": seed,
            "steps": self.settings.steps,
            "guidance_scale": self.settings.guidance_scale,
            "models": results,
        }

    def handle_generate(self, payload: Any) -> dict[str, Any]:
        """Validate a decoded ``POST /api/generate`` body, then generate.

        Raises:
            RequestError: a bad request (see :func:`parse_generate_request`).
        """
        prompt, seed = parse_generate_request(payload)
        return self.generate(prompt, seed)


class _Stopped(Exception):
    """Raised between denoising steps to end a generation when the server stops."""


class _Stoppable:
    """A pipeline that ends its call between two denoising steps once ``stopping`` is set.

    Stopping between steps (rather than leaving a thread inside PyTorch at exit, which aborts the process) keeps
    Ctrl-C within one step of any request. Pipelines whose call has no ``callback_on_step_end`` run to the end.
    """

    def __init__(self, pipe: Any, stopping: threading.Event) -> None:
        self._pipe = pipe
        self._stopping = stopping

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "callback_on_step_end" in inspect.signature(self._pipe.__call__).parameters:
            kwargs["callback_on_step_end"] = self._check
        try:
            return self._pipe(*args, **kwargs)
        except _Stopped:
            raise stopping_error() from None

    def _check(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._stopping.is_set():
            raise _Stopped
        return callback_kwargs


def load_models(
    teacher: str,
    students: Sequence[str],
    *,
    dtype: Any = None,
    device: str = "cpu",
) -> list[ServedModel]:
    """Load the teacher and the students once, named ``teacher`` and ``student`` (``student 1``, ... if several).

    Args:
        teacher: Hub id or local folder of a diffusers pipeline.
        students: Hub ids or local folders of student pipelines (``bksdm prune`` / ``distill`` outputs).
        dtype: Torch dtype of the weights (default float32).
        device: Device to run on.

    Raises:
        TeacherNotFoundError: a model is neither a local pipeline folder nor reachable on the hub.
    """
    import torch

    from bksdm.loading import load_pipeline

    dtype = dtype or torch.float32
    named = [("teacher", teacher)]
    if len(students) == 1:
        named.append(("student", students[0]))
    else:
        named.extend((f"student {i + 1}", ref) for i, ref in enumerate(students))
    models = []
    for name, ref in named:
        pipe = load_pipeline(ref, dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        models.append(ServedModel(name=name, source=os.fspath(ref), pipe=pipe))
    return models
