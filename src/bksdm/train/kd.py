"""Knowledge distillation for BK-SDM: feature taps, the three loss terms and one KD step.

The objective (BK-SDM, Kim et al., ECCV 2024, Eq. 1-3) is

    L = lambda_task * L_task + lambda_out * L_outKD + lambda_feat * L_featKD,

all mean-squared errors: the student's prediction against the true target (noise, or velocity for
v-prediction teachers), against the teacher's prediction on the same noisy latent, timestep and text, and the
student's intermediate features against the teacher's, summed over the matched locations of
:meth:`bksdm.plan.resolved.ResolvedPlan.feature_pairs`.

Features are read with forward hooks (:class:`FeatureTap`) attached to the *unwrapped* model for the length of
one forward only, so the model itself is never modified and the same code runs on one process or under
DDP/accelerate (the official code registered hooks on the wrapper and broke under DDP). Pure: no files, no
prints, no module state; all randomness comes from :mod:`bksdm.seeding` generators keyed by sample position.
On the CPU the forwards run under :func:`bksdm.train.cpu_kernels.cpu_kernels` (oneDNN kernels, equal to the
default ones to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from torch import Tensor, nn

from bksdm.families.base import Family
from bksdm.families.token_runs import fold_tail, folded, trailing_repeats, unfold_streams
from bksdm.families.unet import UNET, diffusion_target
from bksdm.plan.resolved import FeaturePair
from bksdm.seeding import STREAM_NOISE, sample_generator
from bksdm.train.cpu_kernels import cpu_kernels, student_kernels

__all__ = [
    "FeatureTap",
    "LossWeights",
    "diffusion_target",
    "draw_noise",
    "ema_update",
    "kd_losses",
    "kd_step",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel / accelerate wrappers and ``torch.compile``.

    Wrappers keep the real model in ``.module`` (DDP, DataParallel, DeepSpeed) or ``._orig_mod``
    (``torch.compile``), possibly nested (a compiled model wrapped in DDP); module addresses such as
    ``down_blocks.1`` are only valid on the innermost one.

    Args:
        model: A model, wrapped or not.

    Returns:
        The innermost model; ``model`` itself when it is not wrapped.
    """
    while True:
        # Look in _modules rather than with getattr: nn.Module.__getattr__ only resolves registered children,
        # and a diffusers model has no child called "module", so plain models are returned as they are.
        inner = model._modules.get("_orig_mod")
        if inner is None:
            inner = model._modules.get("module")
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _tensor_at(output: Any, address: str, position: int = 0) -> Tensor:
    """The hidden state in a module's output: diffusers blocks return tensors, tuples or output objects.

    ``position`` picks one tensor of a tuple: a joint transformer block returns ``(text states, image states)``.
    """
    if isinstance(output, Tensor) and position == 0:
        return output
    if isinstance(output, (tuple, list)) and len(output) > position and isinstance(output[position], Tensor):
        # Down blocks return (hidden_states, res_samples); transformers with return_dict=False (sample,).
        return output[position]
    sample = getattr(output, "sample", None)  # Transformer2DModelOutput, UNet2DConditionOutput
    if isinstance(sample, Tensor) and position == 0:
        return sample
    raise TypeError(
        f"module {address!r} returned {type(output).__name__}, which holds no tensor at position {position} to distil"
    )


class FeatureTap:
    """Records the outputs of some modules of a model during its forward passes.

    Use as a context manager around a forward: hooks are registered on entry and every one is removed on exit,
    even when the forward raises, so the model is left exactly as it was::

        with FeatureTap(student, ["down_blocks.0", "up_blocks.3"]) as tap:
            pred = student(noisy, t, encoder_hidden_states=text).sample
        feats = tap.features  # [(B, C0, h, w), (B, C3, h, w)], in address order

    Hooks go on the unwrapped model (see :func:`unwrap`), so a DDP- or accelerate-wrapped model can be called
    through its wrapper, which is what keeps DDP's gradient synchronisation working.

    Attributes:
        addresses: The module addresses, in the order of :attr:`features`.
    """

    def __init__(self, model: nn.Module, addresses: Sequence[str], outputs: Sequence[int] | None = None):
        """Finds the modules to tap (nothing is registered until the context is entered).

        Args:
            model: The model, wrapped or not.
            addresses: Module addresses in the unwrapped model, as diffusers names them (``down_blocks.1``,
                ``down_blocks.2.attentions.0.proj_out``); an address may repeat with another output position.
            outputs: For each address, which tensor of a tuple output to record (default: the first).

        Raises:
            KeyError: If a module does not exist; the message names the address.
        """
        self.addresses: tuple[str, ...] = tuple(addresses)
        self.outputs: tuple[int, ...] = tuple(outputs) if outputs is not None else (0,) * len(self.addresses)
        if len(self.outputs) != len(self.addresses):
            raise ValueError(f"{len(self.addresses)} addresses but {len(self.outputs)} output positions")
        inner = unwrap(model)
        self._modules: list[nn.Module] = []
        for address in self.addresses:
            try:
                self._modules.append(inner.get_submodule(address))
            except AttributeError:
                raise KeyError(f"the model has no module {address!r} to tap") from None
        self._outputs: list[Tensor | None] = [None] * len(self.addresses)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def features(self) -> list[Tensor]:
        """The latest output of every tapped module, in :attr:`addresses` order.

        Raises:
            RuntimeError: If some module has not run since the last :meth:`clear` (names every such address).
        """
        missing = [a for a, out in zip(self.addresses, self._outputs, strict=True) if out is None]
        if missing:
            raise RuntimeError(f"no output recorded for {', '.join(map(repr, missing))}: did the forward run?")
        return list(self._outputs)  # type: ignore[arg-type]

    def clear(self) -> None:
        """Forgets the recorded outputs (and the graphs they keep alive)."""
        self._outputs = [None] * len(self.addresses)

    def _hook(self, index: int):
        address, position = self.addresses[index], self.outputs[index]

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self._outputs[index] = _tensor_at(output, address, position)

        return hook

    def __enter__(self) -> FeatureTap:
        if self._handles:
            raise RuntimeError("FeatureTap is already active; it cannot be entered twice")
        self.clear()
        try:
            for index, module in enumerate(self._modules):
                self._handles.append(module.register_forward_hook(self._hook(index)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three loss terms (the paper uses 1 for all three).

    Attributes:
        task: lambda_task, on the student's prediction against the true target.
        out: lambda_out, on the student's prediction against the teacher's (output KD).
        feat: lambda_feat, on the summed feature-KD term.
    """

    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0

    def __post_init__(self) -> None:
        for name in ("task", "out", "feat"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")

    @property
    def needs_teacher(self) -> bool:
        """Whether any term that compares with the teacher counts (False for the task-only ablation)."""
        return self.out != 0 or self.feat != 0


def draw_noise(
    seed: int,
    step: int,
    positions: Sequence[int] | Tensor,
    latent_shape: tuple[int, int, int],
    num_train_timesteps: int,
    device: torch.device | str,
    sample_timestep: Callable[[torch.Generator], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draws the diffusion randomness of a batch, one generator per sample.

    Each sample's numbers come from ``sample_generator(seed, step, position, STREAM_NOISE)`` alone, in a fixed
    order (timestep, noise, latent epsilon), so they do not depend on the batch size, on the other samples in
    the batch, or on how a global batch is split across processes.

    Args:
        seed: The run's seed.
        step: The optimisation step (or micro-step) the batch belongs to.
        positions: Each sample's position in the global batch.
        latent_shape: (C, h, w) of one latent.
        num_train_timesteps: Timesteps are uniform on ``[0, num_train_timesteps)`` (BK-SDM, Sec. 4).
        device: Where the returned tensors go (they are drawn on CPU, so every device gets the same numbers).
        sample_timestep: Draws one timestep, shape (1,), from a generator (a family's density, e.g. the
            transformers' logit-normal flow times); default uniform integers below ``num_train_timesteps``.

    Returns:
        ``timesteps`` (B,) (long by default), ``noise`` (B, C, h, w) float32 and ``latent_eps`` (B, C, h, w) float32;
        the latter samples the VAE's latent distribution as ``mean + std * latent_eps``.
    """
    if isinstance(positions, Tensor):
        positions = positions.tolist()
    timesteps, noise, latent_eps = [], [], []
    for position in positions:
        generator = sample_generator(seed, step, int(position), STREAM_NOISE)
        if sample_timestep is None:
            timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
        else:
            timesteps.append(sample_timestep(generator))
        noise.append(torch.randn(latent_shape, generator=generator))  # (C, h, w)
        latent_eps.append(torch.randn(latent_shape, generator=generator))  # (C, h, w)
    if not timesteps:
        empty = torch.empty((0, *latent_shape), device=device)
        return torch.empty(0, dtype=torch.long, device=device), empty, empty.clone()
    return (
        torch.cat(timesteps).to(device),  # (B,)
        torch.stack(noise).to(device),  # (B, C, h, w)
        torch.stack(latent_eps).to(device),  # (B, C, h, w)
    )


def _mse(a: Tensor, b: Tensor, what: str) -> Tensor:
    if a.shape != b.shape:
        # F.mse_loss would broadcast and only warn, silently distilling the wrong thing.
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.mse_loss(a.float(), b.float(), reduction="mean")


def kd_losses(
    student_pred: Tensor,
    teacher_pred: Tensor | None,
    target: Tensor,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor] | None,
    weights: LossWeights,
) -> dict[str, Tensor]:
    """The BK-SDM loss and its three terms, all mean-squared errors computed in float32.

    Args:
        student_pred: The student's prediction, (B, 4, h, w).
        teacher_pred: The teacher's prediction on the same input, (B, 4, h, w); detached here. May be None
            only when ``weights.out == weights.feat == 0``.
        target: The true target (noise or velocity), (B, 4, h, w).
        student_feats: Student features, one per feature pair.
        teacher_feats: Teacher features in the same order, same shapes; detached here. May be None (or empty)
            only when ``weights.out == weights.feat == 0``.
        weights: The lambdas.

    Returns:
        ``loss`` (the weighted sum, to backpropagate), ``loss_task``, ``loss_kd_out`` and ``loss_kd_feat``
        (the sum over pairs, as in the paper), all float32 scalars. Terms whose weight is 0 are still computed
        for logging when the teacher's outputs are given, and are 0 when they are not.

    Raises:
        ValueError: If the teacher's outputs are missing while needed, if the numbers of features differ, or
            if shapes differ (naming the feature pair index and both shapes).
    """
    loss_task = _mse(student_pred, target, "student prediction vs target")
    zero = torch.zeros((), dtype=torch.float32, device=student_pred.device)
    if teacher_pred is None:
        if weights.needs_teacher:
            raise ValueError(f"teacher outputs are needed for weights {weights}")
        loss_kd_out = loss_kd_feat = zero
    else:
        teacher_feats = [] if teacher_feats is None else teacher_feats
        if len(student_feats) != len(teacher_feats):
            raise ValueError(f"{len(student_feats)} student features but {len(teacher_feats)} teacher features")
        loss_kd_out = _mse(student_pred, teacher_pred.detach(), "student vs teacher prediction")
        loss_kd_feat = zero
        for i, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
            # Summed, not averaged, over locations (BK-SDM Eq. 3): more matched locations weigh more.
            loss_kd_feat = loss_kd_feat + _mse(s, t.detach(), f"feature pair {i} (student vs teacher)")
    loss = weights.task * loss_task + weights.out * loss_kd_out + weights.feat * loss_kd_feat
    return {"loss": loss, "loss_task": loss_task, "loss_kd_out": loss_kd_out, "loss_kd_feat": loss_kd_feat}


def _param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's floating-point parameters (float32 when it has none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _cast(kwargs: Mapping[str, Any] | None, dtype: torch.dtype) -> dict[str, Any] | None:
    """Floating-point tensors of ``kwargs`` cast to ``dtype`` (the SDXL ``text_embeds`` / ``time_ids``)."""
    if kwargs is None:
        return None
    return {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}


def kd_step(
    student: nn.Module,
    teacher: nn.Module,
    scheduler: SchedulerMixin,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    timesteps: Tensor,
    noise: Tensor,
    feature_pairs: Sequence[FeaturePair],
    weights: LossWeights,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    family: Family = UNET,
    fold_text: bool = True,
) -> dict[str, Tensor]:
    """One distillation forward: noise the latents, run teacher and student, return the losses.

    The teacher runs under ``torch.no_grad`` in its own parameter dtype (it may be fp16/bf16 while the student
    trains in fp32); its prediction and features are cast back to float32. Its train/eval mode is left as the
    caller set it (eval). The student is called through ``student`` itself, so a DDP/accelerate wrapper sees
    the forward and synchronises gradients; its hooks live on the unwrapped module. All hooks are gone when
    this returns. The teacher is not run at all when ``weights.out == weights.feat == 0``.

    Args:
        student: The student denoiser, possibly wrapped (DDP, accelerate, ``torch.compile``).
        teacher: The frozen teacher denoiser, in eval mode.
        scheduler: Training scheduler: for U-Nets it provides ``add_noise`` and the prediction type (use
            ``DDPMScheduler.from_config(...)``: Euler-type schedulers noise latents differently); for flow
            families its config's ``num_train_timesteps``.
        latents: Clean, scaled latents, (B, C, h, w).
        encoder_hidden_states: Text-encoder states, (B, L, D).
        timesteps: (B,), e.g. from :func:`draw_noise`.
        noise: (B, C, h, w), e.g. from :func:`draw_noise`.
        feature_pairs: Teacher/student module pairs for feature KD (the resolved plan's ``feature_pairs()``).
        weights: The lambdas.
        added_cond_kwargs: The family's extra conditioning (``family.conditioning``): SDXL's ``text_embeds`` and
            ``time_ids``, a transformer's ``pooled_projections`` (and FLUX.1-dev's ``guidance``); None for SD-v1/v2.
        family: The denoisers' family (:mod:`bksdm.families`): how to noise, what to predict, how to call.
        fold_text: For families whose text tokens carry no position (``family.folds_text``), run a trailing stretch of
            identical text tokens (SD3's zero T5 states) as one weighted token (:mod:`bksdm.families.token_runs`):
            the same losses to float rounding, far cheaper. Text-stream features are compared at full length. Not
            for a gradient-checkpointing student (its backward recomputes blocks with the stock processors).

    Returns:
        The float32 scalars of :func:`kd_losses`: ``loss`` (with a graph to the student) and its terms.
    """
    latents, noise = latents.float(), noise.float()  # noising and targets in fp32 whatever the cache holds
    noisy, target = family.noise(scheduler, latents, noise, timesteps)  # (B, C, h, w) each

    repeats = trailing_repeats(encoder_hidden_states) if fold_text and family.folds_text else 1

    teacher_pred: Tensor | None = None
    teacher_feats: list[Tensor] | None = None
    if weights.needs_teacher:
        dtype = _param_dtype(unwrap(teacher))
        tap = FeatureTap(teacher, [p.teacher for p in feature_pairs], [p.output for p in feature_pairs])
        text = fold_tail(encoder_hidden_states, repeats).to(dtype)
        with torch.no_grad(), cpu_kernels(noisy.device), folded(unwrap(teacher), repeats), tap:
            out = family.call(teacher, noisy.to(dtype), timesteps, text, _cast(added_cond_kwargs, dtype))
            teacher_pred = out.float()  # (B, C, h, w)
            teacher_feats = unfold_streams(tap.features, [p.stream for p in feature_pairs], repeats)

    dtype = _param_dtype(unwrap(student))
    # The task-only ablation reads no student features either: no hooks at all.
    pairs = feature_pairs if weights.needs_teacher else []
    # Gradient checkpointing recomputes the forward during backward, outside this block: the recomputation must
    # run the kernels and attention the first forward ran (else torch's checkpoint sees other saved tensors and
    # raises, or, for the attention, silently computes other gradients).
    # (A student checkpointed by ``cpu_kernels.kernel_checkpointing``, as distill's is, recomputes with the kernels.)
    recomputed = getattr(unwrap(student), "is_gradient_checkpointing", False)
    kernels = student_kernels(unwrap(student), noisy.device)
    repeats = 1 if recomputed else repeats
    text = fold_tail(encoder_hidden_states, repeats).to(dtype)
    with (
        kernels,
        folded(unwrap(student), repeats),
        FeatureTap(student, [p.student for p in pairs], [p.output for p in pairs]) as tap,
    ):
        student_pred = family.call(student, noisy.to(dtype), timesteps, text, _cast(added_cond_kwargs, dtype))
        student_feats = unfold_streams(tap.features, [p.stream for p in pairs], repeats)  # student_pred: (B, C, h, w)
    return kd_losses(student_pred, teacher_pred, target, student_feats, teacher_feats, weights)


@torch.no_grad()
def ema_update(ema: Any, parameters: Any) -> None:
    """One step of a diffusers ``EMAModel`` (``ema.step(parameters)``), in place and without temporaries.

    The same update, ``shadow <- shadow - (1 - decay) * (shadow - param)``, written as one
    ``torch._foreach_lerp_(shadow, param, 1 - decay)``: ``EMAModel.step`` loops over the parameters in Python
    and allocates two temporaries per parameter (its ``foreach=True`` allocates all of them at once, a second
    copy of the student); equal to it to float rounding. The step count and decay bookkeeping are EMAModel's
    own (``optimization_step``, ``get_decay``, ``cur_decay_value``), so its saving and loading are unchanged.

    Args:
        ema: A ``diffusers.training_utils.EMAModel``.
        parameters: The model's parameters, in the order the EMA was made from.
    """
    params = list(parameters)
    shadow = list(ema.shadow_params)
    if len(params) != len(shadow):
        raise ValueError(f"the EMA holds {len(shadow)} parameters but {len(params)} were given")
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    trained = [(s, p) for s, p in zip(shadow, params, strict=True) if p.requires_grad]
    frozen = [(s, p) for s, p in zip(shadow, params, strict=True) if not p.requires_grad]
    if trained:
        torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1 - decay)
    if frozen:
        torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
