"""The pieces of strict JSON parsing every arrayckpt file reader shares."""

from __future__ import annotations

from typing import Any


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
