"""A plan resolved against one teacher, and everything derived from it.

:func:`resolve` checks a :class:`~bksdm.plan.spec.Plan` against one teacher's U-Net config and returns a
:class:`ResolvedPlan`, which fixes exactly which teacher blocks survive and where they go. From it the student
config, the student→teacher weight addresses and the feature-distillation pairs are all *computed*. Pure: no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bksdm.plan.spec import Plan, PlanError, Selector, select
from bksdm.plan.unet_layout import PER_STAGE_KEYS, LayoutError, StageLayout, UNetLayout


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
        channels: Channels of both outputs (the hidden width for a transformer block).
        downscale: Spatial downscaling of both outputs relative to the latent (1 for a transformer block).
        output: Which tensor of the modules' outputs is compared, when they return several (a joint transformer
            block returns ``(text states, image states)``); 0 for a U-Net block's hidden state.
        stream: The name of that output (``"image"``, ``"text"``), empty for U-Net blocks.
    """

    teacher: str
    student: str
    channels: int
    downscale: int
    output: int = 0
    stream: str = ""


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

    def self_attention_pairs(self) -> tuple[FeaturePair, ...]:
        """Feature pairs at the self-attention outputs (``attn1``) of every kept transformer block.

        KOALA (Lee et al., 2023) found self-attention features the most useful to distil when compressing SDXL. As for
        transformer stacks, a kept block stands for the run of teacher blocks up to the next kept one, so student
        block B of an attention is matched with the teacher's block at the end of that run (the attention's last
        block for the last kept one). Outermost down stage first, then the mid block, then the up stages.
        """

        def pairs_of(t_attention: str, s_attention: str, kept: tuple[int, ...], depth: int, channels: int, scale: int):
            for b, end in enumerate(run_ends(kept, depth)):
                yield FeaturePair(
                    f"{t_attention}.transformer_blocks.{end}.attn1",
                    f"{s_attention}.transformer_blocks.{b}.attn1",
                    channels,
                    scale,
                    stream="self-attention",
                )

        pairs: list[FeaturePair] = []
        n = self.layout.num_stages
        for stage in self.down:
            t = stage.teacher
            for j, (layer, kept) in enumerate(zip(stage.layers, stage.blocks, strict=True)):
                if t.has_attention:
                    at = (f"{t.address}.attentions.{layer}", f"{stage.student_address}.attentions.{j}")
                    pairs += pairs_of(*at, kept, t.depths[layer], t.channels, 2**t.index)
        if self.mid:
            last = self.layout.down[-1]
            at = ("mid_block.attentions.0", "mid_block.attentions.0")
            pairs += pairs_of(*at, self.mid, self.layout.mid_depth, last.channels, 2 ** (n - 1))
        for stage in self.up:
            t = stage.teacher
            for j, (layer, kept) in enumerate(zip(stage.layers, stage.blocks, strict=True)):
                if t.has_attention:
                    at = (f"{t.address}.attentions.{layer}", f"{stage.student_address}.attentions.{j}")
                    pairs += pairs_of(*at, kept, t.depths[layer], t.channels, 2 ** (n - 1 - t.index))
        return tuple(pairs)

    # ---- descriptions -------------------------------------------------------------------------------
    def summary(self) -> str:
        """One line on the student's shape, for terminals."""
        config = self.student_config()
        return (
            f"student: {len(config['down_block_types'])} stages, layers_per_block={config['layers_per_block']}, "
            f"mid_block_type={config['mid_block_type']}"
        )

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


def run_ends(kept: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """The last teacher block of the run each kept block replaces: up to the next kept one, the last to the end.

    ``kept=(0, 2, 5)`` of 6 blocks gives ``(1, 4, 5)``: student block 0 stands for teacher blocks 0-1, block 1 for
    2-4, block 2 for block 5. Removed blocks before the first kept one have no student block standing for them.
    """
    return tuple(nxt - 1 for nxt in kept[1:]) + (depth - 1,)


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
    if plan.blocks:
        problems.append(
            "blocks: this rule selects the blocks of a diffusion transformer's stacks, but the teacher is a U-Net; "
            "use down_layers / up_layers / layers / transformer_blocks"
        )
    n = layout.num_stages
    k = plan.drop_innermost_stages
    if not isinstance(k, int) or not 0 <= k < n:
        problems.append(f"drop_innermost_stages={k!r}: this teacher has {n} stages, so use 0..{n - 1}")
        k = 0
    if plan.mid_block not in ("keep", "drop"):
        problems.append(f"mid_block='{plan.mid_block}': use 'keep' or 'drop'")
    stage_names = ", ".join(s.address for s in (*layout.down, *layout.up))
    overrides = match_overrides(
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
    block_overrides = match_overrides(
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


def match_overrides(
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
