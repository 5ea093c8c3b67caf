"""Latent consistency distillation (LCM, Luo et al. 2023, arXiv 2310.04378): the objective of one training step.

A consistency model ``f(x_t, ω, c, t)`` maps any point of the teacher's guided probability-flow ODE trajectory to
that trajectory's clean end, so one network call (or a few, re-noising in between) draws an image. It is
parameterised from the U-Net's own prediction with the boundary condition ``f(x, 0) = x`` built in (Sec. 3.2):

    f(x, t) = c_skip(t) · x + c_out(t) · x̂_0(x, t),
    c_skip(t) = σ_d² / ((s t)² + σ_d²),  c_out(t) = s t / sqrt((s t)² + σ_d²),  σ_d = 0.5,

where ``x̂_0`` is the clean latent the U-Net's epsilon or velocity implies and ``s`` (10 by default) sharpens the
boundary condition (diffusers' ``LCMScheduler`` samples with the same scalings). One step of training (Algorithm 1):

1. noise a latent to ``t_{n+k}``, one of the 50 timesteps of a DDIM schedule over T = 1000 training steps (the
   skipping step is k = T / 50 = 20 training timesteps, the paper's k = 20);
2. the frozen teacher, with classifier-free guidance at a scale ω drawn per sample, estimates ``x̂_0`` and ``ε̂``
   there, and one DDIM step carries the latent to ``t_n`` (the augmented PF-ODE solver, Eq. 9);
3. the target network (an EMA of the student) evaluates ``f`` at ``(x_{t_n}, t_n)``; the student at
   ``(x_{t_{n+k}}, t_{n+k})``; the loss is a Huber or L2 distance between the two.

Guidance scales here are the pipelines' (``guidance_scale`` s of ``StableDiffusionPipeline``); the paper's ω is
``s - 1``: ``ε̂ = ε(∅) + s (ε(c) - ε(∅)) = (1 + ω) ε(c) - ω ε(∅)``. A full LCM student takes ω through its
guidance embedding (``timestep_cond``, as diffusers' pipelines compute it from ``guidance_scale - 1``); an LCM-LoRA
takes none (it learns the range's guidance on average, as diffusers' LCM-LoRA script).

Pure: no files, no prints; randomness from :mod:`bksdm.seeding` generators keyed by sample position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bksdm.seeding import sample_generator
from bksdm.train.cpu_kernels import cpu_kernels, student_kernels
from bksdm.train.kd import unwrap

__all__ = [
    "LOSSES",
    "STREAM_GUIDANCE",
    "DDIMSolver",
    "LcmObjective",
    "boundary_scalings",
    "consistency_loss",
    "draw_guidance",
    "guidance_embedding",
    "lcm_step",
    "predicted_noise",
    "predicted_original",
]

LOSSES = ("huber", "l2")
"""The distances of the consistency loss."""

STREAM_GUIDANCE = 3
"""Seeding stream of the per-sample guidance scale (data and diffusion noise use streams 1 and 2)."""


def boundary_scalings(
    timesteps: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` at integer training timesteps, (B,) each, float32.

    ``c_skip(0) = 1`` and ``c_out(0) = 0``, so ``f(x, 0) = x`` whatever the network says (the consistency model's
    boundary condition); the same scalings as ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.
    """
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _at(table: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` per sample, shaped to broadcast over ``like`` (B, 1, 1, 1)."""
    return table.to(like.device)[timesteps.to(like.device)].view(-1, *([1] * (like.ndim - 1))).float()


def predicted_original(
    output: Tensor, sample: Tensor, timesteps: Tensor, prediction_type: str, alphas_cumprod: Tensor
) -> Tensor:
    """The clean latent x̂_0 a U-Net output implies at ``sample`` (x_t): epsilon ``(x - σ ε) / α``, velocity
    ``α x - σ v`` (α² = ᾱ_t, σ² = 1 - ᾱ_t), or ``sample`` prediction itself."""
    a = _at(alphas_cumprod, timesteps, sample)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type {prediction_type!r}: LCM distils epsilon, v_prediction or sample U-Nets")


def predicted_noise(
    output: Tensor, sample: Tensor, timesteps: Tensor, prediction_type: str, alphas_cumprod: Tensor
) -> Tensor:
    """The noise ε̂ a U-Net output implies at ``sample`` (x_t): epsilon itself, velocity ``α v + σ x``, or
    ``(x - α x̂_0) / σ`` for sample prediction."""
    a = _at(alphas_cumprod, timesteps, sample)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha * output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * output) / sigma
    raise ValueError(f"prediction_type {prediction_type!r}: LCM distils epsilon, v_prediction or sample U-Nets")


@dataclass(frozen=True)
class DDIMSolver:
    """The skipping-step DDIM solver: the ``num_steps`` timesteps ``k-1, 2k-1, ..., T-1`` (k = T / num_steps) of a
    DDIM schedule, and the deterministic DDIM step from one to the one below it (to 0 below the first).

    ``LCMScheduler`` samples on the same grid (its ``original_inference_steps``), so the timesteps a student is
    trained on are the ones it is sampled at.

    Attributes:
        timesteps: (N,) long: the schedule's timesteps, ascending.
        alphas_cumprod: (T,) float64: ᾱ of the teacher's training schedule.
    """

    timesteps: Tensor
    alphas_cumprod: Tensor

    @classmethod
    def from_alphas(cls, alphas_cumprod: Tensor, num_steps: int = 50) -> DDIMSolver:
        """The solver over ``num_steps`` steps of a schedule with ``len(alphas_cumprod)`` training timesteps.

        Raises:
            ValueError: ``num_steps`` is not in [1, T].
        """
        total = len(alphas_cumprod)
        if not 1 <= num_steps <= total:
            raise ValueError(f"the DDIM solver takes 1 to {total} steps (the training timesteps), not {num_steps}")
        k = total // num_steps
        timesteps = torch.arange(1, num_steps + 1, dtype=torch.long) * k - 1  # (N,)
        return cls(timesteps, alphas_cumprod.to(torch.float64))

    @property
    def skip(self) -> int:
        """k: training timesteps between two solver timesteps (20 for 50 steps of 1000)."""
        return int(self.timesteps[0]) + 1

    def interval(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_{n+k}, t_n)`` for solver indices (B,): the timestep and the one ``k`` below it (clamped at 0)."""
        start = self.timesteps[index.cpu()]
        return start, (start - self.skip).clamp(min=0)

    def step(self, x0: Tensor, eps: Tensor, end: Tensor) -> Tensor:
        """DDIM's deterministic step to ``end`` (B,) from the clean latent and noise estimated at the start:
        ``x_end = sqrt(ᾱ_end) x̂_0 + sqrt(1 - ᾱ_end) ε̂`` (Song et al. 2021, Eq. 12 with σ = 0)."""
        a = _at(self.alphas_cumprod, end, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def guidance_embedding(omega: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of guidance strengths ω (B,) → (B, dim) float32, the U-Net's ``timestep_cond``.

    The embedding of diffusers' ``StableDiffusionPipeline.get_guidance_scale_embedding`` (VDM's timestep
    embedding of ``1000 ω``), which the stock pipelines feed a U-Net that has ``time_cond_proj_dim``, with
    ω = ``guidance_scale - 1``; an odd ``dim`` gets one zero column.
    """
    if omega.ndim != 1:
        raise ValueError(f"guidance strengths must be one per sample, (B,), got shape {tuple(omega.shape)}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))  # (dim/2,)
    angles = omega.float().cpu()[:, None] * 1000.0 * freqs[None, :]  # (B, dim/2)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(omega.device)  # (B, dim)


def draw_guidance(seed: int, step: int, positions: Sequence[int] | Tensor, low: float, high: float) -> Tensor:
    """One guidance scale per sample, uniform on [low, high], from its own position-keyed generator: (B,) float32
    on the CPU (independent of batch size and process count, as :func:`bksdm.train.kd.draw_noise`)."""
    if isinstance(positions, Tensor):
        positions = positions.tolist()
    draws = [torch.rand(1, generator=sample_generator(seed, step, int(p), STREAM_GUIDANCE)) for p in positions]
    u = torch.cat(draws) if draws else torch.empty(0)
    return low + (high - low) * u


def consistency_loss(prediction: Tensor, target: Tensor, kind: str = "huber", huber_c: float = 0.001) -> Tensor:
    """The distance of the consistency loss, a float32 scalar: the pseudo-Huber ``mean(sqrt(d² + c²) - c)``
    (≈ d²/2c near 0, ≈ |d| for outliers; LCM's choice) or the mean squared error.

    Raises:
        ValueError: shapes differ, or an unknown ``kind``.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"consistency loss: shapes differ, {tuple(prediction.shape)} vs {tuple(target.shape)}")
    diff = prediction.float() - target.float()
    if kind == "huber":
        return torch.mean(torch.sqrt(diff**2 + huber_c**2) - huber_c)
    if kind == "l2":
        return torch.mean(diff**2)
    raise ValueError(f"loss {kind!r}: one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class LcmObjective:
    """What defines the consistency objective besides the networks.

    Attributes:
        solver: The skipping-step DDIM solver over the teacher's schedule.
        prediction_type: The teacher's (and student's) ``epsilon`` or ``v_prediction``.
        loss: ``huber`` or ``l2``.
        huber_c: The pseudo-Huber constant c.
        timestep_scaling: s of the boundary scalings.
        embed_dim: The student's ``time_cond_proj_dim`` (None: no guidance embedding, an LCM-LoRA).
    """

    solver: DDIMSolver
    prediction_type: str
    loss: str = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    embed_dim: int | None = None


def _unet(model: nn.Module, x: Tensor, t: Tensor, text: Tensor, cond: Tensor | None, params=None) -> Tensor:
    """A U-Net's prediction (B, C, h, w); with ``params`` (name -> tensor) in place of its own of those names."""
    kwargs = {"encoder_hidden_states": text, "timestep_cond": cond, "return_dict": False}
    if params is None:
        return model(x, t, **kwargs)[0]
    return functional_call(model, dict(params), (x, t), kwargs, strict=False)[0]


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def lcm_step(
    student: nn.Module,
    teacher: nn.Module,
    target: Mapping[str, Tensor],
    objective: LcmObjective,
    latents: Tensor,
    text: Tensor,
    uncond: Tensor,
    index: Tensor,
    noise: Tensor,
    guidance: Tensor,
) -> dict[str, Tensor]:
    """One consistency-distillation forward (LCM Algorithm 1); returns ``loss`` (with a graph to the student).

    The teacher and the target network run under ``no_grad``; the target network is the student's module with
    ``target``'s tensors (the EMA weights, by parameter name) in place of its own, so no second copy of the model
    is kept (with the student's own trainable tensors it is the online network, diffusers' LCM-LoRA target).

    Args:
        student: The student U-Net, possibly wrapped (DDP, accelerate).
        teacher: The frozen teacher U-Net, in eval mode (any dtype).
        target: The target network's tensors by the student's parameter names (trainable ones suffice).
        objective: Solver, prediction type, loss and scalings.
        latents: Clean, scaled latents x_0, (B, C, h, w).
        text: Text states of the prompts, (B, L, D).
        uncond: Text states of the empty prompt, (1, L, D) or (B, L, D).
        index: Solver indices n (B,), uniform on [0, N).
        noise: (B, C, h, w) standard normal noise.
        guidance: Guidance scales s (B,), the pipelines' convention (ω = s - 1).

    Returns:
        float32 scalars: ``loss`` and ``loss_l2`` (the mean squared distance, logged whatever the loss).
    """
    latents, noise = latents.float(), noise.float()
    solver, kind = objective.solver, objective.prediction_type
    alphas = solver.alphas_cumprod
    start, end = solver.interval(index)  # (B,) each
    start, end = start.to(latents.device), end.to(latents.device)
    a = _at(alphas, start, latents)
    x_start = a.sqrt() * latents + (1 - a).sqrt() * noise  # z_{t_{n+k}}: DDPM's add_noise, (B, C, h, w)
    omega = (guidance - 1).view(-1, 1, 1, 1).to(latents.device)  # the paper's ω, (B, 1, 1, 1)
    cond = None
    if objective.embed_dim is not None:
        cond = guidance_embedding(guidance.float() - 1, objective.embed_dim).to(latents.device)  # (B, D_w)

    with torch.no_grad(), cpu_kernels(latents.device):
        dtype = _dtype(teacher)
        both = torch.cat([x_start, x_start]).to(dtype)  # (2B, C, h, w): empty prompt, then the prompts
        states = torch.cat([uncond.expand_as(text), text]).to(dtype)
        out_u, out_c = _unet(teacher, both, torch.cat([start, start]), states, None).float().chunk(2)
        x0_u, x0_c = (predicted_original(o, x_start, start, kind, alphas) for o in (out_u, out_c))
        eps_u, eps_c = (predicted_noise(o, x_start, start, kind, alphas) for o in (out_u, out_c))
        x0 = x0_c + omega * (x0_c - x0_u)  # (1 + ω) c - ω ∅
        eps = eps_c + omega * (eps_c - eps_u)
        x_end = solver.step(x0, eps, end)  # the teacher's ODE step to t_n, (B, C, h, w)

        inner = unwrap(student)
        dtype = _dtype(inner)
        cond = None if cond is None else cond.to(dtype)
        pred = _unet(inner, x_end.to(dtype), end, text.to(dtype), cond, target).float()
        c_skip, c_out = (
            c.view(-1, 1, 1, 1) for c in boundary_scalings(end, timestep_scaling=objective.timestep_scaling)
        )
        goal = c_skip * x_end + c_out * predicted_original(pred, x_end, end, kind, alphas)  # f_target(x_{t_n}, t_n)

    with student_kernels(unwrap(student), latents.device):  # see bksdm.train.kd.kd_step
        dtype = _dtype(unwrap(student))
        out = _unet(student, x_start.to(dtype), start, text.to(dtype), cond)
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in boundary_scalings(start, timestep_scaling=objective.timestep_scaling))
    f = c_skip * x_start + c_out * predicted_original(out.float(), x_start, start, kind, alphas)  # (B, C, h, w)
    loss = consistency_loss(f, goal, objective.loss, objective.huber_c)
    return {"loss": loss, "loss_l2": consistency_loss(f.detach(), goal, "l2")}
