"""The block layout of a Stable Diffusion U-Net, read from its diffusers config.

Every plan is resolved against a :class:`UNetLayout`, never against a hard-coded model: the same rules then
apply to SD-v1.x, SD-v2.x (512 and 768), SDXL and to any U-Net with the SD block structure (including a
student that bksdm made earlier). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
"""Down block types bksdm can prune, mapped to whether they hold attention layers."""
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
"""Up block types bksdm can prune, mapped to whether they hold attention layers."""
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
"""Mid block types bksdm can keep or drop."""

# Config keys that hold one value per down stage (diffusers also accepts a scalar for each of them).
PER_STAGE_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention")


class LayoutError(ValueError):
    """The U-Net config does not have the Stable Diffusion block structure bksdm knows how to prune."""


@dataclass(frozen=True)
class StageLayout:
    """One teacher stage (a down block or an up block).

    Attributes:
        kind: ``"down"`` or ``"up"``.
        index: The stage's index in ``down_blocks`` / ``up_blocks``.
        block_type: The diffusers block class name, e.g. ``"CrossAttnDownBlock2D"``.
        channels: Output channels of the stage.
        has_attention: Whether each layer is a (ResNet, Transformer) pair rather than a ResNet alone.
        depths: Transformer blocks per layer (one entry per layer; 0 for a stage without attention).
        has_sampler: Whether the stage ends with a down- or upsampler.
    """

    kind: str
    index: int
    block_type: str
    channels: int
    has_attention: bool
    depths: tuple[int, ...]
    has_sampler: bool

    @property
    def address(self) -> str:
        """The stage's module address, e.g. ``"down_blocks.1"``."""
        return f"{self.kind}_blocks.{self.index}"

    @property
    def num_layers(self) -> int:
        """Number of layers (ResNets) in the stage."""
        return len(self.depths)


@dataclass(frozen=True)
class UNetLayout:
    """The prunable structure of a U-Net: its stages, mid block and per-layer transformer depths.

    Attributes:
        down: Down stages, outermost (highest resolution) first.
        up: Up stages, innermost first (diffusers order).
        mid_type: The mid block class name, or None when the U-Net has no mid block.
        mid_depth: Transformer blocks in the mid block's attention (0 without a mid block).
    """

    down: tuple[StageLayout, ...]
    up: tuple[StageLayout, ...]
    mid_type: str | None
    mid_depth: int

    @property
    def num_stages(self) -> int:
        """Number of resolution stages."""
        return len(self.down)

    def stage(self, address: str) -> StageLayout | None:
        """Returns the stage at ``address`` (``"down_blocks.N"`` / ``"up_blocks.N"``), or None."""
        for stage in (*self.down, *self.up):
            if stage.address == address:
                return stage
        return None

    def mirror(self, up_index: int) -> int:
        """Index of the down stage whose skip connections up stage ``up_index`` consumes."""
        return self.num_stages - 1 - up_index

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """Reads the layout from a diffusers ``UNet2DConditionModel`` config.

        Raises:
            LayoutError: listing every way in which the config departs from the SD block structure.
        """
        problems: list[str] = []
        down_types = list(config.get("down_block_types") or [])
        up_types = list(config.get("up_block_types") or [])
        channels = list(config.get("block_out_channels") or [])
        n = len(down_types)
        if n == 0:
            raise LayoutError("the U-Net config has no down_block_types: is this a UNet2DConditionModel config?")
        if len(up_types) != n or len(channels) != n:
            problems.append(
                f"{n} down blocks, {len(up_types)} up blocks and {len(channels)} block_out_channels: "
                "an SD U-Net has one of each per stage"
            )
        for i, name in enumerate(down_types):
            if name not in DOWN_TYPES:
                problems.append(f"down_blocks.{i} is a {name}; bksdm prunes {sorted(DOWN_TYPES)}")
        for i, name in enumerate(up_types):
            if name not in UP_TYPES:
                problems.append(f"up_blocks.{i} is a {name}; bksdm prunes {sorted(UP_TYPES)}")
        mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_type not in MID_TYPES:
            problems.append(f"mid block is a {mid_type}; bksdm handles {[t for t in MID_TYPES if t]} or none")
        for i in range(min(n, len(up_types))):
            mirrored = up_types[n - 1 - i]
            if down_types[i] in DOWN_TYPES and mirrored in UP_TYPES and DOWN_TYPES[down_types[i]] != UP_TYPES[mirrored]:
                problems.append(
                    f"down_blocks.{i} ({down_types[i]}) and its mirror up_blocks.{n - 1 - i} "
                    f"({mirrored}) disagree about attention"
                )
        layers = _per_stage(config.get("layers_per_block", 2), n, "layers_per_block", problems)
        for key in PER_STAGE_KEYS:
            value = config.get(key)
            if isinstance(value, (list, tuple)) and len(value) != n:
                problems.append(f"{key} has {len(value)} entries for {n} stages")
        if problems:
            raise LayoutError("not a Stable Diffusion U-Net layout:\n  - " + "\n  - ".join(problems))

        down_depths, up_depths, mid_depth = _transformer_depths(config, layers, problems)
        if problems:
            raise LayoutError("not a Stable Diffusion U-Net layout:\n  - " + "\n  - ".join(problems))
        down = tuple(
            StageLayout(
                "down",
                i,
                down_types[i],
                channels[i],
                DOWN_TYPES[down_types[i]],
                down_depths[i] if DOWN_TYPES[down_types[i]] else (0,) * layers[i],
                i < n - 1,
            )
            for i in range(n)
        )
        up = tuple(
            StageLayout(
                "up",
                i,
                up_types[i],
                channels[n - 1 - i],
                UP_TYPES[up_types[i]],
                up_depths[i] if UP_TYPES[up_types[i]] else (0,) * (layers[n - 1 - i] + 1),
                i < n - 1,
            )
            for i in range(n)
        )
        return cls(down=down, up=up, mid_type=mid_type, mid_depth=mid_depth if mid_type else 0)


def _per_stage(value: Any, n: int, key: str, problems: list[str]) -> list[int]:
    """Expands a scalar-or-list config entry to one int per stage."""
    if isinstance(value, int):
        return [value] * n
    values = list(value)
    if len(values) != n:
        problems.append(f"{key} has {len(values)} entries for {n} stages")
        return [int(values[0])] * n
    return [int(v) for v in values]


def _transformer_depths(
    config: Mapping[str, Any], layers: Sequence[int], problems: list[str]
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]:
    """Per-layer transformer depths of the down stages, the up stages and the mid block.

    Mirrors how diffusers reads ``transformer_layers_per_block``: an int for all stages, one entry per
    stage (an int, or one int per layer), and ``reverse_transformer_layers_per_block`` for the up stages
    when the down entries are per-layer; the mid block takes the last down stage's (first) entry.
    """
    n = len(layers)
    tlpb = config.get("transformer_layers_per_block", 1)
    if isinstance(tlpb, int):
        tlpb = [tlpb] * n
    tlpb = list(tlpb)
    if len(tlpb) != n:
        problems.append(f"transformer_layers_per_block has {len(tlpb)} entries for {n} stages")
        return [], [], 0
    down: list[tuple[int, ...]] = []
    for i, entry in enumerate(tlpb):
        if isinstance(entry, int):
            down.append((entry,) * layers[i])
        elif len(entry) != layers[i]:
            problems.append(f"transformer_layers_per_block[{i}] has {len(entry)} entries for {layers[i]} layers")
            down.append((int(entry[0]),) * layers[i])
        else:
            down.append(tuple(int(d) for d in entry))
    reverse = config.get("reverse_transformer_layers_per_block")
    up: list[tuple[int, ...]] = []
    for i in range(n):
        num = layers[n - 1 - i] + 1
        entry = reverse[i] if reverse is not None else tlpb[n - 1 - i]
        if isinstance(entry, int):
            up.append((entry,) * num)
        elif len(entry) != num:
            problems.append(f"reverse_transformer_layers_per_block[{i}] has {len(entry)} entries for {num} layers")
            up.append((int(entry[0]),) * num)
        else:
            up.append(tuple(int(d) for d in entry))
    last = tlpb[-1]
    mid_depth = last if isinstance(last, int) else int(last[0])
    return down, up, mid_depth
