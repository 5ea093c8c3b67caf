"""The removable units of a teacher denoiser, and the smallest valid plan that removes each (``bksdm plan score``).

A *unit* is the smallest thing a plan can remove:

- transformer teachers (SD3, FLUX.1): each block of each stack (``transformer_blocks.7``,
  ``single_transformer_blocks.12``), removed by ``blocks: {stack: [every index but 7]}``; blocks the family's rules
  keep (SD3's last, ``context_pre_only`` block) are not units;
- U-Nets: each layer of each stage (``down_blocks.1.layers.1``: ``resnets.1`` with ``attentions.1``), the mid block
  (``mid_block``), the innermost stage (``down_blocks.3+up_blocks.0``: ``drop_innermost_stages: 1``, which also takes
  the downsampler before it) and each transformer block of an attention that holds several
  (``down_blocks.2.attentions.0.transformer_blocks.3``, SDXL).

Every unit is measured by an :class:`Ablation`: a real plan that ``bksdm prune`` accepts, removing as little as the
layout's rules allow. Most units have one of their own. Two rules tie U-Net units together, and those are measured in
pairs and decomposed afterwards (:func:`bksdm.plan.score.decompose`):

- an up stage keeps exactly one layer more than its mirrored down stage (``resolve``), so a down layer can only go with
  an up layer of the mirror stage: every (down layer j, up layer k) pair whose student the teacher's weights fill
  (``plan.surgery.weight_map``: no gap, no shape mismatch) is one ablation;
- diffusers sizes the mid block's attention from the last down stage's first layer, so (SDXL) a mid-block transformer
  block can only go with one of that attention: the pairs (mid b, attention 0) and (mid 0, attention b) for every b,
  a spanning set from which each block's score follows exactly.

The innermost stage is dropped alone where that is valid, else together with the mid block (SDXL, whose mid block is
wider than the stage before it); such a unit *contains* the mid block. Units are listed in model order. Pure: shapes
are built on the meta device, nothing is loaded or written.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bksdm.families import family_of
from bksdm.plan.resolved import ResolvedPlan
from bksdm.plan.spec import Plan, PlanError
from bksdm.plan.surgery import Shape, shapes_of, weight_map
from bksdm.plan.unet_layout import UNetLayout

DOWN_LAYER, UP_LAYER, MID, STAGE, ATTENTION_BLOCK, BLOCK = (
    "down layer",
    "up layer",
    "mid block",
    "innermost stage",
    "attention block",
    "block",
)
"""The kinds of unit."""


class UnitError(ValueError):
    """A unit name that this teacher does not have, or a plan that removes something no unit stands for."""


@dataclass(frozen=True)
class Site:
    """Where the similarity score reads a unit's input and output in the teacher.

    Attributes:
        input_module: The module whose first input (``hidden_states``) is the unit's input.
        output_module: The module whose output is the unit's output.
        output_position: Which tensor of a tuple output (a joint transformer block returns (text, image): 1).
    """

    input_module: str
    output_module: str
    output_position: int = 0


@dataclass(frozen=True)
class Unit:
    """One removable unit of the teacher.

    Attributes:
        address: Its name: a diffusers module address, ``STAGE.layers.J`` for a U-Net layer, or
            ``down_blocks.N+up_blocks.0`` for the innermost stage.
        kind: One of :data:`DOWN_LAYER`, :data:`UP_LAYER`, :data:`MID`, :data:`STAGE`, :data:`ATTENTION_BLOCK`,
            :data:`BLOCK`.
        stage: The stage or stack it belongs to, for reports (``down_blocks.1``, ``mid_block``, ``transformer_blocks``).
        modules: The diffusers modules removing it deletes (``--keep``/``--drop`` accept these too).
        contains: The other units it removes with it (a layer's transformer blocks, the innermost stage's layers).
        params: Parameters of its modules.
        macs: Multiply-accumulates of its modules in one teacher step (convolutions and linear layers, the BK-SDM
            paper's count) at the teacher's resolution.
        site: Where its similarity score is read; None when its input and output differ in shape.
    """

    address: str
    kind: str
    stage: str
    modules: tuple[str, ...]
    contains: tuple[str, ...] = ()
    params: int = 0
    macs: int = 0
    site: Site | None = None


@dataclass(frozen=True)
class Ablation:
    """A plan that removes one unit, or a tied pair of units, and nothing else.

    Attributes:
        units: The unit removed, or the two tied units (down layer, up layer) / (mid block, attention block).
        plan: The plan (valid for the teacher: it resolves and its student is filled from the teacher's weights).
        tie: The pair family the ablation belongs to (its loss is decomposed with the others of that family), or None.
    """

    units: tuple[str, ...]
    plan: Plan
    tie: str | None = None

    @property
    def key(self) -> str:
        """``"a"`` or ``"a & b"``: the ablation's name in reports."""
        return " & ".join(self.units)


@dataclass(frozen=True)
class UnitSpace:
    """Every removable unit of one teacher, the ablations that measure them, and plan <-> units conversions.

    Attributes:
        family: The teacher's family name.
        config: The teacher denoiser's config.
        units: The units, in model order.
        ablations: The ablations, in model order.
        teacher_params: Parameters of the teacher denoiser.
        teacher_macs: Its MACs per step (convolutions and linear layers) at ``resolution``.
        resolution: Image side (px) the MACs are counted at.
        vae_scale: Pixels per latent side.
    """

    family: str
    config: Mapping[str, Any] = field(repr=False)
    units: tuple[Unit, ...]
    ablations: tuple[Ablation, ...]
    teacher_params: int
    teacher_macs: int
    resolution: int
    vae_scale: int
    teacher_shapes: Mapping[str, Shape] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_address", {u.address: u for u in self.units})

    def __getitem__(self, address: str) -> Unit:
        return self._by_address[address]  # type: ignore[attr-defined]

    def find(self, name: str) -> Unit:
        """The unit a user names by its address or by one of its modules (``down_blocks.1.resnets.1``).

        Raises:
            UnitError: No unit has that name (the message suggests the closest ones).
        """
        by_address: dict[str, Unit] = self._by_address  # type: ignore[attr-defined]
        if name in by_address:
            return by_address[name]
        for unit in self.units:
            if name in unit.modules:
                return unit
        close = difflib.get_close_matches(name, list(by_address), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnitError(
            f"'{name}' is not a removable unit of this teacher ({len(self.units)} units, e.g. {self.units[0].address}; "
            f"scores.csv lists them all){hint}"
        )

    def covered(self, addresses: Iterable[str]) -> frozenset[str]:
        """The units and every unit they contain."""
        out: set[str] = set()
        for address in addresses:
            out.add(address)
            out.update(self[address].contains)
        return frozenset(out)

    # ---- plans ----------------------------------------------------------------------------------------
    def problems(self, plan: Plan) -> list[str]:
        """Why ``prune`` would refuse ``plan`` for this teacher (empty when it builds a filled student)."""
        family = family_of(self.config)
        try:
            resolved = family.resolve(plan, self.config)
        except PlanError as err:
            return err.problems
        with torch.device("meta"):
            student = family.build(resolved.student_config())
        return weight_map(resolved, shapes_of(student), self.teacher_shapes).problems

    def removed_by(self, plan: Plan) -> frozenset[str]:
        """The outermost units a plan removes (the innermost stage, not also its layers).

        Raises:
            PlanError: The plan does not fit the teacher.
            UnitError: The plan removes something no unit stands for (two innermost stages, a layer that no valid
                ablation removes).
        """
        resolved = family_of(self.config).resolve(plan, self.config)
        removed: list[str] = []
        if isinstance(resolved, ResolvedPlan):
            removed = _unet_removed(resolved, self)
        else:
            for stack in resolved.stacks:
                removed += [f"{stack.spec.address}.{i}" for i in range(stack.depth) if i not in stack.kept]
        unknown = [a for a in removed if a not in self._by_address]  # type: ignore[attr-defined]
        if unknown:
            raise UnitError(f"plan '{plan.name}' removes {', '.join(unknown)}, which no unit of the scores stands for")
        return frozenset(removed)

    def plan_for(self, removed: Iterable[str], name: str, description: str = "") -> Plan:
        """The explicit plan that removes exactly ``removed`` (outermost units) and keeps everything else."""
        removed = set(removed)
        if self.family != "unet":
            stacks: dict[str, list[int]] = {}
            for address in sorted(removed):
                stack, _, index = address.rpartition(".")
                stacks.setdefault(stack, []).append(int(index))
            blocks = []
            for spec in family_of(self.config).stacks:
                depth = int(self.config[spec.count_key])
                if spec.address in stacks:
                    blocks.append((spec.address, tuple(i for i in range(depth) if i not in stacks[spec.address])))
            return Plan(name, description, blocks=tuple(blocks))
        return _unet_plan(self, removed, name, description)


def _unet_removed(resolved: ResolvedPlan, space: UnitSpace) -> list[str]:
    layout = resolved.layout
    k = resolved.plan.drop_innermost_stages
    removed: list[str] = []
    stage_unit = next((u for u in space.units if u.kind == STAGE), None)
    if k > 1:
        raise UnitError(f"plan '{resolved.plan.name}' drops {k} innermost stages; the scores measure dropping one")
    if k == 1:
        if stage_unit is None:
            raise UnitError(
                f"plan '{resolved.plan.name}' drops the innermost stage, which this teacher cannot do alone"
            )
        removed.append(stage_unit.address)
    gone = set(stage_unit.contains) if k == 1 and stage_unit else set()
    if layout.mid_type and resolved.mid is None and "mid_block" not in gone:
        removed.append("mid_block")
    for kept in (*resolved.down, *resolved.up):
        t = kept.teacher
        removed += [f"{t.address}.layers.{j}" for j in range(t.num_layers) if j not in kept.layers]
        for j, blocks in zip(kept.layers, kept.blocks, strict=True):
            if t.has_attention:
                attention = f"{t.address}.attentions.{j}"
                removed += [f"{attention}.transformer_blocks.{b}" for b in range(t.depths[j]) if b not in blocks]
    if resolved.mid is not None:
        removed += [
            f"mid_block.attentions.0.transformer_blocks.{b}" for b in range(layout.mid_depth) if b not in resolved.mid
        ]
    return removed


def _unet_plan(space: UnitSpace, removed: set[str], name: str, description: str) -> Plan:
    layout = UNetLayout.from_config(space.config)
    stage = next((u for u in space.units if u.kind == STAGE and u.address in removed), None)
    k = 1 if stage else 0
    gone = set(space.covered(removed))
    mid = "drop" if "mid_block" in gone else "keep"
    n = layout.num_stages
    layers, blocks = [], []
    for s in (*layout.down[: n - k], *layout.up[k:]):
        kept = tuple(j for j in range(s.num_layers) if f"{s.address}.layers.{j}" not in gone)
        if len(kept) < s.num_layers:
            layers.append((s.address, kept))
        for j in kept if s.has_attention else ():
            attention = f"{s.address}.attentions.{j}"
            chosen = tuple(b for b in range(s.depths[j]) if f"{attention}.transformer_blocks.{b}" not in gone)
            if len(chosen) < s.depths[j]:
                blocks.append((attention, chosen))
    if mid == "keep" and layout.mid_type:
        chosen = tuple(
            b for b in range(layout.mid_depth) if f"mid_block.attentions.0.transformer_blocks.{b}" not in gone
        )
        if len(chosen) < layout.mid_depth:
            blocks.append(("mid_block.attentions.0", chosen))
    return Plan(
        name,
        description,
        mid_block=mid,
        drop_innermost_stages=k,
        layers=tuple(layers),
        transformer_blocks=tuple(blocks),
    )
