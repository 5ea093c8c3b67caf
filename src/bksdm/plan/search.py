"""Budgeted search: the valid plan with the lowest predicted loss whose student fits a budget. Pure.

The predicted loss of a plan is the sum of its removed units' scores (LAPTOP-Diff's additivity assumption, which
``bksdm plan score --validate`` measures), except that a removed pair of tied units that was measured as a pair
(a stage's down and up layer, SDXL's mid-block and tied attention blocks) counts with its measured pair loss rather
than the sum of its decomposed scores.

The layout's rules make the choice a tree of **groups** of mutually exclusive **options** (:class:`Group`):

- a U-Net stage pair (down stage i with its mirrored up stage) chooses which layers go, as many down as up layers,
  at least one down layer kept; each option carries sub-groups for the transformer blocks of the attentions it
  keeps. The innermost pair also chooses the mid block (kept, dropped, or, where diffusers ties its depth to the
  last down stage's first attention, as many blocks removed from each) and offers dropping the whole stage;
- a transformer stack chooses any subset of its blocks but not all of them.

Groups are independent, so the combinations of their options are exactly the plans the units can express. Where
there are at most :data:`EXACT_LIMIT` combinations they are all enumerated (exact); otherwise each group keeps only its
Pareto front of (removed cost, predicted loss) while they are combined (exact too while every combination is valid;
a heuristic only where the layout's weight shapes rule some out). The candidates that remove enough cost are then
tried in order of predicted loss: each is turned into a plan, checked as ``prune`` would check it (resolved, its
student filled without a gap) and costed exactly (params or MACs of the real student), and the first that passes
wins. Costs are *removed* amounts: a budget f of the teacher's cost C needs a removal of at least (1 - f) * C.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from bksdm.plan.spec import Plan
from bksdm.plan.unet_layout import StageLayout, UNetLayout
from bksdm.plan.units import STAGE, UnitSpace

EXACT_LIMIT = 100_000
"""Enumerate every combination up to this many; above it, combine Pareto fronts."""
MAX_TRIES = 200
"""Candidates checked (resolve, surgery map, exact cost) before the search gives up."""
BUDGET_KINDS = ("params", "macs", "latency")


class BudgetError(ValueError):
    """A budget that cannot be parsed or met, or pins that contradict each other."""


@dataclass(frozen=True)
class Budget:
    """What the student may keep: ``fraction`` of the teacher denoiser's params, MACs per step or step latency."""

    kind: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_budget(text: str) -> Budget:
    """``"params=0.45"`` → ``Budget("params", 0.45)``.

    Raises:
        BudgetError: Not KIND=FRACTION, an unknown kind, or a fraction outside (0, 1].
    """
    kind, sep, value = str(text).partition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not sep or kind not in BUDGET_KINDS or not 0 < fraction <= 1:
        raise BudgetError(
            f"--budget {text}: give KIND=FRACTION with KIND one of {', '.join(BUDGET_KINDS)} and a fraction of the "
            "teacher's in (0, 1], e.g. params=0.45"
        )
    return Budget(kind, fraction)


@dataclass(frozen=True)
class Scores:
    """The measured scores the search ranks plans by.

    Attributes:
        units: Unit -> score (the ablation loss; the decomposed share for tied units).
        pairs: The measured loss of each tied pair, by its two units.
        ties: Tied unit -> the name of its pair family.
    """

    units: Mapping[str, float]
    pairs: Mapping[frozenset[str], float]
    ties: Mapping[str, str]

    def predict(self, removed: Iterable[str]) -> float:
        """The predicted loss of removing ``removed`` (outermost units)."""
        removed = set(removed)
        total = 0.0
        families: dict[str, list[str]] = {}
        for unit in removed:
            if unit in self.ties:
                families.setdefault(self.ties[unit], []).append(unit)
            else:
                total += self.units[unit]
        for members in families.values():
            measured = self.pairs.get(frozenset(members)) if len(members) == 2 else None
            total += measured if measured is not None else sum(self.units[u] for u in members)
        return total


@dataclass(frozen=True)
class Option:
    """One alternative of a group: the units it removes itself, and the independent choices it leaves open."""

    units: frozenset[str]
    covered: frozenset[str]
    loss: float
    cost: float
    parts: tuple[Group, ...] = ()


@dataclass(frozen=True)
class Group:
    """Mutually exclusive options; combinations that remove all of ``forbid_all`` are invalid (keep one block)."""

    name: str
    options: tuple[Option, ...]
    forbid_all: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Combo:
    """A combination of options: the units removed, everything removed with them, predicted loss, removed cost."""

    units: frozenset[str]
    covered: frozenset[str]
    loss: float
    cost: float


EMPTY = Combo(frozenset(), frozenset(), 0.0, 0.0)


def _add(a: Combo, b: Combo) -> Combo:
    return Combo(a.units | b.units, a.covered | b.covered, a.loss + b.loss, a.cost + b.cost)


def pareto(combos: list[Combo]) -> list[Combo]:
    """The combinations no other beats on both counts (lower or equal loss while removing at least as much)."""
    front: list[Combo] = []
    best_cost = -1.0
    for combo in sorted(combos, key=lambda c: (c.loss, -c.cost)):
        if combo.cost > best_cost:
            front.append(combo)
            best_cost = combo.cost
    return front


def count(group: Group) -> int:
    """How many combinations a group has (before pins)."""
    return sum(int(np.prod([count(p) for p in o.parts], dtype=np.float64)) for o in group.options)


def universe(group: Group) -> frozenset[str]:
    """Every unit some combination of the group removes."""
    out: set[str] = set()
    for option in group.options:
        out |= option.covered
        for part in option.parts:
            out |= universe(part)
    return frozenset(out)


def combos(group: Group, keep: frozenset[str], drop: frozenset[str], prune: bool) -> list[Combo]:
    """The combinations of a group that respect the pins: none removes a kept unit, each removes the dropped units
    the group can remove. ``prune`` keeps only the Pareto front at every level."""
    result: list[Combo] = []
    for option in group.options:
        if option.covered & keep:
            continue
        partial = [Combo(option.units, option.covered, option.loss, option.cost)]
        for part in option.parts:
            sub = combos(part, keep, drop, prune)
            partial = [_add(a, b) for a in partial for b in sub]
            if prune:
                partial = pareto(partial)
        result += partial
    need = drop & universe(group)
    result = [c for c in result if need <= c.covered and not (group.forbid_all and group.forbid_all <= c.covered)]
    return pareto(result) if prune else result


# ---- the groups of a teacher --------------------------------------------------------------------------------


def build_groups(
    space: UnitSpace, scores: Scores, cost: Mapping[str, float], pins: tuple[frozenset, frozenset]
) -> list[Group]:
    """The choice tree of a teacher's units (see the module docstring). ``pins`` = (kept units, dropped units)."""

    def option(units: Iterable[str], parts: tuple[Group, ...] = ()) -> Option:
        units = frozenset(units)
        return Option(units, space.covered(units), scores.predict(units), sum(cost[u] for u in units), parts)

    def binary(unit: str) -> Group:
        return Group(unit, (option(()), option((unit,))))

    if space.family != "unet":
        groups = []
        for stack in dict.fromkeys(u.stage for u in space.units):
            members = [u.address for u in space.units if u.stage == stack]
            whole = len(members) == int(_depth(space, stack))
            parts = tuple(binary(u) for u in members)
            groups.append(Group(stack, (option((), parts),), frozenset(members) if whole else frozenset()))
        return groups
    return _unet_groups(space, scores, option, binary, pins)


def _depth(space: UnitSpace, stack: str) -> int:
    from bksdm.families import family_of

    spec = next(s for s in family_of(space.config).stacks if s.address == stack)
    return int(space.config[spec.count_key])


def _blocks(space: UnitSpace, attention: str) -> list[str]:
    prefix = attention + ".transformer_blocks."
    return [u.address for u in space.units if u.address.startswith(prefix)]


def _unet_groups(space: UnitSpace, scores: Scores, option, binary, pins) -> list[Group]:
    layout = UNetLayout.from_config(space.config)
    n = layout.num_stages
    keep, drop = pins
    names = {u.address for u in space.units}

    def attention_group(attention: str) -> Group | None:
        members = _blocks(space, attention)
        if not members:
            return None
        return Group(attention, (option((), tuple(binary(b) for b in members)),), frozenset(members))

    def tied_group(mid: list[str], other: list[str]) -> Group:
        """Remove r blocks from the mid block and r from its tied attention (diffusers sizes one from the other): for
        each r the pinned drops, then the lowest scores (blocks of one attention all cost the same)."""

        def order(members: list[str]) -> list[str]:
            free = sorted((m for m in members if m not in keep and m not in drop), key=lambda m: scores.units[m])
            return [m for m in members if m in drop] + free

        mids, others = order(mid), order(other)
        most = min(len(mid) - 1, len(other) - 1, len(mids), len(others))
        return Group("mid_block.attentions.0+tied", tuple(option(mids[:r] + others[:r]) for r in range(most + 1)))

    def kept_attentions(stage: StageLayout, removed: set[int]) -> list[str]:
        if not stage.has_attention:
            return []
        return [f"{stage.address}.attentions.{j}" for j in range(stage.num_layers) if j not in removed]

    groups = []
    for i in range(n):
        down, up = layout.down[i], layout.up[n - 1 - i]
        options = []
        for d_removed, u_removed in _layer_choices(space, down, up, names):
            units = [f"{down.address}.layers.{j}" for j in d_removed] + [f"{up.address}.layers.{k}" for k in u_removed]
            attentions = kept_attentions(down, set(d_removed)) + kept_attentions(up, set(u_removed))
            if i < n - 1:
                parts = tuple(g for a in attentions if (g := attention_group(a)))
                options.append(option(units, parts))
                continue
            # The mid block kept: its blocks go with those of the first kept down attention where diffusers ties them.
            mid_blocks = _blocks(space, "mid_block.attentions.0")
            down_kept = kept_attentions(down, set(d_removed))
            first = down_kept[0] if mid_blocks and down_kept else None
            parts = [g for a in attentions if a != first and (g := attention_group(a))]
            if first is not None:
                parts.append(tied_group(mid_blocks, _blocks(space, first)))
            elif mid_blocks:
                parts.append(attention_group("mid_block.attentions.0"))
            options.append(option(units, tuple(parts)))
            if "mid_block" in names:  # the mid block dropped: every kept attention free
                parts = [g for a in attentions if (g := attention_group(a))]
                options.append(option([*units, "mid_block"], tuple(parts)))
        if i == n - 1:
            stage = next((u for u in space.units if u.kind == STAGE), None)
            if stage is not None:
                options.append(option([stage.address]))
                if "mid_block" in names and "mid_block" not in stage.contains:
                    options.append(option([stage.address, "mid_block"]))
        groups.append(Group(f"{down.address}+{up.address}", tuple(options)))
    return groups


def _layer_choices(space: UnitSpace, down: StageLayout, up: StageLayout, names: set[str]):
    """(down layers removed, up layers removed): as many of each, at least one down layer kept, every choice of
    two or more layers checked as ``prune`` would (single pairs were checked when the units were listed)."""
    d_ok = [j for j in range(down.num_layers) if f"{down.address}.layers.{j}" in names]
    u_ok = [k for k in range(up.num_layers) if f"{up.address}.layers.{k}" in names]
    for r in range(min(len(d_ok), len(u_ok), down.num_layers - 1) + 1):
        for d in itertools.combinations(d_ok, r):
            for u in itertools.combinations(u_ok, r):
                if r >= 2:
                    layers = ((down.address, _kept(down, d)), (up.address, _kept(up, u)))
                    if space.problems(Plan("check", layers=layers)):
                        continue
                yield d, u


def _kept(stage: StageLayout, removed: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(j for j in range(stage.num_layers) if j not in removed)


# ---- the search ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    """The chosen plan and how it was chosen.

    Attributes:
        plan: The plan (explicit: every kept index spelt out).
        units: The outermost units it removes.
        predicted_loss: Their predicted loss.
        student_cost: The student's exact cost (params, or MACs per step), as ``exact_cost`` measured it.
        teacher_cost: The teacher's.
        exhaustive: Whether every combination was enumerated (else Pareto fronts were combined).
        tried: Candidates checked before this one passed.
    """

    plan: Plan
    units: frozenset[str]
    predicted_loss: float
    student_cost: float
    teacher_cost: float
    exhaustive: bool
    tried: int


def search(
    space: UnitSpace,
    scores: Scores,
    cost: Mapping[str, float],
    teacher_cost: float,
    fraction: float,
    exact_cost: Callable[[Plan], float],
    *,
    keep: Iterable[str] = (),
    drop: Iterable[str] = (),
    name: str = "searched",
    description: str = "",
) -> SearchResult:
    """The valid plan with the lowest predicted loss whose student costs at most ``fraction * teacher_cost``.

    Args:
        space: The teacher's units.
        scores: Their scores.
        cost: Unit -> the cost its removal saves (params, or MACs per step).
        teacher_cost: The teacher's cost in the same unit.
        fraction: The budget, a fraction of ``teacher_cost`` in (0, 1].
        exact_cost: The student's exact cost for a plan (built on the meta device).
        keep: Units (or their module addresses) the plan must keep.
        drop: Units the plan must remove.
        name, description: Of the plan.

    Raises:
        UnitError: An unknown unit in ``keep`` / ``drop``.
        BudgetError: A unit both kept and dropped, or no valid plan fits (the message gives the smallest reachable).
    """
    keep_set = frozenset(space.find(u).address for u in keep)
    drop_set = frozenset(space.find(u).address for u in drop)
    if keep_set & drop_set:
        raise BudgetError(f"{', '.join(sorted(keep_set & drop_set))}: both kept (--keep) and dropped (--drop)")
    root = Group(
        "plan",
        (Option(frozenset(), frozenset(), 0.0, 0.0, tuple(build_groups(space, scores, cost, (keep_set, drop_set)))),),
    )
    exhaustive = count(root) <= EXACT_LIMIT
    every = combos(root, keep_set, drop_set, prune=not exhaustive)
    if not every:
        raise BudgetError(f"no valid plan keeps {', '.join(sorted(keep_set))} and drops {', '.join(sorted(drop_set))}")
    need = (1 - fraction) * teacher_cost
    candidates = sorted((c for c in every if c.cost >= need * (1 - 1e-12)), key=lambda c: (c.loss, c.cost))
    smallest = max(every, key=lambda c: c.cost)
    tried = 0
    for combo in candidates[:MAX_TRIES]:
        tried += 1
        plan = space.plan_for(combo.units, name, description)
        if space.problems(plan):
            continue
        student = exact_cost(plan)
        if student <= fraction * teacher_cost * (1 + 1e-12):
            return SearchResult(plan, combo.units, combo.loss, student, teacher_cost, exhaustive, tried)
    reach = 1 - smallest.cost / teacher_cost
    pinned = " with these --keep pins" if keep_set else ""
    raise BudgetError(
        f"no valid plan fits {fraction:g} of the teacher's: the smallest student the removable units allow{pinned} "
        f"keeps {reach:.3f} of it" + (f" ({tried} candidates checked)" if tried else "")
    )


def random_removals(
    space: UnitSpace, scores: Scores, count_: int, seed: int, single: bool = False
) -> list[frozenset[str]]:
    """``count_`` distinct random removals that ``prune`` accepts; for the additivity check, each more than one
    measured ablation (a single ablation's loss is its own prediction, which would flatter the check).

    Each draws a removal share p ~ U(0.15, 0.6) and, walking the choice tree, takes a random non-empty option of a
    group with probability p; draws that remove nothing, repeat earlier ones, are one measured ablation (unless
    ``single``) or fail the plan check are drawn again (up to 50 times the count).
    """
    rng = np.random.default_rng(seed)
    cost = {u.address: 0.0 for u in space.units}
    groups = build_groups(space, scores, cost, (frozenset(), frozenset()))
    measured = {frozenset(a.units) for a in space.ablations}
    out: list[frozenset[str]] = []
    for _ in range(50 * count_):
        if len(out) == count_:
            break
        p = rng.uniform(0.15, 0.6)
        removed = frozenset().union(*(_draw(g, rng, p) for g in groups))
        if not removed or removed in out or (not single and removed in measured):
            continue
        if not space.problems(space.plan_for(removed, "random")):
            out.append(removed)
    return out


def _draw(group: Group, rng: np.random.Generator, p: float) -> frozenset[str]:
    for _ in range(20):
        empty = [o for o in group.options if not o.units]
        others = [o for o in group.options if o.units]
        pool = others if (others and (rng.random() < p or not empty)) else (empty or others)
        option = pool[int(rng.integers(len(pool)))]
        removed = option.units.union(*(_draw(part, rng, p) for part in option.parts))
        if not (group.forbid_all and group.forbid_all <= removed):
            return removed
    return frozenset()
