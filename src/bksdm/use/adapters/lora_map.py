"""A teacher's LoRA mapped onto a student through the plan's weight map. Pure: no files, no prints.

A LoRA is read by the pipeline class's own ``lora_state_dict`` (which converts kohya-style files with diffusers'
converters); :func:`split_parts` then puts each component's adapters (the denoiser's, each text encoder's) in peft's
key format with the ``LoraConfig`` that diffusers' loader would build for them, exactly as ``load_lora_weights``
does on the teacher. :func:`map_lora` moves each denoiser adapter to the student module whose weights came from its
teacher module (the inverse of the resolved plan's ``teacher_key``), drops the adapters of removed blocks and lists
them, and keeps the text-encoder parts as they are. The student's config names every adapted module and its rank and
alpha explicitly, so the student's adapters scale as the teacher's did: on every kept module the student's
delta W = B @ A * scale equals the teacher's on its source module.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from bksdm.plan.surgery import Resolved, Shape

__all__ = [
    "Dropped",
    "LoraError",
    "LoraMapping",
    "LoraPart",
    "check_part",
    "map_lora",
    "module_map",
    "split_parts",
]

UNMAPPABLE = ("layers_to_transform", "layers_pattern", "modules_to_save")
"""LoraConfig fields that address modules by something other than their names: such a LoRA is refused."""
_SUFFIX = re.compile(r"\.(lora_[A-Za-z_]+(?:\.[A-Za-z_]+)?)$")
"""The part of a peft key after its module name: ``lora_A.weight``, ``lora_B.bias``, ``lora_magnitude_vector``."""


class LoraError(ValueError):
    """The LoRA cannot be carried to this student (it is not a LoRA, or not one for this teacher)."""


@dataclass(frozen=True)
class LoraPart:
    """One component's adapters (a denoiser's or a text encoder's) as diffusers' loader sees them.

    Attributes:
        tensors: Peft-format keys without the component prefix (``<module>.lora_A.weight``) → tensor.
        config: The ``LoraConfig`` as a dict (``r``, ``lora_alpha``, ``target_modules``, patterns, ...).
    """

    tensors: dict[str, Tensor]
    config: dict[str, Any]

    def modules(self) -> dict[str, dict[str, Tensor]]:
        """Adapted module name → its tensors by suffix (``lora_A.weight``, ``lora_B.weight``, ...)."""
        modules: dict[str, dict[str, Tensor]] = {}
        for key, tensor in self.tensors.items():
            match = _SUFFIX.search(key)
            if match is None:
                raise LoraError(f"{key}: not a LoRA tensor name (expected <module>.lora_A.weight, .lora_B.weight)")
            modules.setdefault(key[: match.start()], {})[match.group(1)] = tensor
        return modules

    def params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


@dataclass(frozen=True)
class Dropped:
    """A teacher adapter on a module the student does not have.

    Attributes:
        module: The teacher module's address.
        block: The removed block it belongs to (``up_blocks.1.attentions.1``, ``mid_block``), per the plan.
        params: Its adapter's parameters.
    """

    module: str
    block: str
    params: int


@dataclass(frozen=True)
class LoraMapping:
    """The student's LoRA and what was left behind.

    Attributes:
        parts: Component → the student's adapters (the denoiser's moved, the text encoders' as they were). A component
            all of whose adapters were dropped is absent.
        moved: Teacher module → student module, for every kept denoiser adapter (equal names included).
        dropped: The adapters of removed blocks, in the LoRA's order.
        total_params: Parameters of the whole teacher LoRA (every component).
    """

    parts: dict[str, LoraPart]
    moved: dict[str, str]
    dropped: tuple[Dropped, ...]
    total_params: int

    @property
    def dropped_params(self) -> int:
        return sum(d.params for d in self.dropped)

    @property
    def dropped_share(self) -> float:
        """Share of the teacher LoRA's parameters that the student does not get."""
        return self.dropped_params / self.total_params if self.total_params else 0.0


# ---- reading ------------------------------------------------------------------------------------------------


def split_parts(
    state_dict: Mapping[str, Tensor],
    network_alphas: Mapping[str, float] | None,
    metadata: Mapping[str, Any] | None,
    components: tuple[str, ...],
    denoiser: str,
) -> dict[str, LoraPart]:
    """Each component's adapters in peft's keys with the ``LoraConfig`` diffusers' loader builds for them.

    The denoiser's keys are converted as ``load_lora_adapter`` converts them (``convert_unet_state_dict_to_peft``),
    a text encoder's as ``_load_lora_into_text_encoder`` does; the config is the file's metadata when it has some,
    else diffusers' ``get_peft_kwargs`` from the ranks and the network alphas (kohya files).

    Args:
        state_dict: What the pipeline class's ``lora_state_dict`` returned (keys prefixed by their component).
        network_alphas: Its network alphas (kohya files), keys prefixed likewise; None or empty when there are none.
        metadata: The file's LoRA metadata (``unet.r``, ``unet.lora_alpha``, ...), or None.
        components: The components the pipeline loads LoRAs into (its ``_lora_loadable_modules``).
        denoiser: Which of them is the denoiser (``unet`` or ``transformer``).

    Raises:
        LoraError: Not a LoRA (no tensors, names without ``lora``), tensors of a component the pipeline lacks, or a
            config that addresses modules by layer index (which no plan can map).
    """
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import get_peft_kwargs

    if not state_dict:
        raise LoraError("the file holds no tensors")
    foreign = sorted(k for k in state_dict if "lora" not in k)
    if foreign:
        raise LoraError(f"{len(foreign)} tensor(s) are not LoRA weights (no 'lora' in the name), e.g. {foreign[0]}")
    stray = sorted({k.split(".", 1)[0] for k in state_dict} - set(components))
    if stray:
        raise LoraError(
            f"tensors for {', '.join(stray)}, which this pipeline does not load LoRAs into ({', '.join(components)})"
        )
    parts: dict[str, LoraPart] = {}
    for component in components:
        tensors = {k[len(component) + 1 :]: v for k, v in state_dict.items() if k.startswith(component + ".")}
        if not tensors:
            continue
        if component == denoiser:
            if not all(".lora_A." in k or ".lora_B." in k or "lora_magnitude" in k for k in tensors):
                tensors = convert_unet_state_dict_to_peft(tensors)
        else:
            try:
                tensors = convert_state_dict_to_peft(convert_state_dict_to_diffusers(tensors))
            except ValueError as err:  # diffusers names no format it knows: its loader would fail the same way
                raise LoraError(
                    f"the {component} part's tensor names are in no format diffusers reads ({err})"
                ) from None
        own = {k[len(component) + 1 :] for k in metadata or {} if k.startswith(component + ".")}
        if own:
            config = {key: metadata[f"{component}.{key}"] for key in own}
        else:
            ranks = {f"^{k}": v.shape[1] for k, v in tensors.items() if "lora_B" in k and v.ndim > 1}
            if not ranks:
                raise LoraError(f"the {component} part has no lora_B (up) matrix: not a LoRA diffusers reads")
            alphas = {k.split(".", 1)[1]: v for k, v in (network_alphas or {}).items() if k.split(".")[0] == component}
            config = get_peft_kwargs(ranks, alphas or None, tensors, is_unet=component == denoiser)
        bad = [f for f in UNMAPPABLE if config.get(f)]
        if bad:
            raise LoraError(f"the {component} adapter's config sets {', '.join(bad)}, which bksdm cannot map")
        parts[component] = LoraPart(tensors, dict(config))
    return parts


def rank_and_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha peft gives ``module`` under ``config`` (its ``rank_pattern`` / ``alpha_pattern`` first)."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = get_pattern_key(ranks.keys(), module), get_pattern_key(alphas.keys(), module)
    return int(ranks.get(r_key, config["r"])), float(alphas.get(a_key, config["lora_alpha"]))


# ---- checking and mapping -----------------------------------------------------------------------------------


def check_part(part: LoraPart, weights: Mapping[str, Shape], what: str) -> list[str]:
    """Problems of an adapter against the model it is for: modules it lacks, shapes that do not fit.

    Args:
        part: The adapters.
        weights: Module address → shape of its ``weight`` (Linear (out, in), Conv2d (out, in, kh, kw)).
        what: The model, for the messages (``the teacher's unet``).
    """
    problems = []
    for module, tensors in part.modules().items():
        shape = weights.get(module)
        if shape is None:
            problems.append(f"{module}: {what} has no such module")
            continue
        a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if a is None or b is None:
            problems.append(f"{module}: lora_A or lora_B is missing")
        elif a.shape[1:2] != shape[1:2] or b.shape[0] != shape[0] or a.shape[2:] != shape[2:]:
            problems.append(
                f"{module}: A {list(a.shape)} and B {list(b.shape)} do not fit its weight {list(shape)} in {what}"
            )
    return problems


def module_map(resolved: Resolved, student_weights: Mapping[str, Shape]) -> dict[str, str]:
    """Teacher module → student module whose ``weight`` was copied from it (the inverse of ``teacher_key``)."""
    pairs = {}
    for key in student_weights:
        source = resolved.teacher_key(key + ".weight")
        pairs[source.removesuffix(".weight")] = key
    return pairs


def removed_block(removed: list[str], module: str) -> str:
    """The removed block that holds a teacher module: the longest of ``removed`` (the plan's block fates with no
    student address) that is a prefix of it."""
    owners = [address for address in removed if module.startswith(address + ".")]
    return max(owners, key=len) if owners else module


def map_lora(
    parts: Mapping[str, LoraPart],
    denoiser: str,
    resolved: Resolved,
    teacher_weights: Mapping[str, Shape],
    student_weights: Mapping[str, Shape],
) -> LoraMapping:
    """Moves the denoiser's adapters to the student's addresses and drops those of removed blocks.

    Args:
        parts: The teacher LoRA by component (:func:`split_parts`).
        denoiser: The denoiser's component name.
        resolved: The plan resolved against the teacher's denoiser config.
        teacher_weights: Teacher denoiser module → its weight's shape (every module with a ``weight``).
        student_weights: The same for the student, which must be the plan's student of that teacher.

    Raises:
        LoraError: The LoRA is not for this teacher (modules it lacks, shapes that differ), every problem listed.
    """
    total = sum(p.params() for p in parts.values())
    out = {name: part for name, part in parts.items() if name != denoiser}
    if denoiser not in parts:
        return LoraMapping(out, {}, (), total)
    part = parts[denoiser]
    problems = check_part(part, teacher_weights, f"the teacher's {denoiser}")
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise LoraError(
            f"this LoRA is not for the student's teacher ({len(problems)} problems):\n  - "
            + "\n  - ".join(problems[:8])
            + more
        )
    pairs = module_map(resolved, student_weights)
    removed = [address for address, to in resolved.block_fates() if to is None]
    tensors, moved, ranks, dropped = {}, {}, {}, []
    for module, suffixes in part.modules().items():
        target = pairs.get(module)
        if target is None:
            params = sum(t.numel() for t in suffixes.values())
            dropped.append(Dropped(module, removed_block(removed, module), params))
            continue
        moved[module] = target
        ranks[target] = rank_and_alpha(part.config, module)
        tensors.update({f"{target}.{suffix}": t for suffix, t in suffixes.items()})
    if tensors:
        out[denoiser] = LoraPart(tensors, student_config(part.config, ranks))
    return LoraMapping(out, moved, tuple(dropped), total)


def student_config(config: Mapping[str, Any], ranks: Mapping[str, tuple[int, float]]) -> dict[str, Any]:
    """The teacher adapter's config for the student: every adapted module named, each with its own rank and alpha.

    The most common rank and alpha become ``r`` and ``lora_alpha``; any other module's go in ``rank_pattern`` /
    ``alpha_pattern`` under its escaped full name (peft matches patterns as ``(.*\\.)?(pattern)$``).
    """
    r = Counter(rank for rank, _ in ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranks.values()).most_common(1)[0][0]
    return {
        **config,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(m): rank for m, (rank, _) in ranks.items() if rank != r},
        "alpha_pattern": {re.escape(m): a for m, (_, a) in ranks.items() if a != alpha},
        "target_modules": sorted(ranks),
        "exclude_modules": None,
    }
