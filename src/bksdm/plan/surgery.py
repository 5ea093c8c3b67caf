"""Student surgery: build a student denoiser from a teacher and a plan, copying every kept weight.

The same for every family (:mod:`bksdm.families`): the student is the family's stock class built from the resolved
plan's config. The weight map comes from the resolved plan's ``teacher_key`` and is checked before anything is copied:
every student tensor must be filled exactly once from a teacher tensor of the same shape, and one error lists
every gap. Pure: no files, no prints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bksdm.families import family_of
from bksdm.plan.resolved import ResolvedPlan
from bksdm.plan.spec import Plan
from bksdm.plan.stacks import ResolvedStacks

Resolved = ResolvedPlan | ResolvedStacks

Shape = tuple[int, ...]


class SurgeryError(ValueError):
    """The student cannot be filled from the teacher; the message lists every gap."""


@dataclass(frozen=True)
class WeightMap:
    """Student state-dict key → teacher key, with everything the coverage check found.

    Attributes:
        sources: Student key → teacher key, for every student tensor whose source exists with the same shape.
        missing: (student key, teacher key) where the teacher key does not exist.
        mismatched: (student key, teacher key, student shape, teacher shape) where the shapes differ.
        reused: Teacher keys that would fill more than one student tensor.
        unused: Teacher keys that fill no student tensor (the removed blocks).
    """

    sources: dict[str, str]
    missing: tuple[tuple[str, str], ...]
    mismatched: tuple[tuple[str, str, Shape, Shape], ...]
    reused: tuple[str, ...]
    unused: tuple[str, ...]

    @property
    def problems(self) -> list[str]:
        """One line per gap; empty when every student tensor is filled exactly once."""
        lines = [f"{s}: the teacher has no tensor {t}" for s, t in self.missing]
        lines += [f"{s}: shape {list(ss)} but teacher {t} has {list(ts)}" for s, t, ss, ts in self.mismatched]
        lines += [f"teacher {t} would fill more than one student tensor" for t in self.reused]
        return lines

    def check(self, *, allow_mismatched: bool = False) -> None:
        """Raises SurgeryError listing every gap.

        Args:
            allow_mismatched: Accept shape mismatches (those student tensors keep their random init); use for
                plans that keep a layer away from its usual position, e.g. up-stage layers 0 and 1.
        """
        problems = [p for p in self.problems if not (allow_mismatched and ": shape " in p)]
        if problems:
            hint = (
                ""
                if allow_mismatched or not self.mismatched
                else "\n(the plan moves layers to positions with other input channels; pass allow_mismatched / "
                "--allow-partial-init to start those tensors from random weights instead)"
            )
            raise SurgeryError(
                f"the student cannot be filled from the teacher ({len(problems)} gaps):\n  - "
                + "\n  - ".join(problems)
                + hint
            )


def weight_map(
    resolved: Resolved, student_shapes: Mapping[str, Shape], teacher_shapes: Mapping[str, Shape]
) -> WeightMap:
    """Maps every student tensor to its teacher source and checks coverage (no tensors are touched).

    Args:
        resolved: The plan resolved against the teacher's config.
        student_shapes: Student state-dict key → shape.
        teacher_shapes: Teacher state-dict key → shape.
    """
    sources: dict[str, str] = {}
    missing, mismatched = [], []
    for key, shape in student_shapes.items():
        source = resolved.teacher_key(key)
        if source not in teacher_shapes:
            missing.append((key, source))
        elif tuple(teacher_shapes[source]) != tuple(shape):
            mismatched.append((key, source, tuple(shape), tuple(teacher_shapes[source])))
        else:
            sources[key] = source
    counts = Counter(resolved.teacher_key(k) for k in student_shapes)
    reused = tuple(sorted(t for t, c in counts.items() if c > 1))
    used = set(counts)
    unused = tuple(k for k in teacher_shapes if k not in used)
    return WeightMap(sources, tuple(missing), tuple(mismatched), reused, unused)


def shapes_of(module: torch.nn.Module) -> dict[str, Shape]:
    """State-dict key → shape of a module (works for meta-device models too)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@dataclass
class Surgery:
    """The result of :func:`build_student`.

    Attributes:
        student: The student (a stock diffusers model of the teacher's class), in eval mode, on the teacher's device.
        resolved: The resolved plan.
        weights: The checked weight map.
        init: ``"teacher"`` or ``"random"``.
    """

    student: nn.Module
    resolved: Resolved
    weights: WeightMap
    init: str


def build_student(
    teacher: nn.Module,
    plan: Plan | Resolved,
    *,
    init: str = "teacher",
    allow_mismatched: bool = False,
    seed: int = 0,
) -> Surgery:
    """Builds the student denoiser for ``plan`` and fills it from ``teacher``.

    Args:
        teacher: A denoiser of a known family (an SD-layout ``UNet2DConditionModel``, ``SD3Transformer2DModel``,
            ``FluxTransformer2DModel``); weights may live on any device.
        plan: A plan, or a plan already resolved against ``teacher.config``.
        init: ``"teacher"`` copies kept weights (BK-SDM); ``"random"`` leaves the student at diffusers'
            default initialisation (seeded by ``seed``), for ablations.
        allow_mismatched: See :meth:`WeightMap.check`.
        seed: Seed of the student's random initialisation (what is not copied keeps it).

    Raises:
        PlanError: the plan does not fit the teacher.
        SurgeryError: the student cannot be filled (every gap listed).
    """
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    family = family_of(teacher)
    resolved = plan if isinstance(plan, (ResolvedPlan, ResolvedStacks)) else family.resolve(plan, dict(teacher.config))
    config = resolved.student_config()
    teacher_state = teacher.state_dict()
    with torch.device("meta"):
        skeleton = family.build(config)
    weights = weight_map(resolved, shapes_of(skeleton), {k: tuple(v.shape) for k, v in teacher_state.items()})
    if init == "teacher":
        weights.check(allow_mismatched=allow_mismatched)
    param = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = family.build(config)
    student.to(device=param.device, dtype=param.dtype)
    if init == "teacher":
        copied = {s: teacher_state[t] for s, t in weights.sources.items()}
        # strict=False only admits the tensors allow_mismatched chose to leave at their random init.
        result = student.load_state_dict(copied, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
    student.eval()
    return Surgery(student, resolved, weights, init)


def block_params(resolved: Resolved, teacher_shapes: Mapping[str, Shape]) -> dict[str, int]:
    """Parameters of every teacher block listed by :meth:`ResolvedPlan.block_fates` (buffers excluded).

    A block's count excludes its sub-blocks that are listed separately (a partly kept attention's dropped
    transformer blocks, say), so that the removed counts add up.
    """
    fates = [address for address, _ in resolved.block_fates()]
    counts = dict.fromkeys(fates, 0)
    for key, shape in teacher_shapes.items():
        owner = _owner(key, fates)
        if owner is not None:
            counts[owner] += _numel(shape)
    return counts


def _owner(key: str, addresses: list[str]) -> str | None:
    """The longest listed address that is a module prefix of ``key``."""
    best = None
    for address in addresses:
        if key.startswith(address + ".") and (best is None or len(address) > len(best)):
            best = address
    return best


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def describe_config_changes(teacher_config: Mapping[str, Any], student_config: Mapping[str, Any]) -> dict:
    """Config keys whose value differs between teacher and student: key → (teacher, student)."""
    keys = [k for k in student_config if not k.startswith("_")]
    return {k: (teacher_config.get(k), student_config[k]) for k in keys if teacher_config.get(k) != student_config[k]}
