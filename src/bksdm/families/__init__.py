"""Denoiser families: what bksdm knows about each kind of teacher (see :mod:`bksdm.families.base`).

:data:`FAMILIES` is the registry; a new family is one module with a :class:`~bksdm.families.base.Family` subclass
and one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from bksdm.families.base import Family
from bksdm.families.flux import FLUX
from bksdm.families.sd3 import SD3
from bksdm.families.unet import UNET

FAMILIES: dict[str, Family] = {f.name: f for f in (UNET, SD3, FLUX)}
"""Every family, by name; order matters only for configs without ``_class_name`` (first match wins)."""

DENOISERS = tuple(dict.fromkeys(f.denoiser for f in FAMILIES.values()))
"""Pipeline attributes that hold a denoiser: ``unet``, ``transformer``."""


class UnknownFamilyError(ValueError):
    """The denoiser is of no family bksdm knows."""


def family_of(denoiser: nn.Module | Mapping[str, Any]) -> Family:
    """The family of a denoiser module or config (``_class_name`` when present, else the config's keys).

    Raises:
        UnknownFamilyError: naming the class and the families bksdm handles.
    """
    if isinstance(denoiser, nn.Module):
        name = type(denoiser).__name__
        for family in FAMILIES.values():
            if name in family.class_names:
                return family
        config: Mapping[str, Any] = {"_class_name": name}
    else:
        config = denoiser
        for family in FAMILIES.values():
            if family.matches(config):
                return family
    known = ", ".join(n for f in FAMILIES.values() for n in f.class_names)
    raise UnknownFamilyError(f"bksdm does not know the denoiser {config.get('_class_name', '?')}; it handles {known}")


def denoiser_of(pipe) -> nn.Module:
    """A pipeline's denoiser: its ``unet`` or its ``transformer``."""
    for attr in DENOISERS:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise UnknownFamilyError(f"{type(pipe).__name__} has neither a unet nor a transformer")
