"""Plans: which teacher blocks a student keeps, as a few rules, and their YAML/dict form.

A :class:`Plan` is a handful of rules ("each down stage keeps its first layer", "drop the mid block") plus
optional per-address overrides; :data:`PRESETS` names the paper's variants. :func:`bksdm.plan.resolved.resolve`
checks a plan against one teacher's config and computes everything derived from it (student config, weight
map, feature pairs); nothing is listed per preset. Pure: no I/O.

Vocabulary (diffusers' own module addresses). U-Nets: a *stage* is ``down_blocks.N`` or ``up_blocks.N``; a
*layer* of a stage is ``resnets.J`` together with ``attentions.J`` when the stage has attention; an attention
holds a stack of ``transformer_blocks``. Diffusion transformers (SD3, FLUX.1): a *stack* is a module list of
blocks at the model's root, ``transformer_blocks`` (and FLUX's ``single_transformer_blocks``); the ``blocks``
rules say which of each stack's blocks survive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

Selector = str | tuple[int, ...]
"""Which of N items to keep: ``"all"``, ``"first"``, ``"last"``, ``"first_and_last"``, ``"first:K"``,
``"last:K"``, ``"every:K"`` (indices 0, K, 2K, ...), ``"spread:M"`` or ``"spread:P%"`` (M items, or P% of them
rounded, evenly spread with the first and the last included), or explicit indices (in YAML a list whose
items may also be inclusive ranges ``"A..B"``)."""

_SELECTOR_WORDS = ("all", "first", "last", "first_and_last", "first:K", "last:K", "every:K", "spread:M", "spread:P%")


class PlanError(ValueError):
    """A plan that is malformed or does not fit the teacher; the message lists every problem at once."""

    def __init__(self, plan_name: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            f"plan '{plan_name}' cannot be applied ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):\n  - " + "\n  - ".join(problems)
        )


@dataclass(frozen=True)
class Plan:
    """What a student keeps of its teacher, as rules plus per-address overrides.

    Attributes:
        name: Short name, used in reports and output folders.
        description: One line saying what the plan is.
        down_layers: Selector applied to the layers of every kept down stage.
        up_layers: Selector applied to the layers of every kept up stage.
        mid_block: ``"keep"`` or ``"drop"`` the mid block (BK-SDM-Small/Tiny drop it).
        drop_innermost_stages: How many of the lowest-resolution stages to remove entirely (down stage and its
            mirrored up stage; the new innermost down stage loses its downsampler). BK-SDM-Tiny drops 1.
        layers: Overrides of the layer selector for single stages, as (stage address or glob, selector)
            pairs, e.g. ``("up_blocks.1", (0, 1))``. Indices are the teacher's.
        transformer_blocks: Which transformer blocks each kept attention keeps, as (attention address or glob,
            selector) pairs, e.g. ``("down_blocks.2.attentions.*", "first:5")``. Later entries win.
        blocks: Diffusion transformers only: which blocks each stack keeps, as (stack address or glob, selector)
            pairs, e.g. ``("transformer_blocks", "spread:12")``, ``("single_transformer_blocks", "every:2")``.
            Stacks without an entry keep every block; later entries win.
    """

    name: str
    description: str = ""
    down_layers: Selector = "all"
    up_layers: Selector = "all"
    mid_block: str = "keep"
    drop_innermost_stages: int = 0
    layers: tuple[tuple[str, Selector], ...] = ()
    transformer_blocks: tuple[tuple[str, Selector], ...] = ()
    blocks: tuple[tuple[str, Selector], ...] = ()

    @property
    def unet_rules(self) -> list[str]:
        """The U-Net fields this plan sets away from their defaults (a transformer teacher rejects them)."""
        default = Plan(self.name)
        names = ("down_layers", "up_layers", "mid_block", "drop_innermost_stages", "layers", "transformer_blocks")
        return [n for n in names if getattr(self, n) != getattr(default, n)]


PRESETS: dict[str, Plan] = {
    "identity": Plan("identity", "keep every block (a check that surgery is exact)"),
    # BK-SDM (Kim et al., ECCV 2024), Sec. 3.1: the second pair of every down stage and the middle pair of
    # every up stage contribute least to generation quality when removed.
    "bk-base": Plan(
        "bk-base",
        "BK-SDM-Base: each down stage keeps its first layer, each up stage its first and last",
        down_layers="first",
        up_layers="first_and_last",
    ),
    "bk-small": Plan(
        "bk-small",
        "BK-SDM-Small: bk-base without the mid block",
        down_layers="first",
        up_layers="first_and_last",
        mid_block="drop",
    ),
    "bk-tiny": Plan(
        "bk-tiny",
        "BK-SDM-Tiny: bk-small without the innermost stage",
        down_layers="first",
        up_layers="first_and_last",
        mid_block="drop",
        drop_innermost_stages=1,
    ),
}
"""The U-Net presets (and ``identity``, which fits every teacher)."""

TRANSFORMER_PRESETS: dict[str, Plan] = {
    # Every stack keeps a share of its blocks, evenly spread with its
    # first and last block kept (the first reads the patch embedding; SD3's last is the only block whose text
    # stream is pre-only, so an SD3 student must keep it).
    "keep-half": Plan(
        "keep-half", "every transformer stack keeps half of its blocks, evenly spread", blocks=(("*", "spread:50%"),)
    ),
    "keep-two-thirds": Plan(
        "keep-two-thirds",
        "every transformer stack keeps two thirds of its blocks, evenly spread",
        blocks=(("*", "spread:67%"),),
    ),
    "keep-third": Plan(
        "keep-third",
        "every transformer stack keeps a third of its blocks, evenly spread",
        blocks=(("*", "spread:33%"),),
    ),
}
"""Presets for diffusion-transformer teachers (SD3 / SD3.5, FLUX.1)."""

ALL_PRESETS: dict[str, Plan] = {**PRESETS, **TRANSFORMER_PRESETS}
"""Every preset, by name: what ``load_plan`` and the commands accept."""


def select(selector: Selector, n: int) -> tuple[int, ...]:
    """Indices of ``n`` items that ``selector`` keeps.

    Raises:
        ValueError: for an unknown rule or an index out of range (the message says which).
    """
    if isinstance(selector, str):
        rule, _, count = selector.partition(":")
        if rule == "all" and not count:
            return tuple(range(n))
        if rule == "first_and_last" and not count:
            return (0, n - 1) if n > 1 else (0,)
        if rule == "every":
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"'{selector}': give every:K with a whole number K >= 1")
            return tuple(range(0, n, int(count)))
        if rule == "spread":
            return _spread(selector, count, n)
        if rule in ("first", "last"):
            if count and not count.isdigit():
                raise ValueError(f"'{selector}': the count after ':' must be a whole number")
            k = int(count) if count else 1
            if k > n:
                raise ValueError(f"'{selector}' asks for {k} of only {n}")
            return tuple(range(k)) if rule == "first" else tuple(range(n - k, n))
        raise ValueError(f"unknown selector '{selector}'; use one of {', '.join(_SELECTOR_WORDS)} or a list")
    indices = tuple(int(i) for i in selector)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices {bad} out of range: there are {n} (0..{n - 1})")
    if list(indices) != sorted(set(indices)):
        raise ValueError(f"indices {list(indices)} must be increasing and distinct (the student keeps order)")
    return indices


def _spread(selector: str, count: str, n: int) -> tuple[int, ...]:
    """``spread:M`` / ``spread:P%``: M of n indices evenly spread, first and last included (M=1: the last)."""
    if count.endswith("%") and count[:-1].replace(".", "", 1).isdigit():
        share = float(count[:-1]) / 100
        if not 0 < share <= 1:
            raise ValueError(f"'{selector}': the share must be in (0%, 100%]")
        m = max(1, int(n * share + 0.5))
    elif count.isdigit() and int(count) >= 1:
        m = int(count)
    else:
        raise ValueError(f"'{selector}': give spread:M with a whole number M >= 1, or spread:P%")
    if m > n:
        raise ValueError(f"'{selector}' asks for {m} of only {n}")
    if m == 1:
        return (n - 1,)
    return tuple(sorted({round(i * (n - 1) / (m - 1)) for i in range(m)}))


def _expand_ranges(items: list[Any]) -> tuple[int, ...] | None:
    """A YAML index list whose items are whole numbers or inclusive ranges ``"A..B"``; None if malformed."""
    out: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
            continue
        lo, sep, hi = str(item).partition("..")
        if not (sep and lo.strip().isdigit() and hi.strip().isdigit() and int(lo) <= int(hi)):
            return None
        out.extend(range(int(lo), int(hi) + 1))
    return tuple(out)


# ---- loading and saving ---------------------------------------------------------------------------------

_YAML_KEYS = {f.name for f in fields(Plan)} | {"base"}


def plan_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Plan:
    """Builds a Plan from its YAML/dict form (examples in ``configs/plans/``).

    ``base: <preset>`` starts from a preset; ``layers`` and ``transformer_blocks`` are mappings from
    address (or glob) to a selector. Raises PlanError listing every unknown key and wrong type.
    """
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise PlanError(source, [f"a plan file must hold a mapping, found {type(data).__name__}"])
    source = str(data.get("name", source))
    unknown = sorted(set(data) - _YAML_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown}; allowed: {sorted(_YAML_KEYS)}")
    base_name = data.get("base")
    base = Plan(name=str(data.get("name", source)))
    if base_name is not None:
        if base_name not in ALL_PRESETS:
            problems.append(f"base: unknown preset '{base_name}'; presets are {sorted(ALL_PRESETS)}")
        else:
            base = replace(ALL_PRESETS[base_name], name=str(data.get("name", source)))
    values: dict[str, Any] = {}
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{key} must be a string, found {data[key]!r}")
        elif key in data:
            values[key] = data[key]
    for key in ("down_layers", "up_layers"):
        if key in data:
            values[key] = _selector(data[key], key, problems)
    if "mid_block" in data:
        if data["mid_block"] not in ("keep", "drop"):
            problems.append(f"mid_block must be 'keep' or 'drop', found {data['mid_block']!r}")
        values["mid_block"] = data["mid_block"]
    if "drop_innermost_stages" in data:
        value = data["drop_innermost_stages"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"drop_innermost_stages must be a whole number >= 0, found {value!r}")
        values["drop_innermost_stages"] = value
    for key in ("layers", "transformer_blocks", "blocks"):
        if key not in data:
            continue
        mapping = data[key]
        if not isinstance(mapping, Mapping):
            problems.append(f"{key} must map block addresses to selectors, found {mapping!r}")
            continue
        values[key] = tuple((str(a), _selector(s, f"{key}.{a}", problems)) for a, s in mapping.items())
    if problems:
        raise PlanError(source, problems)
    return replace(base, **values)


def _selector(value: Any, where: str, problems: list[str]) -> Selector:
    if isinstance(value, str):
        try:
            select(value, 10**6)
        except ValueError as err:
            if "asks for" not in str(err):
                problems.append(f"{where}: {err}")
        return value
    if isinstance(value, (list, tuple)):
        indices = _expand_ranges(list(value))
        if indices is not None:
            return indices
    problems.append(
        f"{where}: expected a rule ({', '.join(_SELECTOR_WORDS)}) or a list of indices and 'A..B' ranges, "
        f"found {value!r}"
    )
    return "all"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The YAML/dict form of a plan; ``plan_from_dict(plan_to_dict(p)) == p``."""

    def out(selector: Selector) -> Any:
        return selector if isinstance(selector, str) else list(selector)

    data: dict[str, Any] = {"name": plan.name}
    if plan.description:
        data["description"] = plan.description
    data.update(
        down_layers=out(plan.down_layers),
        up_layers=out(plan.up_layers),
        mid_block=plan.mid_block,
        drop_innermost_stages=plan.drop_innermost_stages,
    )
    if plan.layers:
        data["layers"] = {a: out(s) for a, s in plan.layers}
    if plan.transformer_blocks:
        data["transformer_blocks"] = {a: out(s) for a, s in plan.transformer_blocks}
    if plan.blocks:
        data["blocks"] = {a: out(s) for a, s in plan.blocks}
    return data
