"""JSON from files we did not write: one parser with the checks every reader needs.

:func:`loads` is :func:`json.loads` plus: duplicate keys refused (the last one would silently
win: ``"format_version": 99, "format_version": 1``), ``NaN`` / ``Infinity`` refused, and nesting
bounded — parsing is recursion-safe (Python's parser raises ``RecursionError`` on deep nesting;
it becomes a :class:`ValueError`, and the depth limit is checked without recursion afterwards).
Callers turn the :class:`ValueError` into their own typed one-line error.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "loads"]

#: Deepest nesting of arrays/objects accepted (our files nest 4 deep; diffusers configs 3).
MAX_JSON_DEPTH = 64


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(obj: Any) -> int:
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items = list(value.values())
        elif isinstance(value, list):
            items = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return deepest


def loads(text: str | bytes) -> Any:
    """Parse untrusted JSON text.

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), a duplicate key, ``NaN``/``Infinity``,
            or nesting deeper than :data:`MAX_JSON_DEPTH` — one line.
    """
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return obj
