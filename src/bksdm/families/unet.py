"""The U-Net family: SD-v1.x, SD-v2.x and SDXL ``UNet2DConditionModel`` teachers (BK-SDM's own setting).

Plans resolve with :func:`bksdm.plan.resolved.resolve`; training follows the teacher's DDPM schedule with timesteps
uniform on ``[0, num_train_timesteps)`` and the epsilon or velocity target (BK-SDM, Sec. 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from torch import Tensor, nn

from bksdm.families.base import Family
from bksdm.plan.resolved import resolve
from bksdm.plan.spec import Plan
from bksdm.profiling import TEXT_LENGTH, unet_inputs
from bksdm.train.encoders import TextEncoders, encode_text, sdxl_time_ids


def diffusion_target(scheduler: SchedulerMixin, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the U-Net is trained to predict, following the scheduler's ``prediction_type``.

    Args:
        scheduler: A training scheduler (e.g. ``DDPMScheduler.from_config(pipe.scheduler.config)``).
        latents: Clean latents x_0, (B, 4, h, w).
        noise: The Gaussian noise added to them, (B, 4, h, w).
        timesteps: Training timesteps, (B,).

    Returns:
        ``noise`` for epsilon-prediction; the velocity ``sqrt(a_t) * noise - sqrt(1 - a_t) * latents`` for
        v-prediction (SD-v2 768-v), as computed by ``scheduler.get_velocity``.

    Raises:
        ValueError: For any other prediction type (named in the message).
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        if not hasattr(scheduler, "get_velocity"):
            raise ValueError(
                f"{type(scheduler).__name__} cannot compute v-prediction targets; "
                "train with DDPMScheduler.from_config(teacher_scheduler.config)"
            )
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r}: BK-SDM distils 'epsilon' or 'v_prediction' teachers"
    )


class UNetFamily(Family):
    """``UNet2DConditionModel`` teachers."""

    name = "unet"
    denoiser = "unet"
    model_class = UNet2DConditionModel
    class_names = ("UNet2DConditionModel",)
    objective = "diffusion"

    def matches(self, config: Mapping[str, Any]) -> bool:
        return super().matches(config) or "down_block_types" in config

    def resolve(self, plan: Plan, config: Mapping[str, Any]):
        return resolve(plan, config)

    def sample_timestep(self, generator: torch.Generator, scheduler_config: Mapping[str, Any], latent_shape) -> Tensor:
        return torch.randint(0, int(scheduler_config["num_train_timesteps"]), (1,), generator=generator)

    def training_scheduler(self, config: Mapping[str, Any]):
        """``DDPMScheduler``: its ``add_noise`` and prediction type (Euler-type schedulers noise differently)."""
        return DDPMScheduler.from_config(dict(config))

    def timestep_sampler(self, scheduler_config: Mapping[str, Any], latent_shape):
        return None  # draw_noise's uniform integers on [0, num_train_timesteps): BK-SDM's setting

    def noise(self, scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        return scheduler.add_noise(latents, noise, timesteps), diffusion_target(scheduler, latents, noise, timesteps)

    def call(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, text: Tensor, extra: Mapping | None) -> Tensor:
        # return_dict=False: a plain tuple passes through every wrapper's output handling unchanged.
        return model(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=extra, return_dict=False)[0]

    def encode_prompt(self, pipe, captions: list[str], device, model_config=None) -> tuple[Tensor, Tensor | None]:
        return encode_text(captions, TextEncoders.from_pipeline(pipe), device)

    def conditioning(self, pooled: Tensor | None, resolution: int, device, model_config: Mapping[str, Any]):
        if pooled is None:
            return None
        return {"text_embeds": pooled.to(device), "time_ids": sdxl_time_ids(pooled.shape[0], resolution, device)}

    def text_tokens(self, config: Mapping[str, Any], lengths: Mapping[str, int] | None = None) -> int:
        """CLIP's prompt length (77; SDXL's two CLIPs share it)."""
        return max((lengths or {}).values(), default=TEXT_LENGTH)

    def mac_inputs(
        self, config: Mapping[str, Any], resolution: int, device, vae_scale: int, text_tokens: int | None = None
    ) -> dict[str, Any]:
        return unet_inputs(
            config, resolution, device=device, vae_scale=vae_scale, text_tokens=text_tokens or TEXT_LENGTH
        )


UNET = UNetFamily()
