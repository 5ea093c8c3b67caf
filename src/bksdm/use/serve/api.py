"""The JSON API of ``bksdm serve``: what a request may hold, and how a refusal is described.

Shared by the app (:mod:`bksdm.use.serve.app`, which validates a decoded ``POST /api/generate`` body) and the
HTTP layer (:mod:`bksdm.use.serve.server`, which decodes the body and answers a :class:`RequestError` with its
status and a JSON ``{"error": ...}``). Every malformed request is refused with a 4xx status and a message saying
what was wrong and how to fix it, never with a 500.
"""

from __future__ import annotations

import json
import math
import re
from http import HTTPStatus
from typing import Any

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "RequestError",
    "decode_json_body",
    "parse_generate_request",
    "stopping_error",
]

MAX_PROMPT_CHARS = 500
"""Longest prompt accepted. CLIP reads at most 77 tokens anyway; this only stops absurd request bodies."""

MAX_SEED = 2**32 - 1
"""Largest seed accepted (seeds are 32-bit, as everywhere in bksdm)."""

MAX_BODY_BYTES = 16 * 1024
"""Largest request body read; a prompt and a seed need a few hundred bytes."""

_MAX_INT_DIGITS = 20
"""Longer integers in a request body are not converted (a seed has at most 10 digits; Python refuses to convert
more than 4300 digits and would raise)."""


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status to answer and a message saying what to fix."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def stopping_error() -> RequestError:
    """The refusal of a request that arrives (or is still running) while the server stops: 503."""
    return RequestError("the server is stopping: the request was not answered", HTTPStatus.SERVICE_UNAVAILABLE)


def parse_generate_request(payload: Any) -> tuple[str, int]:
    """Validate the body of ``POST /api/generate``: ``{"prompt": str, "seed": int (optional, default 0)}``.

    Args:
        payload: The decoded JSON body.

    Returns:
        ``(prompt, seed)``, the prompt with surrounding white space removed.

    Raises:
        RequestError: the body is not an object, has unknown fields, an empty or too long prompt, or a seed
            that is not an integer in ``[0, MAX_SEED]``. The message names the field and the fix.
    """
    if not isinstance(payload, dict):
        raise RequestError('expected a JSON object like {"prompt": "a red circle", "seed": 0}')
    unknown = sorted(set(payload) - {"prompt", "seed"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are 'prompt' and 'seed'")
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"'prompt' must be a string (got {_json_type(prompt)}): type what to draw")
    surrogate = re.search("[\ud800-\udfff]", prompt)
    if surrogate:  # a lone half of a UTF-16 pair ("\ud800" in JSON): no text, and the tokenizer cannot take it
        raise RequestError(
            f"'prompt' holds an unpaired UTF-16 surrogate (\\u{ord(surrogate.group()):04x} at character "
            f"{surrogate.start() + 1}), which is not text: send the prompt as valid Unicode"
        )
    prompt = prompt.strip()
    if not prompt:
        raise RequestError("'prompt' is empty: type what to draw")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    seed = payload.get("seed", 0)
    # bool is an int subclass in Python; a JSON true is not a seed.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestError(f"'seed' must be an integer from 0 to {MAX_SEED} (got {_echo(seed)})")
    return prompt, seed


class _Unconverted:
    """A number of a request body kept as its text: too many digits for an int, too large for a float."""

    def __init__(self, text: str, kind: str) -> None:
        self.text = text
        self.kind = kind

    def __str__(self) -> str:
        if self.kind == "int":
            sign = "-" if self.text.startswith("-") else ""
            return f"a {sign}{len(self.text.lstrip('-'))}-digit integer"
        return f"{self.text[:20]}{'...' if len(self.text) > 20 else ''}, too large for a number"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return value.kind if isinstance(value, _Unconverted) else type(value).__name__


def _echo(value: Any, limit: int = 40) -> str:
    """A received value as JSON, shortened, for an error message."""
    if isinstance(value, _Unconverted):
        return str(value)
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_int(text: str) -> int | _Unconverted:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _Unconverted(text, "int")


def _parse_float(text: str) -> float | _Unconverted:
    value = float(text)
    return value if math.isfinite(value) else _Unconverted(text, "float")


def _refuse_constant(name: str) -> None:
    raise RequestError(f"request body is not valid JSON ({name} is not a JSON value)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:  # json.loads would keep the last silently: the user meant one of them
            raise RequestError(f"field {_echo(key)} is given twice: give each field once")
        result[key] = value
    return result


def decode_json_body(body: bytes) -> Any:
    """Decode a request body as strict JSON in UTF-8.

    Stricter than :func:`json.loads`: ``NaN`` and ``Infinity`` are refused (they are not JSON), a key given twice
    is refused (rather than silently keeping the last), and an integer of more than 20 digits or a number beyond
    a float's range (``1e400``) is kept as its text (Python refuses to convert more than 4300 digits and turns
    ``1e400`` into infinity; no such number is a valid value here).

    Raises:
        RequestError: not UTF-8, not JSON, nested too deeply to parse, a key given twice.
    """
    if not body:
        raise RequestError('request body is empty: send a JSON object like {"prompt": "a red circle", "seed": 0}')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(
            f"request body is not UTF-8 (byte 0x{body[err.start]:02x} at offset {err.start}): send JSON in UTF-8"
        ) from None
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as err:
        raise RequestError(f"request body is not valid JSON ({err})") from None
    except RecursionError:
        raise RequestError(
            'request body is nested too deeply to parse: send a flat JSON object like {"prompt": "a red circle"}'
        ) from None
