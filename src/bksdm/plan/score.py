"""Scoring removable units: calibration inputs, ablation losses, similarity scores, pair decomposition. Pure.

The **ablation loss** of a unit (LAPTOP-Diff, arXiv 2404.11098, Sec. 3.2) is how much the denoiser's prediction moves
when that unit alone is removed: ``mean_i ||pred_ablated_i - pred_teacher_i||^2 / ||pred_teacher_i||^2`` over the
calibration inputs i, a relative squared change (0: nothing changes; 1: an error as large as the prediction itself).
The ablated denoiser is a real student built by :func:`bksdm.plan.surgery.build_student` from the unit's ablation plan
(:mod:`bksdm.plan.units`), exactly what ``bksdm prune`` would write.

The **similarity score** (the one-pass criterion of Flux.1 Lite and SANA-1.5) is ``1 - cos(input, output)`` of the
unit in the teacher, each sample's tensors flattened, averaged over the calibration inputs: 0 for a unit that leaves
its input's direction unchanged. It is read with forward hooks on the teacher during its reference passes
(:class:`SimilarityTap`), which remove themselves.

**Calibration inputs** are clean latents (the teacher's own samples, or a cache's latents) noised with the family's
training noise (:meth:`bksdm.families.base.Family.noise`) at T timesteps spread over the schedule, every draw from
:func:`bksdm.train.kd.draw_noise` (generators keyed by seed, timestep index and sample position), so the same seed
gives the same inputs on any batch size or device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from bksdm.families.base import Family, FlowMatching
from bksdm.plan.units import Site
from bksdm.train.kd import FeatureTap, draw_noise, unwrap


@dataclass
class Calibration:
    """The denoiser inputs units are scored on (all on the CPU, float32).

    Attributes:
        noisy: Noised latents, (B, C, h, w).
        timesteps: Each input's timestep, (B,): integers for a U-Net, ``sigma * 1000`` for flow families.
        text: Text states, (B, L, D).
        pooled: Pooled text embeddings (B, P), or None (SD-v1/v2).
        labels: For each input, (prompt index, seed index, timestep index).
    """

    noisy: Tensor
    timesteps: Tensor
    text: Tensor
    pooled: Tensor | None
    labels: list[tuple[int, int, int]]

    def __len__(self) -> int:
        return self.noisy.shape[0]


def schedule_timesteps(
    family: Family, scheduler_config: Mapping[str, Any], count: int, latent_shape: tuple[int, int, int]
) -> list[float]:
    """``count`` timesteps spread over the schedule: the midpoints ``u = (k + 0.5) / count`` of equal shares.

    A U-Net's DDPM timesteps are ``round(u * (num_train_timesteps - 1))``; a flow family's are ``sigma * 1000`` with
    sigma the family's shifted time (:meth:`FlowMatching.shift`: SD3's constant shift, FLUX's resolution-dependent
    one), so the points sit where the teacher's own sampler spends its steps.
    """
    total = int(scheduler_config.get("num_train_timesteps", 1000))
    points = [(k + 0.5) / count for k in range(count)]
    if isinstance(family, FlowMatching):
        return [family.shift(u, scheduler_config, latent_shape) * total for u in points]
    return [float(round(u * (total - 1))) for u in points]


def noised(
    family: Family,
    scheduler,
    clean: Tensor,
    timesteps: Sequence[float],
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Every clean latent noised at every timestep: ``(noisy (T*M, C, h, w), timesteps (T*M,))``, timestep-major.

    Sample m at timestep k draws its noise from ``draw_noise(seed, step=k, position=m)``.
    """
    m = clean.shape[0]
    noisy, times = [], []
    integer = not isinstance(family, FlowMatching)
    for k, t in enumerate(timesteps):
        value = torch.tensor([int(t)] if integer else [float(t)])

        def fixed(_generator: torch.Generator, value: Tensor = value) -> Tensor:
            return value.clone()

        ts, noise, _ = draw_noise(seed, k, list(range(m)), tuple(clean.shape[1:]), 1000, "cpu", fixed)
        x, _ = family.noise(scheduler, clean, noise, ts)
        noisy.append(x.float())
        times.append(ts)
    return torch.cat(noisy), torch.cat(times)


def _to(value: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """Tensors (in nested dicts) moved to ``device``; floating ones cast to ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, Mapping):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


@torch.no_grad()
def predict(
    family: Family,
    model: nn.Module,
    calibration: Calibration,
    conditioning: Callable[[Tensor | None], Any],
    batch_size: int,
    after: Callable[[], None] | None = None,
) -> Tensor:
    """The denoiser's predictions on every calibration input, (B, C, h, w) float32 on the CPU.

    Args:
        family: The denoiser's family (its ``call``).
        model: The denoiser (teacher or student), on its device and dtype.
        calibration: The inputs.
        conditioning: Maps a batch's pooled embeddings to the ``extra`` conditioning (``family.conditioning``).
        batch_size: Inputs per forward.
        after: Called after each forward (e.g. :meth:`SimilarityTap.collect`).
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    out = []
    for start in range(0, len(calibration), batch_size):
        part = slice(start, start + batch_size)
        pooled = calibration.pooled[part] if calibration.pooled is not None else None
        extra = _to(conditioning(pooled), device, dtype)
        pred = family.call(
            model,
            calibration.noisy[part].to(device=device, dtype=dtype),  # (b, C, h, w)
            calibration.timesteps[part].to(device),  # (b,)
            calibration.text[part].to(device=device, dtype=dtype),  # (b, L, D)
            extra,
        )
        out.append(pred.float().cpu())
        if after is not None:
            after()
    return torch.cat(out)


def relative_change(pred: Tensor, reference: Tensor) -> Tensor:
    """Per sample ``||pred - reference||^2 / ||reference||^2``, (B,), in float64."""
    diff = (pred.double() - reference.double()).flatten(1).pow(2).sum(1)
    return diff / reference.double().flatten(1).pow(2).sum(1).clamp_min(1e-30)


class SimilarityTap:
    """Records ``1 - cos(input, output)`` of units in a model during its forward passes.

    Inputs are read by forward pre-hooks (the first positional input, or ``hidden_states`` by keyword), outputs by a
    :class:`~bksdm.train.kd.FeatureTap`; every hook is removed on exit, also when a forward raises::

        with SimilarityTap(teacher, {"mid_block": Site("mid_block", "mid_block")}) as tap:
            teacher(...)
        tap.scores()  # {"mid_block": 0.12}
    """

    def __init__(self, model: nn.Module, sites: Mapping[str, Site]):
        self.sites = dict(sites)
        names = list(self.sites)
        self._outputs = FeatureTap(
            model, [self.sites[n].output_module for n in names], [self.sites[n].output_position for n in names]
        )
        self._names = names
        self._inputs: dict[str, Tensor] = {}
        self._model = unwrap(model)  # addresses are the plain model's (as FeatureTap's)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sums = dict.fromkeys(names, 0.0)
        self._counts = dict.fromkeys(names, 0)

    def _pre_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    def __enter__(self) -> SimilarityTap:
        self._outputs.__enter__()
        try:
            for name in self._names:
                module = self._model.get_submodule(self.sites[name].input_module)
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.__exit__(None, None, None)

    def collect(self) -> None:
        """Adds the last forward's per-sample values to the running means (call after each forward)."""
        if not self._names:
            return
        for name, out in zip(self._names, self._outputs.features, strict=True):
            x, y = self._inputs[name].flatten(1).double(), out.flatten(1).double()  # (b, n) each
            cos = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-12)
            self._sums[name] += float((1 - cos).sum())
            self._counts[name] += x.shape[0]
        self._outputs.clear()
        self._inputs.clear()

    def scores(self) -> dict[str, float]:
        """Each unit's mean ``1 - cos`` over every sample collected."""
        return {n: self._sums[n] / self._counts[n] for n in self._names if self._counts[n]}


def decompose(pairs: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """Per-unit scores from the losses of tied pairs, by least squares: ``pair(a, b) ~ s(a) + s(b)``.

    Each pair family (one stage's down and up layers, or the mid block's and its tied attention's blocks) is
    bipartite, so the fit leaves one free constant per connected component: adding c to every left unit and
    subtracting it from every right one fits equally well. Every valid plan removes as many left as right units of a
    family, so the constant cancels in any plan's predicted loss; here it is fixed so that the lowest left and the
    lowest right score of a component are equal (the cheapest pair's loss split evenly between its two units).

    Args:
        pairs: (left unit, right unit) -> measured ablation loss.

    Returns:
        Unit -> score, for every unit in some pair.
    """
    left = sorted({a for a, _ in pairs})
    right = sorted({b for _, b in pairs})
    scores: dict[str, float] = {}
    for comp_left, comp_right in _components(list(pairs), left, right):
        items = [(a, b) for a, b in pairs if a in comp_left]
        names = comp_left + comp_right
        index = {n: i for i, n in enumerate(names)}
        design = np.zeros((len(items), len(names)))
        for row, (a, b) in enumerate(items):
            design[row, index[a]] = design[row, index[b]] = 1.0
        values = np.array([pairs[p] for p in items], dtype=np.float64)
        solution = np.linalg.lstsq(design, values, rcond=None)[0]
        lo_left = min(solution[index[a]] for a in comp_left)
        lo_right = min(solution[index[b]] for b in comp_right)
        shift = (lo_right - lo_left) / 2
        scores.update({a: float(solution[index[a]] + shift) for a in comp_left})
        scores.update({b: float(solution[index[b]] - shift) for b in comp_right})
    return scores


def _components(edges: list[tuple[str, str]], left: list[str], right: list[str]) -> list[tuple[list[str], list[str]]]:
    """Connected components of a bipartite graph, each as (left nodes, right nodes)."""
    parent = {n: n for n in [*(("L", a) for a in left), *(("R", b) for b in right)]}

    def root(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in edges:
        parent[root(("L", a))] = root(("R", b))
    groups: dict[Any, tuple[list[str], list[str]]] = {}
    for side, name in parent:
        groups.setdefault(root((side, name)), ([], []))[0 if side == "L" else 1].append(name)
    return list(groups.values())


def spearman(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get mean ranks), or None for fewer than 3 points or a constant series."""
    if len(predicted) < 3 or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    return float(spearmanr(predicted, measured).statistic)
