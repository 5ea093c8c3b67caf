"""Typed recipe settings: a tree of dataclass sections mirrored by YAML, checked in full before any work starts.

A recipe declares its settings as a top-level dataclass whose fields are *sections*, each a dataclass of plain
fields (``bool``, ``int``, ``float``, ``str``, ``list[...]`` of those, each optionally ``| None``), and wraps it in
a :class:`Schema` with its choices, ranges, cross-field rules and legacy aliases. :func:`load_settings` reads a
YAML file, applies dotted ``section.key=value`` overrides (and already-typed values, e.g. from command-line
flags) and validates everything at once: unknown sections and keys (with a "did you mean"), wrong types, choices,
ranges and the recipe's cross-field rules all land in one :class:`ConfigError` that names each dotted key.
:func:`save_settings` writes the resolved settings in a form :func:`load_settings` reads back to an equal object.

Numbers: PyYAML follows YAML 1.1, which reads ``5e-5`` and ``1e-2`` (no decimal point) as *strings*; where a
float is expected, such numeric strings are converted. Ints are accepted where a float is expected; booleans are
never numbers, and floats are never accepted where a whole number is expected.

Aliases let a recipe keep old names working: ``{"adam_weight_decay": "optim.weight_decay"}`` accepts
``adam_weight_decay=0.01`` as an override, ``--adam-weight-decay`` as a typed value and ``adam_weight_decay:`` as
a top-level YAML key, all meaning ``optim.weight_decay``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from bksdm.artifacts import write_text

__all__ = [
    "ConfigError",
    "Range",
    "Schema",
    "load_settings",
    "save_settings",
    "settings_from_dict",
    "settings_to_dict",
    "suggest",
    "validate_settings",
]

Range = tuple[Callable[[Any], bool], str]
"""A range rule: a predicate on the converted value and what it says when it fails (``"must be >= 1"``)."""


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists every problem, each starting with its dotted key."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        super().__init__(f"invalid {source} ({n} problem{'s' if n != 1 else ''}):\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Schema:
    """What one recipe's settings are and which rules they obey.

    Attributes:
        root: The top-level dataclass; each of its fields is a section whose default factory is a dataclass.
        choices: Dotted key -> allowed values (for a list field, each item must be one of them).
        ranges: Dotted key -> :data:`Range` rule, checked after type conversion.
        cross_checks: ``f(settings, problems)`` appends problems involving more than one field.
        aliases: Old name (``adam_weight_decay``, or a flag ``--adam-weight-decay``) -> dotted key it stands for.
        choice_hints: ``(dotted key, rejected value)`` -> text added to that problem (``"; full precision is 'no'"``).
        header: The comment line(s) :func:`save_settings` writes above the YAML.
    """

    root: type
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    ranges: Mapping[str, Range] = field(default_factory=dict)
    cross_checks: Callable[[Any, list[str]], None] | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    choice_hints: Mapping[tuple[str, Any], str] = field(default_factory=dict)
    header: str = "# Resolved bksdm settings.\n"

    @property
    def sections(self) -> dict[str, type]:
        """Section name -> its dataclass, in declaration order."""
        return {f.name: f.default_factory for f in fields(self.root)}  # type: ignore[misc]

    def keys(self, section: str) -> list[str]:
        """The field names of ``section``."""
        return [f.name for f in fields(self.sections[section])]

    def alias(self, name: str) -> str | None:
        """The dotted key an old name or flag stands for (``--adam-weight-decay`` -> ``optim.weight_decay``)."""
        plain = name.strip().lstrip("-").replace("-", "_")
        return self.aliases.get(name.strip(), self.aliases.get(plain))


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_PLURAL = {
    "true or false": "booleans",
    "a whole number": "whole numbers",
    "a number": "numbers",
    "a non-empty string": "non-empty strings",
}


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML (strings quoted, so that ``'5'`` and ``5`` differ)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _convert(value: Any, tp: Any) -> tuple[Any, str | None]:
    """(converted value, None), or (None, what was expected) when ``value`` does not fit type ``tp``."""
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if tp is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else (None, "a whole number")
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-5 as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), None
        return None, "a number"
    if tp is str:
        return (value, None) if isinstance(value, str) and value.strip() else (None, "a non-empty string")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        expected = _PLURAL[_convert(object(), item)[1]]  # type: ignore[index]
        if not isinstance(value, (list, tuple)):
            return None, f"a list of {expected}"
        converted = [_convert(v, item) for v in value]
        if any(problem is not None for _, problem in converted):
            return None, f"a list of {expected}"
        return [v for v, _ in converted], None
    raise TypeError(f"settings field type {tp!r} is not supported")  # a bug in the schema, not in the config


def suggest(word: str, candidates: Sequence[str]) -> str:
    """``"; did you mean 'X'?"`` for the closest of ``candidates``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _unknown_key(schema: Schema, section: str, key: str) -> str:
    """The message for ``section.key`` not being a field, with the likeliest intended key."""
    names = schema.keys(section)
    hint = suggest(key, names)
    if not hint:
        elsewhere = [s for s in schema.sections if key in schema.keys(s)]
        hint = f"; did you mean '{elsewhere[0]}.{key}'?" if elsewhere else f"; known keys: {', '.join(names)}"
    return f"{section}.{key}: unknown key{hint}"


def _set(schema: Schema, data: dict[str, Any], dotted: str, value: Any, text: str | None, problems: list[str]) -> bool:
    """Puts ``value`` at ``dotted`` in ``data`` (in place) after checking the key; False (and a problem) if unknown.

    ``text`` is the value as written (an override): for a field that holds a string, text that YAML would read as
    another type (``model.revision=1234``) is kept as written.
    """
    section, _, key = dotted.partition(".")
    if not key:
        owners = [f"{s}.{dotted}" for s in schema.sections if dotted in schema.keys(s)]
        hint = f"; did you mean '{owners[0]}'?" if owners else ""
        problems.append(f"{dotted}: an override key must be SECTION.KEY{hint}")
        return False
    if section not in schema.sections:
        problems.append(f"{dotted}: unknown section '{section}'{suggest(section, list(schema.sections))}")
        return False
    if key not in schema.keys(section):
        problems.append(_unknown_key(schema, section, key))
        return False
    hint = typing.get_type_hints(schema.sections[section])[key]
    if text is not None and _optional(hint)[0] is str and value is not None and not isinstance(value, str):
        value = text
    if data.get(section) is None:  # section absent or empty in the file
        data[section] = {}
    if isinstance(data[section], dict):  # a malformed section is reported by _build
        data[section][key] = value
    return True


def _apply_overrides(
    schema: Schema, overrides: Sequence[str], values: Mapping[str, Any], data: dict[str, Any], problems: list[str]
) -> set[str]:
    """Applies ``section.key=value`` overrides, then typed ``values``, to ``data`` (in place); returns the keys set.

    Override values are parsed as YAML (``train.validation_prompts=["a","b"]``, ``train.resume=null``).
    """
    done: set[str] = set()
    for item in overrides:
        if "=" not in item:
            problems.append(f"{item}: an override must be KEY=VALUE, e.g. train.max_steps=10")
            continue
        dotted, text = (part.strip() for part in item.split("=", 1))
        dotted = schema.alias(dotted) or dotted
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if _set(schema, data, dotted, value, text, problems):
            done.add(dotted)
    for name, value in values.items():
        dotted = schema.alias(name) or name
        if _set(schema, data, dotted, value, None, problems):
            done.add(dotted)
    return done


def _build(schema: Schema, data: Any, overridden: set[str], problems: list[str]) -> Any:
    """Type-checks and converts every field of ``data``; problems go to ``problems``. Defaults fill gaps."""
    sections = schema.sections
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"<top>: a config must be a mapping of sections ({', '.join(sections)}), got {_show(data)}")
        return schema.root()
    for name in data:
        if name not in sections:
            problems.append(f"{name}: unknown section{suggest(str(name), list(sections))}")
    built: dict[str, Any] = {}
    for section, cls in sections.items():
        raw = data.get(section)
        if raw is None:  # absent, or an empty section
            raw = {}
        if not isinstance(raw, Mapping):
            problems.append(f"{section}: expected a mapping of keys, got {_show(raw)}")
            raw = {}
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in hints:
                problems.append(_unknown_key(schema, section, str(key)))
                continue
            dotted = f"{section}.{key}"
            converted = _check(schema, dotted, value, hints[key], dotted in overridden, problems)
            if converted is not _BAD:
                values[key] = converted
        built[section] = cls(**values)
    return schema.root(**built)


_BAD = object()


def _check(schema: Schema, dotted: str, value: Any, hint: Any, overridden: bool, problems: list[str]) -> Any:
    """``value`` converted to the field's type and checked against its choices and range, or ``_BAD``."""
    where = f"{dotted} (override)" if overridden else dotted
    tp, optional = _optional(hint)
    if value is None:
        if optional:
            return None
        expected = _convert(object(), tp)[1]  # a bare object() fits no type: gives the description
        problems.append(f"{where}: expected {expected}, got null")
        return _BAD
    converted, expected = _convert(value, tp)
    if expected is not None:
        problems.append(f"{where}: expected {expected}{' or null' if optional else ''}, got {_show(value)}")
        return _BAD
    choices = schema.choices.get(dotted)
    items = converted if isinstance(converted, list) else [converted]
    bad = [v for v in items if choices is not None and v not in choices]
    if bad:
        for v in bad:
            hint = schema.choice_hints.get((dotted, v)) or suggest(str(v), [str(c) for c in choices])
            problems.append(f"{where}: {_show(v)} is not one of {', '.join(map(str, choices))}{hint}")
        return _BAD
    rule = schema.ranges.get(dotted)
    if rule is not None and not rule[0](converted):
        problems.append(f"{where}: {rule[1]}, got {_show(value)}")
        return _BAD
    return converted


def _move_aliases(schema: Schema, data: dict[str, Any]) -> None:
    """Top-level YAML keys that are aliases (a flat file of old names) move into their sections (in place)."""
    for name in [n for n in data if isinstance(n, str) and n not in schema.sections and schema.alias(n)]:
        section, _, key = schema.alias(name).partition(".")  # type: ignore[union-attr]
        if data.get(section) is None:
            data[section] = {}
        if isinstance(data[section], dict):
            data[section].setdefault(key, data.pop(name))


def settings_from_dict(
    schema: Schema,
    data: Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
    source: str = "config",
) -> Any:
    """Builds and validates settings from their dict form (the parsed YAML), after applying overrides.

    Args:
        schema: The recipe's settings schema.
        data: Mapping of section name to a mapping of fields; missing sections and fields keep their defaults.
            Top-level keys that are aliases of the schema are moved into their sections.
        overrides: Dotted ``section.key=value`` strings (or ``alias=value``), applied on top of ``data`` (which is
            not modified); values are parsed as YAML.
        values: Already-typed values by dotted key or alias (e.g. parsed command-line flags), applied after
            ``overrides`` and checked the same way.
        source: What ``data`` came from, for the error message.

    Returns:
        An instance of ``schema.root``, validated.

    Raises:
        ConfigError: listing every problem found, each naming its dotted key.
    """
    problems: list[str] = []
    if data is None:  # an empty YAML file
        data = {}
    if isinstance(data, Mapping):
        data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        _move_aliases(schema, data)
        overridden = _apply_overrides(schema, overrides, values or {}, data, problems)
    else:
        overridden = _apply_overrides(schema, overrides, values or {}, {}, problems)  # still report bad overrides
    settings = _build(schema, data, overridden, problems)
    if schema.cross_checks is not None:
        schema.cross_checks(settings, problems)
    if problems:
        raise ConfigError(problems, source)
    return settings


def load_settings(
    schema: Schema,
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
) -> Any:
    """Reads a YAML file (or starts from the defaults when ``path`` is None) and applies overrides and values.

    Args:
        schema: The recipe's settings schema.
        path: A YAML file of sections; None for the defaults.
        overrides: Dotted ``section.key=value`` strings, e.g. ``train.max_steps=10``, ``optim.lr=1e-4``.
        values: Already-typed values by dotted key or alias (see :func:`settings_from_dict`).

    Returns:
        An instance of ``schema.root``, validated.

    Raises:
        ConfigError: the file is missing or not YAML, or the settings have problems (all listed together).
    """
    if path is None:
        return settings_from_dict(schema, {}, overrides, values=values)
    source = f"config {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError([f"<file>: cannot read {path}: {err.strerror or err}"], source) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"<file>: not valid YAML: {err}"], source) from None
    return settings_from_dict(schema, data, overrides, values=values, source=source)


def settings_to_dict(settings: Any) -> dict[str, dict[str, Any]]:
    """The dict form of settings: sections and fields in declaration order, lists copied."""
    if not is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"expected a settings dataclass, got {type(settings).__name__}")
    return asdict(settings)


def validate_settings(schema: Schema, settings: Any) -> Any:
    """Checks settings built in code by the same rules as a file; returns an equal, validated copy.

    Raises:
        ConfigError: listing every problem.
    """
    return settings_from_dict(schema, settings_to_dict(settings))


def save_settings(schema: Schema, settings: Any, path: str | os.PathLike) -> Path:
    """Writes ``settings`` as YAML (stable key order) that :func:`load_settings` reads back to an equal object.

    Written atomically (:func:`bksdm.artifacts.write_text`): a crash never leaves half a file.

    Returns:
        The path written.
    """
    path = Path(path)
    text = schema.header + yaml.safe_dump(
        settings_to_dict(settings), sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, text)
