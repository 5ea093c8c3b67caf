"""Plans for diffusion transformers: which blocks of each stack survive, and everything derived from that.

A diffusion transformer (SD3, FLUX.1, ...) is a few *stacks* of blocks at the model's root (``transformer_blocks``,
FLUX's ``single_transformer_blocks``) between an embedding and an output head. A student keeps a subset of each
stack, in order; its config is the teacher's with fewer layers (``num_layers``, ``num_single_layers``), so it is
a stock diffusers model, and student block J of a stack is the teacher's block ``kept[J]``, deleted blocks really
gone. :func:`resolve_stacks` checks a plan's ``blocks`` rules against a teacher config and fixes the kept blocks;
family rules (SD3 keeps its last block; SD3.5 remaps ``dual_attention_layers``) come from a :class:`StackRules`.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from bksdm.plan.resolved import FeaturePair, match_overrides, run_ends
from bksdm.plan.spec import Plan, PlanError, select


@dataclass(frozen=True)
class StackSpec:
    """One stack of a transformer family.

    Attributes:
        address: The module list's name at the model root, e.g. ``"transformer_blocks"``.
        count_key: The config key holding its length, e.g. ``"num_layers"``.
    """

    address: str
    count_key: str


@dataclass(frozen=True)
class KeptStack:
    """A teacher stack as the student keeps it: its depth in the teacher and the kept block indices, in order."""

    spec: StackSpec
    depth: int
    kept: tuple[int, ...]


class StackRules(Protocol):
    """What a transformer family adds to the generic stack plan (implemented by the family modules)."""

    stacks: tuple[StackSpec, ...]

    def check(self, kept: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> list[str]:
        """Problems with this choice of kept blocks (each one line that says how to fix it)."""

    def config_updates(self, kept: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> dict[str, Any]:
        """Config entries besides the stack lengths that follow from the kept blocks."""

    def streams(self, stack: str, teacher_index: int, config: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
        """The (stream name, position in the block's output tuple) pairs a block's output holds."""

    def feature_width(self, config: Mapping[str, Any]) -> int:
        """The width of the blocks' hidden states (for reports)."""


@dataclass(frozen=True)
class ResolvedStacks:
    """A plan checked against one transformer teacher: the kept blocks of every stack and what follows."""

    plan: Plan
    family: str
    stacks: tuple[KeptStack, ...]
    teacher_config: Mapping[str, Any] = field(compare=False, repr=False)
    updates: Mapping[str, Any] = field(compare=False, repr=False, default_factory=dict)
    pairs: tuple[FeaturePair, ...] = field(compare=False, repr=False, default=())

    def student_config(self) -> dict[str, Any]:
        """The stock diffusers config of the student: the teacher's, with the stacks' new lengths."""
        config = {k: v for k, v in self.teacher_config.items() if not k.startswith("_")}
        for stack in self.stacks:
            config[stack.spec.count_key] = len(stack.kept)
        config.update(self.updates)
        return config

    def teacher_key(self, student_key: str) -> str:
        """Student block J of a stack comes from the teacher's block ``kept[J]``; everything else keeps its key."""
        match = _BLOCK_KEY.match(student_key)
        if match:
            for stack in self.stacks:
                j = int(match.group(2))
                if stack.spec.address == match.group(1) and j < len(stack.kept):
                    return f"{match.group(1)}.{stack.kept[j]}.{match.group(3)}"
        return student_key

    def feature_pairs(self) -> tuple[FeaturePair, ...]:
        """Each kept student block's output against the teacher's at the end of the run of blocks it replaces."""
        return self.pairs

    def explicit(self) -> Plan:
        """The same plan with every stack's kept indices spelt out."""
        return replace(self.plan, blocks=tuple((s.spec.address, s.kept) for s in self.stacks))

    def block_fates(self) -> list[tuple[str, str | None]]:
        """Every teacher block with its student address, or None when removed."""
        fates: list[tuple[str, str | None]] = []
        for stack in self.stacks:
            where = {t: j for j, t in enumerate(stack.kept)}
            for i in range(stack.depth):
                j = where.get(i)
                fates.append((f"{stack.spec.address}.{i}", None if j is None else f"{stack.spec.address}.{j}"))
        return fates

    def summary(self) -> str:
        """One line on the student's shape, for terminals."""
        return (
            "student: "
            + ", ".join(f"{s.spec.count_key}={len(s.kept)} (of {s.depth})" for s in self.stacks)
            + "".join(f", {k}={v}" for k, v in self.updates.items())
        )


_BLOCK_KEY = re.compile(r"^([a-z_]+)\.(\d+)\.(.+)$")


def resolve_stacks(plan: Plan, config: Mapping[str, Any], rules: StackRules, family: str) -> ResolvedStacks:
    """Checks ``plan`` against a transformer teacher's config and fixes the kept blocks of every stack.

    Raises:
        PlanError: listing every problem (U-Net rules on a transformer, unknown stacks, an empty stack, an index
            out of range, a family rule broken).
    """
    problems: list[str] = []
    if plan.unet_rules:
        problems.append(
            f"{', '.join(plan.unet_rules)}: U-Net rules, but the teacher is a {family} transformer; "
            "choose its blocks with `blocks: {STACK: SELECTOR}` (e.g. a preset: keep-half, keep-third)"
        )
    depths = {s.address: int(config.get(s.count_key, 0) or 0) for s in rules.stacks}
    names = ", ".join(f"{a} ({d} blocks)" for a, d in depths.items())
    chosen = match_overrides(plan.blocks, list(depths), "blocks", names, problems)
    kept: dict[str, tuple[int, ...]] = {}
    for address, depth in depths.items():
        selector = chosen.get(address, ("all", True))[0]
        try:
            kept[address] = select(selector, depth)
        except ValueError as err:
            problems.append(f"blocks.{address}: {err}")
            kept[address] = tuple(range(depth))
            continue
        if depth and not kept[address]:
            problems.append(f"blocks.{address} keeps no block; keep at least one")
    if not problems:
        problems += rules.check(kept, config)
    if problems:
        raise PlanError(plan.name, problems)
    stacks = tuple(KeptStack(s, depths[s.address], kept[s.address]) for s in rules.stacks)
    width = rules.feature_width(config)
    pairs = []
    for stack in stacks:
        a = stack.spec.address
        for j, (start, end) in enumerate(zip(stack.kept, run_ends(stack.kept, stack.depth), strict=True)):
            student_streams = dict(rules.streams(a, start, config))
            for name, position in rules.streams(a, end, config):
                if name in student_streams:  # both blocks output this stream (SD3's last has no text stream)
                    pairs.append(FeaturePair(f"{a}.{end}", f"{a}.{j}", width, 1, position, name))
    return ResolvedStacks(plan, family, stacks, dict(config), rules.config_updates(kept, config), tuple(pairs))
