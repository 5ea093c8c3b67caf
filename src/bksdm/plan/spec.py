"""Plans: which teacher U-Net blocks a student keeps, and everything derived from that choice.

A :class:`Plan` is a handful of rules ("each down stage keeps its first layer", "drop the mid block") plus
optional per-address overrides. :func:`resolve` checks it against one teacher's config and returns a
:class:`ResolvedPlan`, from which the student config, the student→teacher weight addresses and the
feature-distillation pairs are all *computed*; nothing is listed per preset. Pure: no I/O.

Vocabulary (diffusers' own module addresses): a *stage* is ``down_blocks.N`` or ``up_blocks.N``; a *layer*
of a stage is ``resnets.J`` together with ``attentions.J`` when the stage has attention; an attention holds
a stack of ``transformer_blocks``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from bksdm.plan.unet_layout import PER_STAGE_KEYS, LayoutError, StageLayout, UNetLayout

Selector = str | tuple[int, ...]
"""Which of N items to keep: ``"all"``, ``"first"``, ``"last"``, ``"first_and_last"``, ``"first:K"``,
``"last:K"``, or explicit indices."""

_SELECTOR_WORDS = ("all", "first", "last", "first_and_last", "first:K", "last:K")


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
    """

    name: str
    description: str = ""
    down_layers: Selector = "all"
    up_layers: Selector = "all"
    mid_block: str = "keep"
    drop_innermost_stages: int = 0
    layers: tuple[tuple[str, Selector], ...] = ()
    transformer_blocks: tuple[tuple[str, Selector], ...] = ()


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


@dataclass(frozen=True)
class KeptStage:
    """A teacher stage as the student keeps it.

    Attributes:
        teacher: The teacher stage.
        student_index: Index of the stage in the student's ``down_blocks`` / ``up_blocks``.
        layers: Teacher layer indices kept, in student order.
        blocks: For each kept layer, the teacher transformer-block indices kept (empty without attention).
        sampler: Whether the student stage ends with a down-/upsampler (copied from the teacher's).
    """

    teacher: StageLayout
    student_index: int
    layers: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    sampler: bool

    @property
    def student_address(self) -> str:
        return f"{self.teacher.kind}_blocks.{self.student_index}"


@dataclass(frozen=True)
class FeaturePair:
    """A teacher module and a student module whose outputs feature distillation compares.

    Attributes:
        teacher: Module address in the teacher U-Net.
        student: Module address in the student U-Net.
        channels: Channels of both outputs.
        downscale: Spatial downscaling of both outputs relative to the latent.
    """

    teacher: str
    student: str
    channels: int
    downscale: int


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan checked against one teacher: exactly which teacher blocks survive, and where they go."""

    plan: Plan
    layout: UNetLayout
    down: tuple[KeptStage, ...]
    up: tuple[KeptStage, ...]
    mid: tuple[int, ...] | None
    """Teacher transformer blocks kept in the mid block's attention; None when the student has no mid."""
    teacher_config: Mapping[str, Any] = field(compare=False, repr=False)

    # ---- the student config ------------------------------------------------------------------------
    def student_config(self) -> dict[str, Any]:
        """The stock diffusers ``UNet2DConditionModel`` config of the student."""
        teacher = self.teacher_config
        config = {k: v for k, v in teacher.items() if not k.startswith("_")}
        kept = [s.teacher.index for s in self.down]
        for key in ("down_block_types", "block_out_channels", *PER_STAGE_KEYS):
            value = teacher.get(key)
            if isinstance(value, (list, tuple)):
                config[key] = [value[i] for i in kept]
        config["up_block_types"] = [s.teacher.block_type for s in self.up]
        config["mid_block_type"] = self.layout.mid_type if self.mid is not None else None
        layers = [len(s.layers) for s in self.down]
        config["layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
        config.update(self._transformer_depth_config())
        return config

    def _transformer_depth_config(self) -> dict[str, Any]:
        raw = self.teacher_config.get("transformer_layers_per_block", 1)

        def teacher_value(index: int) -> int:
            entry = raw if isinstance(raw, int) else raw[index]
            return entry if isinstance(entry, int) else int(entry[0])

        # Stages without attention ignore their entry, except that diffusers sizes the mid block from the last
        # down stage's entry; keep the teacher's values elsewhere so that configs stay as the teacher wrote them.
        down = []
        for i, stage in enumerate(self.down):
            if stage.teacher.has_attention:
                down.append([len(b) for b in stage.blocks])
            else:
                last = i == len(self.down) - 1 and self.mid
                down.append([len(self.mid) if last else teacher_value(stage.teacher.index)] * len(stage.layers))
        up = []
        for i, stage in enumerate(self.up):
            mirror = down[len(down) - 1 - i][0]
            up.append([len(b) for b in stage.blocks] if stage.teacher.has_attention else [mirror] * len(stage.layers))
        uniform = all(len(set(d)) == 1 for d in down) and all(
            set(u) == {down[len(down) - 1 - i][0]} for i, u in enumerate(up)
        )
        if uniform:
            per_stage = [d[0] for d in down]
            tlpb: Any = per_stage[0] if len(set(per_stage)) == 1 else per_stage
            return {"transformer_layers_per_block": tlpb, "reverse_transformer_layers_per_block": None}
        return {"transformer_layers_per_block": down, "reverse_transformer_layers_per_block": up}

    # ---- weights ------------------------------------------------------------------------------------
    def teacher_key(self, student_key: str) -> str:
        """The teacher state-dict key a student state-dict key is copied from.

        Student layer J of a stage comes from the teacher layer ``layers[J]`` (so a bk-base up stage's layer 1
        comes from the teacher's layer 2), transformer block B from ``blocks[J][B]``, and student stage I
        from its teacher stage (bk-tiny's ``up_blocks.I`` from the teacher's ``up_blocks.I+1``).
        """
        match = _STAGE_KEY.match(student_key)
        if match:
            kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
            stages = self.down if kind == "down" else self.up
            if index >= len(stages):
                return student_key
            stage = stages[index]
            layer = _LAYER_KEY.match(rest)
            if layer:
                part, j, tail = layer.group(1), int(layer.group(2)), layer.group(3)
                if j < len(stage.layers):
                    tail = _map_transformer_block(tail, stage.blocks[j]) if part == "attentions" else tail
                    rest = f"{part}.{stage.layers[j]}.{tail}"
            return f"{kind}_blocks.{stage.teacher.index}.{rest}"
        if student_key.startswith("mid_block.attentions.0.") and self.mid:
            tail = _map_transformer_block(student_key[len("mid_block.attentions.0.") :], self.mid)
            return "mid_block.attentions.0." + tail
        return student_key

    # ---- feature distillation -----------------------------------------------------------------------
    def feature_pairs(self) -> tuple[FeaturePair, ...]:
        """Teacher/student module pairs for feature KD, outermost down stage first, then the up stages.

        Every kept stage's output is matched (BK-SDM-Base/Small: 4 down + 4 up). A down stage that lost its
        downsampler (bk-tiny's innermost one) has a different output resolution than the teacher's, so its
        last layer is matched instead; with attention that is the last ``attentions.J.proj_out``, which gives
        BK-SDM-Tiny's ``down_blocks.2.attentions.1.proj_out`` ↔ ``down_blocks.2.attentions.0.proj_out``.
        """
        pairs = []
        for stage in self.down:
            t = stage.teacher
            scale = 2 ** (t.index + 1 if stage.sampler else t.index)
            if stage.sampler == t.has_sampler:
                pairs.append(FeaturePair(t.address, stage.student_address, t.channels, scale))
            else:
                part = "attentions" if t.has_attention else "resnets"
                suffix = ".proj_out" if t.has_attention else ""
                pairs.append(
                    FeaturePair(
                        f"{t.address}.{part}.{t.num_layers - 1}{suffix}",
                        f"{stage.student_address}.{part}.{len(stage.layers) - 1}{suffix}",
                        t.channels,
                        scale,
                    )
                )
        n = self.layout.num_stages
        for stage in self.up:
            t = stage.teacher
            scale = 2 ** (n - 2 - t.index if t.has_sampler else n - 1 - t.index)
            pairs.append(FeaturePair(t.address, stage.student_address, t.channels, scale))
        return tuple(pairs)

    # ---- descriptions -------------------------------------------------------------------------------
    def explicit(self) -> Plan:
        """The same plan with every choice spelt out, so it re-resolves identically without the presets."""
        layers = tuple((s.teacher.address, s.layers) for s in (*self.down, *self.up))
        blocks = []
        for s in (*self.down, *self.up):
            for j, kept in zip(s.layers, s.blocks, strict=True):
                if s.teacher.has_attention:
                    blocks.append((f"{s.teacher.address}.attentions.{j}", kept))
        if self.mid:
            blocks.append(("mid_block.attentions.0", self.mid))
        return replace(
            self.plan,
            down_layers="all",
            up_layers="all",
            layers=layers,
            transformer_blocks=tuple(blocks),
        )

    def block_fates(self) -> list[tuple[str, str | None]]:
        """Every teacher block (layer, sampler, mid block) with its student address, or None when removed.

        An attention that keeps only part of its transformer stack is listed as kept; its dropped
        transformer blocks are listed separately.
        """
        fates: list[tuple[str, str | None]] = []
        kept = {(s.teacher.kind, s.teacher.index): s for s in (*self.down, *self.up)}
        for t in (*self.layout.down, *self.layout.up):
            stage = kept.get((t.kind, t.index))
            for j in range(t.num_layers):
                pos = stage.layers.index(j) if stage and j in stage.layers else None
                to = f"{stage.student_address}." if pos is not None else None
                fates.append((f"{t.address}.resnets.{j}", to and f"{to}resnets.{pos}"))
                if t.has_attention:
                    fates.append((f"{t.address}.attentions.{j}", to and f"{to}attentions.{pos}"))
                    for b in range(t.depths[j]):
                        if pos is not None and b not in stage.blocks[pos]:
                            fates.append((f"{t.address}.attentions.{j}.transformer_blocks.{b}", None))
            if t.has_sampler:
                part = "downsamplers" if t.kind == "down" else "upsamplers"
                keep = stage is not None and stage.sampler
                fates.append((f"{t.address}.{part}.0", f"{stage.student_address}.{part}.0" if keep else None))
            if t.kind == "down" and t.index == self.layout.num_stages - 1 and self.layout.mid_type:
                fates.append(("mid_block", "mid_block" if self.mid is not None else None))
                for b in range(self.layout.mid_depth):
                    if self.mid is not None and b not in self.mid:
                        fates.append((f"mid_block.attentions.0.transformer_blocks.{b}", None))
        return fates


_STAGE_KEY = re.compile(r"^(down|up)_blocks\.(\d+)\.(.+)$")
_LAYER_KEY = re.compile(r"^(resnets|attentions)\.(\d+)\.(.+)$")
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def _map_transformer_block(tail: str, kept: tuple[int, ...]) -> str:
    match = _BLOCK_KEY.match(tail)
    if not match or int(match.group(1)) >= len(kept):
        return tail
    return f"transformer_blocks.{kept[int(match.group(1))]}.{match.group(2)}"


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


def resolve(plan: Plan, teacher_config: Mapping[str, Any]) -> ResolvedPlan:
    """Checks ``plan`` against a teacher U-Net config and fixes every kept block.

    Raises:
        PlanError: listing every problem found (unknown addresses, empty stages, a plan that does not fit
            this teacher or that stock diffusers cannot express).
    """
    try:
        layout = UNetLayout.from_config(teacher_config)
    except LayoutError as err:
        raise PlanError(plan.name, [f"the teacher does not fit: {err}"]) from None
    problems: list[str] = []
    n = layout.num_stages
    k = plan.drop_innermost_stages
    if not isinstance(k, int) or not 0 <= k < n:
        problems.append(f"drop_innermost_stages={k!r}: this teacher has {n} stages, so use 0..{n - 1}")
        k = 0
    if plan.mid_block not in ("keep", "drop"):
        problems.append(f"mid_block='{plan.mid_block}': use 'keep' or 'drop'")
    stage_names = ", ".join(s.address for s in (*layout.down, *layout.up))
    overrides = _match_overrides(
        plan.layers, [s.address for s in (*layout.down, *layout.up)], "layers", stage_names, problems
    )
    dropped = {f"down_blocks.{i}" for i in range(n - k, n)} | {f"up_blocks.{i}" for i in range(k)}
    for address in sorted(overrides):
        if address in dropped and not overrides[address][1]:
            problems.append(f"layers: {address} is removed by drop_innermost_stages={k}; remove its entry")

    def kept_layers(stage: StageLayout, default: Selector) -> tuple[int, ...]:
        selector = overrides.get(stage.address, (default, True))[0]
        try:
            chosen = select(selector, stage.num_layers)
        except ValueError as err:
            problems.append(f"{stage.address} layers: {err}")
            return tuple(range(stage.num_layers))
        if not chosen:
            problems.append(
                f"{stage.address} keeps no layer; a kept stage needs at least one "
                "(to remove a whole innermost stage, use drop_innermost_stages)"
            )
        return chosen

    down_layers = [kept_layers(s, plan.down_layers) for s in layout.down[: n - k]]
    up_layers = [kept_layers(s, plan.up_layers) for s in layout.up[k:]]
    for up_stage, chosen in zip(layout.up[k:], up_layers, strict=True):
        mirror = layout.mirror(up_stage.index)
        want = len(down_layers[mirror]) + 1
        if chosen and len(chosen) != want:
            problems.append(
                f"{up_stage.address} keeps {len(chosen)} layers but its mirror down_blocks.{mirror} keeps "
                f"{want - 1}: in a diffusers U-Net an up stage has one layer more than its down stage "
                f"(the extra one takes the downsampler's skip), so keep {want}"
            )

    attention_addresses = [
        f"{s.address}.attentions.{j}"
        for s in (*layout.down, *layout.up)
        if s.has_attention
        for j in range(s.num_layers)
    ]
    if layout.mid_type:
        attention_addresses.append("mid_block.attentions.0")
    block_overrides = _match_overrides(
        plan.transformer_blocks,
        attention_addresses,
        "transformer_blocks",
        "attentions of " + stage_names + (", mid_block" if layout.mid_type else ""),
        problems,
    )

    def kept_blocks(address: str, depth: int) -> tuple[int, ...]:
        selector = block_overrides.get(address, ("all", True))[0]
        try:
            chosen = select(selector, depth)
        except ValueError as err:
            problems.append(f"{address} transformer_blocks: {err}")
            return tuple(range(depth))
        if not chosen:
            problems.append(f"{address} keeps no transformer block; keep at least one")
        return chosen

    def build(stages: tuple[StageLayout, ...], chosen: list[tuple[int, ...]], is_last) -> tuple[KeptStage, ...]:
        result = []
        for i, (stage, layers) in enumerate(zip(stages, chosen, strict=True)):
            blocks = tuple(
                kept_blocks(f"{stage.address}.attentions.{j}", stage.depths[j]) if stage.has_attention else ()
                for j in layers
            )
            result.append(KeptStage(stage, i, layers, blocks, sampler=stage.has_sampler and not is_last(i)))
        return tuple(result)

    down = build(layout.down[: n - k], down_layers, lambda i: i == n - k - 1)
    up = build(layout.up[k:], up_layers, lambda i: i == n - k - 1)
    kept_attentions = {f"{s.teacher.address}.attentions.{j}" for s in (*down, *up) for j in s.layers}
    for address, (_, is_glob) in sorted(block_overrides.items()):
        if not is_glob and address.startswith(("down", "up")) and address not in kept_attentions:
            problems.append(f"transformer_blocks: {address} is removed by this plan; remove its entry")

    mid: tuple[int, ...] | None = None
    if layout.mid_type and plan.mid_block == "keep":
        mid = kept_blocks("mid_block.attentions.0", layout.mid_depth)
        last = down[-1]
        if last.teacher.has_attention and mid and last.blocks and len(last.blocks[0]) != len(mid):
            problems.append(
                f"the mid block keeps {len(mid)} transformer blocks but {last.teacher.address}.attentions."
                f"{last.layers[0]} keeps {len(last.blocks[0])}: diffusers sizes the mid block from the last "
                "down stage's first layer, so make them equal"
            )
    elif "mid_block.attentions.0" in block_overrides and not block_overrides["mid_block.attentions.0"][1]:
        problems.append("transformer_blocks: mid_block.attentions.0 is set but the plan drops the mid block")
    if problems:
        raise PlanError(plan.name, problems)
    return ResolvedPlan(plan, layout, down, up, mid, dict(teacher_config))


def _match_overrides(
    entries: tuple[tuple[str, Selector], ...],
    addresses: list[str],
    what: str,
    known: str,
    problems: list[str],
) -> dict[str, tuple[Selector, bool]]:
    """Expands (address-or-glob, selector) entries over known addresses; later entries win.

    Returns address → (selector, whether it came from a glob). Unknown addresses are reported in ``problems``.
    """
    result: dict[str, tuple[Selector, bool]] = {}
    for pattern, selector in entries:
        is_glob = any(c in pattern for c in "*?[")
        matches = fnmatch.filter(addresses, pattern) if is_glob else [a for a in addresses if a == pattern]
        if not matches:
            problems.append(f"{what}: unknown block address '{pattern}' (this teacher has {known})")
        for address in matches:
            result[address] = (selector, is_glob)
    return result


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
        if base_name not in PRESETS:
            problems.append(f"base: unknown preset '{base_name}'; presets are {sorted(PRESETS)}")
        else:
            base = replace(PRESETS[base_name], name=str(data.get("name", source)))
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
    for key in ("layers", "transformer_blocks"):
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
            if "unknown selector" in str(err) or "whole number" in str(err):
                problems.append(f"{where}: {err}")
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    problems.append(f"{where}: expected a rule ({', '.join(_SELECTOR_WORDS)}) or a list of indices, found {value!r}")
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
    return data
