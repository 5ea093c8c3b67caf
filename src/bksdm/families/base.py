"""What every denoiser family answers, and the flow-matching objective the transformer families share.

A *family* is one denoiser class (a U-Net, SD3's ``SD3Transformer2DModel``, FLUX's ``FluxTransformer2DModel``) and
everything bksdm must know to prune and retrain it: its removable units and plan resolution, how to call it with its
conditioning, the training target, how its pipeline encodes prompts, and dummy inputs to count its MACs. The plan,
prune, distill, cache, profile and generate code asks the family instead of testing classes, so a new family is one
new module in this package plus a line in its registry. Pure: no files, no prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from bksdm.plan.spec import Plan
from bksdm.profiling import MacCount, count_macs


class Family:
    """One denoiser family (subclasses fill in every method).

    Attributes:
        name: Short name (``"unet"``, ``"sd3"``, ``"flux"``), recorded in reports.
        denoiser: The pipeline attribute holding the denoiser (``"unet"`` or ``"transformer"``).
        model_class: The stock diffusers class of the denoiser.
        class_names: Denoiser class names (``_class_name`` in config.json) this family handles.
        objective: ``"diffusion"`` (epsilon / v-prediction on a DDPM schedule) or ``"flow"`` (rectified flow).
        folds_text: Whether training may run a trailing stretch of identical text tokens as one weighted token
            (:mod:`bksdm.families.token_runs`): true where text tokens carry no position and attention is joint.
    """

    name: str = ""
    denoiser: str = "transformer"
    model_class: type[nn.Module]
    class_names: tuple[str, ...] = ()
    objective: str = "flow"
    folds_text: bool = False

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether a denoiser config (with or without ``_class_name``) belongs to this family."""
        return config.get("_class_name") in self.class_names

    def resolve(self, plan: Plan, config: Mapping[str, Any]):
        """The plan checked against a teacher config: ``ResolvedPlan`` (U-Net) or ``ResolvedStacks``."""
        raise NotImplementedError

    def sample_timestep(self, generator: torch.Generator, scheduler_config: Mapping[str, Any], latent_shape) -> Tensor:
        """One training timestep (shape (1,)) drawn from ``generator`` alone."""
        raise NotImplementedError

    def training_scheduler(self, config: Mapping[str, Any]):
        """The scheduler the training loop noises latents with, made from the teacher scheduler's config."""
        raise NotImplementedError

    def timestep_sampler(self, scheduler_config: Mapping[str, Any], latent_shape):
        """``draw_noise``'s ``sample_timestep`` for this family (None: draw_noise's uniform integer timesteps)."""
        return lambda generator: self.sample_timestep(generator, scheduler_config, latent_shape)

    def noise(self, scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(noisy latents, training target)`` for clean latents, their noise and timesteps, all (B, C, h, w)."""
        raise NotImplementedError

    def call(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, text: Tensor, extra: Mapping | None) -> Tensor:
        """The denoiser's prediction, in the latents' shape (B, C, h, w); ``model`` may be wrapped (DDP)."""
        raise NotImplementedError

    def encode_prompt(
        self, pipe, captions: list[str], device, model_config: Mapping[str, Any] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The frozen text encoders' output for captions, as the pipeline computes it: (states, pooled or None).

        ``model_config`` is the denoiser's config where the pipeline holds no denoiser (the cache never loads it).
        """
        raise NotImplementedError

    def conditioning(self, pooled: Tensor | None, resolution: int, device, model_config: Mapping[str, Any]):
        """The extra conditioning ``call`` takes besides the text states (SDXL's, the transformers' pooled)."""
        raise NotImplementedError

    def mac_inputs(
        self, config: Mapping[str, Any], resolution: int, device, vae_scale: int, text_tokens: int | None = None
    ) -> dict[str, Any]:
        """Keyword inputs of one denoiser step at batch 1 and ``resolution`` px (for counting MACs), with
        ``text_tokens`` text tokens (None: the family's stock pipeline's count, :meth:`text_tokens`)."""
        raise NotImplementedError

    def text_tokens(self, config: Mapping[str, Any], lengths: Mapping[str, int] | None = None) -> int:
        """Text tokens the denoiser reads per prompt, from each text encoder's prompt length by component name
        (``text_encoder``, ...; None or a missing encoder: the stock pipeline's length)."""
        raise NotImplementedError

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """A denoiser of this family from a config (call under ``torch.device("meta")`` for shapes only)."""
        return self.model_class.from_config(dict(config))

    def step_macs(
        self,
        config: Mapping[str, Any],
        resolution: int,
        vae_scale: int,
        group_depth: int = 6,
        text_tokens: int | None = None,
    ) -> MacCount:
        """MACs of one denoiser step at batch 1 and ``resolution`` px, counted on a weightless (meta) model."""
        with torch.device("meta"):
            model = self.build(config)
        inputs = self.mac_inputs(config, resolution, "meta", vae_scale, text_tokens)
        return count_macs(model, group_depth=group_depth, **inputs)


def logit_normal(generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> float:
    """u in (0, 1) with logit(u) ~ N(mean, std): SD3's default timestep density (Esser et al. 2024, Sec. 3.1)."""
    return float(torch.sigmoid(mean + std * torch.randn(1, generator=generator)))


class FlowMatching(Family):
    """Rectified flow as SD3 and FLUX.1 were trained: x_t = (1 - s) x_0 + s n, target n - x_0.

    Timesteps are ``s * num_train_timesteps`` (what the pipelines pass the transformer) with s drawn logit-normal and
    moved by the teacher scheduler's shift (:meth:`shift`), as diffusers' SD3 / FLUX training scripts do by default.
    """

    objective = "flow"

    def training_scheduler(self, config: Mapping[str, Any]):
        """The SD3 / FLUX pipelines' own ``FlowMatchEulerDiscreteScheduler``, whose config (``shift``,
        ``use_dynamic_shifting``, ``num_train_timesteps``) the family reads to draw and apply timesteps."""
        return FlowMatchEulerDiscreteScheduler.from_config(dict(config))

    def shift(self, u: float, scheduler_config: Mapping[str, Any], latent_shape) -> float:
        """SD3's constant shift: s = shift * u / (1 + (shift - 1) * u) (``shift`` from the scheduler config)."""
        shift = float(scheduler_config.get("shift", 1.0))
        return shift * u / (1 + (shift - 1) * u)

    def sample_timestep(self, generator: torch.Generator, scheduler_config: Mapping[str, Any], latent_shape) -> Tensor:
        sigma = self.shift(logit_normal(generator), scheduler_config, latent_shape)
        return torch.tensor([sigma * float(scheduler_config.get("num_train_timesteps", 1000))], dtype=torch.float32)

    def noise(self, scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        total = float(scheduler.config.get("num_train_timesteps", 1000))
        sigma = (timesteps.float() / total).view(-1, *([1] * (latents.ndim - 1)))  # (B, 1, 1, 1)
        return (1 - sigma) * latents + sigma * noise, noise - latents


def dynamic_shift(u: float, scheduler_config: Mapping[str, Any], image_tokens: int) -> float:
    """FLUX's resolution-dependent shift: mu grows linearly with the image's token count (scheduler config)."""
    base, top = float(scheduler_config.get("base_shift", 0.5)), float(scheduler_config.get("max_shift", 1.15))
    lo, hi = int(scheduler_config.get("base_image_seq_len", 256)), int(scheduler_config.get("max_image_seq_len", 4096))
    mu = base + (top - base) * (image_tokens - lo) / (hi - lo)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
