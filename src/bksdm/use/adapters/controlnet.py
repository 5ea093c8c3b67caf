"""A teacher's ControlNet pruned with a student's plan, and a ControlNet made from a student.

A ControlNet (Zhang et al., ICCV 2023) is a trainable copy of the U-Net's down path and mid block whose outputs
go through zero-initialised 1x1 convolutions into the U-Net: one residual per skip connection
(``controlnet_down_blocks.K``, added to the K-th tensor the U-Net's down path stores for its up path) and one for
the mid block (``controlnet_mid_block``, added to the sample the up path starts from). A student whose plan
removed down layers has fewer skip connections, so the teacher's ControlNet no longer fits it: diffusers' U-Net
``zip``s the residuals with its skips and the up path then fails on shapes (or, worse, adds the wrong residuals).

:func:`prune_controlnet` removes from the ControlNet exactly what the plan removed from the U-Net's down path, with
the same weight map (:meth:`bksdm.plan.resolved.ResolvedPlan.teacher_key`), and keeps the zero convolution of
each skip the student kept; the mid residual is kept whatever the student's mid block, because diffusers' U-Net
adds it where its mid block is, or would be (``UNet2DConditionModel.forward`` adds it after ``if self.mid_block
is not None``). :func:`controlnet_from_student` is ``ControlNetModel.from_unet`` for students, which that method
refuses when they have no mid block (``unknown mid_block_type : None``, BK-SDM issue #64).

Both return a stock ``ControlNetModel``. Pure: no files, no prints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from bksdm.plan.resolved import ResolvedPlan
from bksdm.plan.surgery import SurgeryError, WeightMap, shapes_of, weight_map
from bksdm.plan.unet_layout import UNetLayout

__all__ = [
    "MID_BLOCK_MODES",
    "CarriedControlNet",
    "ControlNetMismatchError",
    "check_controlnet_fits",
    "controlnet_from_student",
    "controlnet_skips",
    "pruned_controlnet_config",
    "prune_controlnet",
    "residual_shapes",
]

MID_BLOCK_MODES = ("keep", "resnet")
"""What a carried ControlNet computes its mid residual with when the student has no mid block: ``keep`` the
teacher ControlNet's mid block whole (its own weights, run on the pruned down path's output), or ``resnet``: only
its first ResNet (diffusers' ``UNetMidBlock2D`` with no extra layers, the smallest mid block a stock
``ControlNetModel`` can hold; it has no ``mid_block_type: None``)."""

FIT_KEYS = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "transformer_layers_per_block",
    "mid_block_type",
    "cross_attention_dim",
    "addition_embed_type",
)
"""What a ControlNet shares with the U-Net it was made for: the latents and text states it reads, the layout of
its down path (stages, layers, transformer depths, widths) and so the shapes of its residuals."""

STAGE_KEYS = ("down_block_types", "block_out_channels", "attention_head_dim", "num_attention_heads")
"""ControlNet config keys with one entry per down stage (a scalar applies to every stage)."""

_ZERO_CONV = re.compile(r"^controlnet_down_blocks\.(\d+)\.(.+)$")


class ControlNetMismatchError(ValueError):
    """The ControlNet and the student (or its teacher) do not fit, or a stock ``ControlNetModel`` cannot express
    the pruned ControlNet; the message says what differs and what to do."""


@dataclass(frozen=True)
class CarriedControlNet:
    """The result of :func:`prune_controlnet`.

    Attributes:
        controlnet: The pruned ControlNet, a stock ``ControlNetModel`` in eval mode.
        weights: The checked map, carried key -> teacher ControlNet key (``weights.unused``: the dropped tensors).
        skips: For each of the carried ControlNet's residuals, in order, the teacher module whose output it is added
            to (``conv_in``, ``down_blocks.1.attentions.0``, ``down_blocks.1.downsamplers.0``, ...).
        dropped_skips: The teacher's skip connections the student removed (their zero convolutions are dropped).
        mid_block: How the mid residual is computed: ``plan`` (the student keeps a mid block, pruned as the plan
            says), ``keep`` or ``resnet`` (see :data:`MID_BLOCK_MODES`).
        fresh: Carried tensors with no teacher source of that shape (a mid block whose width changed with the
            innermost stage), left at diffusers' initialisation; the mid residual's zero convolution is then zero.
    """

    controlnet: ControlNetModel
    weights: WeightMap
    skips: tuple[str, ...]
    dropped_skips: tuple[str, ...]
    mid_block: str
    fresh: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ configs


def _per_stage(value: Any, n: int) -> list:
    """A per-stage config value as a list of ``n`` entries (diffusers accepts a scalar for every stage)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _layers(config: Mapping[str, Any]) -> list[int]:
    return [int(v) for v in _per_stage(config.get("layers_per_block", 2), len(config["down_block_types"]))]


def _depths(config: Mapping[str, Any]) -> list[list[int]]:
    """``transformer_layers_per_block`` as one depth per layer of each stage."""
    raw = _per_stage(config.get("transformer_layers_per_block", 1), len(config["down_block_types"]))
    return [_per_stage(d, n) for d, n in zip(raw, _layers(config), strict=True)]


def _normalised(key: str, config: Mapping[str, Any]) -> Any:
    """A :data:`FIT_KEYS` value in one spelling, so that ``1`` and ``[1, 1, 1, 1]`` compare equal."""
    n = len(config.get("down_block_types") or [])
    if key == "layers_per_block":
        return _layers(config)
    if key == "transformer_layers_per_block":
        return _depths(config)
    if key == "mid_block_type":
        return config.get(key, "UNetMidBlock2DCrossAttn")
    value = config.get(key)
    return list(value) if isinstance(value, (list, tuple)) and n else value


def check_controlnet_fits(
    controlnet_config: Mapping[str, Any], unet_config: Mapping[str, Any], controlnet: str, teacher: str
) -> None:
    """Refuse a ControlNet made for another U-Net than the student's teacher.

    Raises:
        ControlNetMismatchError: listing every :data:`FIT_KEYS` value that differs.
    """
    if controlnet_config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ControlNetMismatchError(
            f"--controlnet {controlnet} is a {controlnet_config.get('_class_name')}, not a ControlNetModel "
            "(the ControlNet of an SD-v1/v2/SDXL U-Net)"
        )
    wrong = [
        f"{k} {_normalised(k, controlnet_config)} (teacher: {_normalised(k, unet_config)})"
        for k in FIT_KEYS
        if _normalised(k, controlnet_config) != _normalised(k, unet_config)
    ]
    if wrong:
        raise ControlNetMismatchError(
            f"--controlnet {controlnet} was not made for the student's teacher {teacher}: {'; '.join(wrong)}. "
            "Give a ControlNet trained on that teacher, not one already pruned for a student (or --teacher, the "
            "teacher the student was made from)"
        )


def residual_shapes(config: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """``(channels, downscale)`` of each down residual, then of the mid residual, of a U-Net or ControlNet config.

    The down residuals are what the down path stores for the up path: ``conv_in``'s output, each layer's output,
    each downsampler's (every stage but the last); the mid residual has the innermost stage's width and
    resolution, whether or not there is a mid block. A ControlNet fits a U-Net when the two lists are equal.
    """
    channels = [int(c) for c in config["block_out_channels"]]
    shapes = [(channels[0], 1)]
    for i, (width, layers) in enumerate(zip(channels, _layers(config), strict=True)):
        shapes += [(width, 2**i)] * layers
        if i < len(channels) - 1:
            shapes.append((width, 2 ** (i + 1)))
    shapes.append((channels[-1], 2 ** (len(channels) - 1)))
    return tuple(shapes)


def _skips(layout: UNetLayout, kept: Mapping[int, tuple[tuple[int, ...], bool]] | None = None) -> list[str]:
    """Teacher addresses of the skip connections, in the order the down path stores them; ``kept`` (stage index ->
    (kept layers, keeps its downsampler)) restricts them to a student's."""
    skips = ["conv_in"]
    for stage in layout.down:
        if kept is not None and stage.index not in kept:
            continue
        layers, sampler = kept[stage.index] if kept is not None else (range(stage.num_layers), stage.has_sampler)
        part = "attentions" if stage.has_attention else "resnets"
        skips += [f"{stage.address}.{part}.{j}" for j in layers]
        if sampler:
            skips.append(f"{stage.address}.downsamplers.0")
    return skips


def controlnet_skips(resolved: ResolvedPlan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The teacher's skip connections, and the student's (as the teacher addresses they come from), in order.

    Residual K of a ControlNet is added to skip K, so a carried ControlNet's zero convolution K is the teacher
    ControlNet's ``teacher.index(student[K])``.
    """
    kept = {s.teacher.index: (s.layers, s.sampler) for s in resolved.down}
    return tuple(_skips(resolved.layout)), tuple(_skips(resolved.layout, kept))


def pruned_controlnet_config(
    controlnet_config: Mapping[str, Any], resolved: ResolvedPlan, mid_block: str = "keep"
) -> dict[str, Any]:
    """The stock ``ControlNetModel`` config of the teacher's ControlNet pruned as ``resolved`` prunes the U-Net.

    Per-stage values keep the student's stages, ``layers_per_block`` and ``transformer_layers_per_block`` its kept
    layers and transformer blocks; the mid block follows the plan when the student keeps one, else ``mid_block``.

    Raises:
        ControlNetMismatchError: ``mid_block`` is unknown, the student keeps a different number of layers in
            different stages (a stock ``ControlNetModel`` has one ``layers_per_block``), or ``keep`` would need a mid
            depth the last stage's transformer depth cannot give (diffusers sizes the mid block from it).
    """
    if mid_block not in MID_BLOCK_MODES:
        raise ControlNetMismatchError(f"mid_block {mid_block!r}: use one of {', '.join(MID_BLOCK_MODES)}")
    config = {k: v for k, v in controlnet_config.items() if not k.startswith("_")}
    kept = [s.teacher.index for s in resolved.down]
    for key in STAGE_KEYS:
        if isinstance(config.get(key), (list, tuple)):
            config[key] = [config[key][i] for i in kept]
    if isinstance(config.get("only_cross_attention"), (list, tuple)):
        config["only_cross_attention"] = [config["only_cross_attention"][i] for i in kept]
    layers = sorted({len(s.layers) for s in resolved.down})
    if len(layers) > 1:
        per_stage = [len(s.layers) for s in resolved.down]
        raise ControlNetMismatchError(
            f"the student keeps {per_stage} layers in its down stages, but a stock ControlNetModel has one "
            "layers_per_block for every stage; carry a ControlNet to students whose stages keep as many layers each"
        )
    config["layers_per_block"] = layers[0]
    depths = [[len(b) if s.teacher.has_attention else 1 for b in s.blocks] for s in resolved.down]
    teacher_depths = _depths(controlnet_config)
    for i, stage in enumerate(resolved.down):  # stages without attention keep the entry the config had
        if not stage.teacher.has_attention:
            depths[i] = [teacher_depths[stage.teacher.index][0]] * len(stage.layers)
    if resolved.mid is not None:
        config["mid_block_type"] = resolved.layout.mid_type
        if not resolved.down[-1].teacher.has_attention:
            depths[-1] = [len(resolved.mid)] * len(depths[-1])
    elif mid_block == "keep":
        config["mid_block_type"] = controlnet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        want = resolved.layout.mid_depth
        if resolved.down[-1].teacher.has_attention and depths[-1][0] != want and want:
            raise ControlNetMismatchError(
                f"a stock ControlNetModel sizes its mid block from its last stage's transformer depth "
                f"({depths[-1][0]}), but the teacher ControlNet's mid block has {want} transformer blocks; "
                "use mid_block='resnet' (--controlnet-mid resnet)"
            )
        if want:
            depths[-1] = [want] * len(depths[-1])
    else:
        config["mid_block_type"] = "UNetMidBlock2D"
    flat = {d for stage in depths for d in stage}
    config["transformer_layers_per_block"] = flat.pop() if len(flat) == 1 else depths
    return config


# ------------------------------------------------------------------------------------------------ pruning


class _KeyMap:
    """Carried ControlNet key -> teacher ControlNet key: the plan's weight map for the down path and mid block
    (the addresses are the U-Net's), the skip map for the zero convolutions, the same key for the rest."""

    def __init__(self, resolved: ResolvedPlan, zero_convs: Sequence[int], mid_block: str) -> None:
        self.resolved, self.zero_convs, self.mid_block = resolved, zero_convs, mid_block

    def teacher_key(self, key: str) -> str:
        match = _ZERO_CONV.match(key)
        if match:
            return f"controlnet_down_blocks.{self.zero_convs[int(match.group(1))]}.{match.group(2)}"
        return self.resolved.teacher_key(key)  # mid_block.* keep their address when the plan drops the mid block


def prune_controlnet(
    teacher: ControlNetModel, resolved: ResolvedPlan, *, mid_block: str = "keep", seed: int = 0
) -> CarriedControlNet:
    """The teacher's ControlNet pruned with the student's resolved plan.

    Its down path keeps exactly the student's layers, each with the weights of the teacher ControlNet's layer the
    student's came from; its zero convolutions are those of the skips the student kept, in the student's order;
    its conditioning embedding, ``conv_in`` and time embedding are the teacher ControlNet's. So its residuals
    have the student's skip shapes (:func:`residual_shapes`), and with a plan that removes nothing it equals the
    teacher's ControlNet.

    Args:
        teacher: The teacher's ControlNet (its config must fit the teacher U-Net; see :func:`check_controlnet_fits`).
        resolved: The student's plan resolved against the teacher U-Net's config.
        mid_block: Mid residual without a student mid block: ``keep`` or ``resnet`` (:data:`MID_BLOCK_MODES`).
        seed: Seed of diffusers' initialisation of tensors that have no teacher source (see
            :attr:`CarriedControlNet.fresh`).

    Raises:
        ControlNetMismatchError: a stock ``ControlNetModel`` cannot express the pruned ControlNet.
        SurgeryError: a carried tensor other than the mid block's has no teacher source of its shape (a ControlNet
            whose layout is not the teacher U-Net's); every gap is listed.
    """
    config = pruned_controlnet_config(dict(teacher.config), resolved, mid_block)
    teacher_skips, student_skips = controlnet_skips(resolved)
    zero_convs = [teacher_skips.index(s) for s in student_skips]
    keys = _KeyMap(resolved, zero_convs, mid_block)
    teacher_state = teacher.state_dict()
    with torch.device("meta"):
        skeleton = ControlNetModel.from_config(config)
    weights = weight_map(keys, shapes_of(skeleton), {k: tuple(v.shape) for k, v in teacher_state.items()})  # type: ignore[arg-type]
    mid_only = all(s.startswith(("mid_block.", "controlnet_mid_block.")) for s, *_ in weights.mismatched)
    if weights.missing or weights.reused or not mid_only:
        raise SurgeryError(
            f"the ControlNet cannot be pruned with this plan ({len(weights.problems)} gaps):\n  - "
            + "\n  - ".join(weights.problems)
        )
    # A mid block whose width changed (the innermost stage removed, and the next one narrower) starts afresh.
    fresh = tuple(s for s, *_ in weights.mismatched)
    if fresh:
        fresh += tuple(k for k in shapes_of(skeleton) if k.startswith(("mid_block.", "controlnet_mid_block.")))
        fresh = tuple(dict.fromkeys(fresh))
    param = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        carried = ControlNetModel.from_config(config)  # its zero convolutions start at zero, as diffusers makes them
    carried.to(param.device)
    if carried.dtype != param.dtype:
        carried.to(dtype=param.dtype)
    copied = {s: teacher_state[t] for s, t in weights.sources.items() if s not in fresh}
    result = carried.load_state_dict(copied, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    dropped = tuple(s for s in teacher_skips if s not in student_skips)
    mode = "plan" if resolved.mid is not None else mid_block
    return CarriedControlNet(carried.eval(), weights, student_skips, dropped, mode, fresh)


# ------------------------------------------------------------------------------------------------ from a student

FROM_UNET_KEYS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
)
"""The U-Net config values ``ControlNetModel.from_unet`` passes on (diffusers 0.3x-0.4x)."""

_FROM_UNET_PARTS = ("conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.", "mid_block.")


def controlnet_from_student(
    unet: UNet2DConditionModel,
    *,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
    conditioning_channels: int = 3,
    load_weights_from_unet: bool = True,
) -> ControlNetModel:
    """``ControlNetModel.from_unet`` that also takes students without a mid block (BK-SDM-Small and -Tiny).

    The ControlNet mirrors the student's down path with its weights, as ``from_unet`` does. A student without a mid
    block gets the smallest stock one, ``UNetMidBlock2D`` (one ResNet, at diffusers' initialisation: the student has
    none to copy), whose residual starts at zero through its zero convolution like every other one.

    Args:
        unet: The student's U-Net.
        conditioning_embedding_out_channels: Widths of the control image's embedding; it downsamples the control
            image ``len - 1`` times, which must equal the VAE's downscaling (SD's (16, 32, 96, 256): 8x).
        conditioning_channels: Channels of the control image.
        load_weights_from_unet: Copy the student's ``conv_in``, embeddings, down path and mid block.

    Raises:
        ControlNetMismatchError: the student keeps different numbers of layers per stage (a stock
            ``ControlNetModel`` has one ``layers_per_block``).
    """
    config = dict(unet.config)
    if isinstance(config.get("layers_per_block"), (list, tuple)) and len(set(config["layers_per_block"])) > 1:
        raise ControlNetMismatchError(
            f"the student keeps {list(config['layers_per_block'])} layers in its down stages, but a stock "
            "ControlNetModel has one layers_per_block for every stage"
        )
    kwargs = {k: config[k] for k in FROM_UNET_KEYS if k in config}
    kwargs["layers_per_block"] = _layers(config)[0]
    kwargs["mid_block_type"] = config.get("mid_block_type") or "UNetMidBlock2D"
    controlnet = ControlNetModel(
        **kwargs,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        conditioning_channels=conditioning_channels,
    )
    if load_weights_from_unet:
        source = unet.state_dict()
        own = controlnet.state_dict()
        copied = {k: v for k, v in source.items() if k.startswith(_FROM_UNET_PARTS) and k in own}
        wrong = [k for k, v in copied.items() if tuple(v.shape) != tuple(own[k].shape)]
        missing = [k for k in own if k.startswith(_FROM_UNET_PARTS) and k not in copied]
        if config.get("mid_block_type") is None:
            missing = [k for k in missing if not k.startswith("mid_block.")]
        if wrong or missing:
            raise SurgeryError(f"the ControlNet does not mirror the student: shapes {wrong[:3]}, missing {missing[:3]}")
        controlnet.load_state_dict(copied, strict=False)
    controlnet.to(unet.device)
    return controlnet if controlnet.dtype == unet.dtype else controlnet.to(dtype=unet.dtype)
