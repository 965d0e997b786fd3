"""The pieces of strict JSON parsing every arrayckpt file reader shares."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NoReturn


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses duplicate keys (Python's json keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def reject_constant(token: str) -> Any:
    """``parse_constant`` that refuses NaN and Infinity, which JSON does not allow."""
    raise ValueError(f"{token} is not a number JSON allows")


def is_uint(x: Any, bound: int) -> bool:
    """True for an int (not a bool) in ``[0, bound)``."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < bound


def load_object(text: str | bytes, fail: Callable[[str], NoReturn], **hooks: Any) -> dict[str, Any]:
    """Parse a JSON object strictly: UTF-8 only (as serde_json: no UTF-16/32, no BOM), no
    duplicate keys; every problem goes to ``fail`` (which raises), RecursionError included.

    ``hooks`` are extra `json.loads` arguments (``parse_int``, ``parse_constant``, ...).
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=unique_keys, **hooks)
    except RecursionError:
        fail("JSON is nested too deeply")
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"not valid JSON: {exc}")
    if not isinstance(doc, dict):
        fail(f"must hold a JSON object, not {type(doc).__name__}")
    return doc
