"""Listing a teacher's removable units and the ablation that measures each (see :mod:`bksdm.plan.units`).

:func:`unit_space` reads the teacher's layout from its config, proposes the smallest plans the layout's rules allow
(one per transformer block; one per (down layer, up layer) pair of a U-Net stage; the mid block; the innermost stage;
SDXL's attention blocks, the mid block's tied to the last down stage's first attention), keeps those ``prune`` would
accept (checked on the meta device: resolved, every student tensor filled from a teacher tensor of the same shape)
and counts each unit's parameters and MACs. Pure: nothing is loaded or written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bksdm.families import family_of
from bksdm.plan.spec import Plan
from bksdm.plan.surgery import Shape, shapes_of
from bksdm.plan.unet_layout import StageLayout, UNetLayout
from bksdm.plan.units import (
    ATTENTION_BLOCK,
    BLOCK,
    DOWN_LAYER,
    MID,
    STAGE,
    UP_LAYER,
    Ablation,
    Site,
    Unit,
    UnitSpace,
)


def all_but(n: int, *skip: int) -> tuple[int, ...]:
    """Indices 0..n-1 without ``skip``."""
    return tuple(i for i in range(n) if i not in skip)


def unit_space(config: Mapping[str, Any], resolution: int, vae_scale: int) -> UnitSpace:
    """Every removable unit of a teacher, each with the valid ablations that measure it.

    Args:
        config: The teacher denoiser's config (``_class_name`` tells the family).
        resolution: Image side (px) MACs are counted at (the teacher's native one).
        vae_scale: Pixels per latent side (the pipeline's ``vae_scale_factor``).

    Raises:
        UnknownFamilyError: A denoiser of no family bksdm knows.
    """
    family = family_of(config)
    config = dict(config)
    with torch.device("meta"):
        teacher = family.build(config)
    shapes = shapes_of(teacher)
    macs = family.step_macs(config, resolution, vae_scale, group_depth=6)
    total_params = sum(_numel(s) for s in shapes.values())
    space = UnitSpace(family.name, config, (), (), total_params, macs.conv_linear, resolution, vae_scale, shapes)
    units, ablations = (_unet_units if family.name == "unet" else _stack_units)(space)

    def measure(unit: Unit) -> Unit:
        prefixes = tuple(m + "." for m in unit.modules)
        params = sum(_numel(s) for key, s in shapes.items() if key.startswith(prefixes))
        count = sum(v for key, v in macs.per_module.items() if key in unit.modules or key.startswith(prefixes))
        return Unit(unit.address, unit.kind, unit.stage, unit.modules, unit.contains, params, count, unit.site)

    return UnitSpace(
        family.name, config, tuple(measure(u) for u in units), tuple(ablations), total_params, macs.conv_linear,
        resolution, vae_scale, shapes,
    )  # fmt: skip


def _stack_units(space: UnitSpace) -> tuple[list[Unit], list[Ablation]]:
    family = family_of(space.config)
    units, ablations = [], []
    for spec in family.stacks:
        depth = int(space.config.get(spec.count_key, 0) or 0)
        for i in range(depth):
            plan = Plan(f"without {spec.address}.{i}", blocks=((spec.address, all_but(depth, i)),))
            if depth < 2 or space.problems(plan):
                continue  # the family keeps this block (SD3's last), or the stack has only it
            address = f"{spec.address}.{i}"
            image = dict(family.streams(spec.address, i, space.config))["image"]
            units.append(Unit(address, BLOCK, spec.address, (address,), site=Site(address, address, image)))
            ablations.append(Ablation((address,), plan))
    return units, ablations


def _layer(stage: StageLayout, j: int) -> str:
    return f"{stage.address}.layers.{j}"


def _unet_units(space: UnitSpace) -> tuple[list[Unit], list[Ablation]]:
    layout = UNetLayout.from_config(space.config)
    n = layout.num_stages
    units: dict[str, Unit] = {}
    ablations: list[Ablation] = []
    blocks_of: dict[str, list[str]] = {}  # attention address -> its block units
    tied = _tied_attention(layout)

    def block_units(attention: str, depth: int, stage: str) -> list[str]:
        if depth < 2:
            return []
        names = [f"{attention}.transformer_blocks.{b}" for b in range(depth)]
        for name in names:
            units[name] = Unit(name, ATTENTION_BLOCK, stage, (name,), site=Site(name, name))
        blocks_of[attention] = names
        return names

    for i in range(n):
        down, up = layout.down[i], layout.up[n - 1 - i]
        pair = f"{down.address}+{up.address}"
        for j in range(down.num_layers):
            for k in range(up.num_layers):
                plan = Plan(
                    f"without {_layer(down, j)} and {_layer(up, k)}",
                    layers=((down.address, all_but(down.num_layers, j)), (up.address, all_but(up.num_layers, k))),
                )
                if down.num_layers > 1 and not space.problems(plan):
                    ablations.append(Ablation((_layer(down, j), _layer(up, k)), plan, tie=pair))
        used = {u for a in ablations if a.tie == pair for u in a.units}
        for stage in (down, up):
            for j in range(stage.num_layers):
                attention = f"{stage.address}.attentions.{j}"
                inner = block_units(attention, stage.depths[j], stage.address) if stage.has_attention else []
                if _layer(stage, j) not in used:
                    continue
                modules = (f"{stage.address}.resnets.{j}",) + ((attention,) if stage.has_attention else ())
                kind = DOWN_LAYER if stage.kind == "down" else UP_LAYER
                units[_layer(stage, j)] = Unit(
                    _layer(stage, j), kind, stage.address, modules, tuple(inner), site=_layer_site(layout, stage, j)
                )
        for attention, names in blocks_of.items():
            if attention.startswith((down.address + ".", up.address + ".")) and attention != tied:
                depth = len(names)
                for b, name in enumerate(names):
                    plan = Plan(f"without {name}", transformer_blocks=((attention, all_but(depth, b)),))
                    ablations.append(Ablation((name,), plan))
    if layout.mid_type:
        mid_blocks = block_units("mid_block.attentions.0", layout.mid_depth, "mid_block")
        units["mid_block"] = Unit(
            "mid_block", MID, "mid_block", ("mid_block",), tuple(mid_blocks), site=Site("mid_block", "mid_block")
        )
        plan = Plan("without mid_block", mid_block="drop")
        if not space.problems(plan):
            ablations.append(Ablation(("mid_block",), plan))
        else:
            del units["mid_block"]
        ablations += _mid_block_ablations(layout, tied, mid_blocks)
    if n > 1:
        stage = _innermost_unit(space, layout, units)
        if stage is not None:
            units[stage[0].address] = stage[0]
            ablations.append(stage[1])
    order = {name: i for i, name in enumerate(_model_order(layout, units))}
    return sorted(units.values(), key=lambda u: order[u.address]), ablations


def _tied_attention(layout: UNetLayout) -> str | None:
    """The attention whose depth diffusers gives the mid block (the last down stage's first), when both have blocks."""
    last = layout.down[-1]
    if layout.mid_type and last.has_attention and layout.mid_depth > 1:
        return f"{last.address}.attentions.0"
    return None


def _mid_block_ablations(layout: UNetLayout, tied: str | None, mid_blocks: list[str]) -> list[Ablation]:
    depth = layout.mid_depth
    out = []
    if tied is None:
        for b, name in enumerate(mid_blocks):
            plan = Plan(f"without {name}", transformer_blocks=(("mid_block.attentions.0", all_but(depth, b)),))
            out.append(Ablation((name,), plan))
        return out
    # A spanning set of the (mid block, tied block) pairs: (b, 0) for every b and (0, b) for b >= 1.
    pairs = [(b, 0) for b in range(depth)] + [(0, b) for b in range(1, depth)]
    for m, a in pairs:
        names = (mid_blocks[m], f"{tied}.transformer_blocks.{a}")
        plan = Plan(
            f"without {names[0]} and {names[1]}",
            transformer_blocks=((tied, all_but(depth, a)), ("mid_block.attentions.0", all_but(depth, m))),
        )
        out.append(Ablation(names, plan, tie=f"mid_block.attentions.0+{tied}"))
    return out


def _innermost_unit(space: UnitSpace, layout: UNetLayout, units: dict[str, Unit]) -> tuple[Unit, Ablation] | None:
    """The innermost stage as a unit: dropped alone where that is valid, else with the mid block; None if neither."""
    down, up = layout.down[-1], layout.up[0]
    address = f"{down.address}+{up.address}"
    inside = [u for u in units if u.startswith((down.address + ".", up.address + "."))]
    modules = (down.address, up.address, f"{layout.down[-2].address}.downsamplers.0")
    for plan, with_mid in (
        (Plan(f"without {address}", drop_innermost_stages=1), False),
        (Plan(f"without {address} and mid_block", drop_innermost_stages=1, mid_block="drop"), True),
    ):
        if with_mid and not layout.mid_type:
            break
        if not space.problems(plan):
            extra = ("mid_block",) if with_mid else ()
            if with_mid:
                inside += [u for u in units if u == "mid_block" or u.startswith("mid_block.")]
            unit = Unit(address, STAGE, address, modules + extra, tuple(inside))
            return unit, Ablation((address,), plan)
    return None


def _layer_site(layout: UNetLayout, stage: StageLayout, j: int) -> Site | None:
    """A down layer's input (its resnet's) and output (its attention's, else its resnet's), where both have the same
    channels. Up layers have none: their resnet's input is the hidden state concatenated with a skip connection, so
    input and output differ in shape (and the hidden part alone measured ~1 everywhere on the shapes teacher)."""
    if stage.kind == "up":
        return None
    before = layout.down[stage.index - 1].channels if stage.index > 0 else layout.down[0].channels
    if (before if j == 0 else stage.channels) != stage.channels:
        return None
    last = f"{stage.address}.attentions.{j}" if stage.has_attention else f"{stage.address}.resnets.{j}"
    return Site(f"{stage.address}.resnets.{j}", last)


def _model_order(layout: UNetLayout, units: Mapping[str, Unit]) -> list[str]:
    """Unit addresses in the order the teacher runs them (down stages, mid block, up stages; each layer followed by
    its transformer blocks), then the innermost stage."""
    order = []
    for stage in (*layout.down, "mid", *layout.up):
        prefix = "mid_block" if stage == "mid" else f"{stage.address}."
        mine = [a for a in units if a.startswith(prefix) and "+" not in a]
        order += sorted(mine, key=lambda a: [int(p) if p.isdigit() else -1 for p in a.split(".")[2:]])
    return order + [a for a in units if a not in order]


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
