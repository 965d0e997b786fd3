"""The ``ARRAYCKPT_*`` environment variables: the one place that reads and validates them.

Each is read where it is used (not at import, so a bad value never breaks
``import arrayckpt``), and a bad value is an `InvalidInputError` naming the variable,
the value and the fix, never a bare ``ValueError`` from ``int()`` or ``float()``.
"""

from __future__ import annotations

import math
import os

from .errors import InvalidInputError


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or not value.strip() else value.strip()


def _bad(name: str, value: str, expected: str) -> InvalidInputError:
    return InvalidInputError(
        f"environment variable {name}={value!r} is not {expected}; set it to {expected} "
        f"or unset it for the default"
    )


def positive_int(name: str, default: int) -> int:
    """``int(os.environ[name])`` when set (it must be >= 1), else ``default``.

    Raises:
        InvalidInputError: the variable is set to anything but a positive integer.
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        parsed = int(value)
    except ValueError:
        parsed = 0
    if parsed < 1:
        raise _bad(name, value, "a positive integer (e.g. 4)")
    return parsed


def positive_seconds(name: str, default: float) -> float:
    """``float(os.environ[name])`` when set (finite and > 0), else ``default``.

    Raises:
        InvalidInputError: the variable is set to anything but a positive number of seconds.
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        parsed = float(value)
    except ValueError:
        parsed = math.nan
    if not math.isfinite(parsed) or parsed <= 0:
        raise _bad(name, value, "a positive number of seconds (e.g. 600)")
    return parsed


def int_between(name: str, default: int, low: int, high: int) -> int:
    """``int(os.environ[name])`` when set (it must lie in ``low..high``), else ``default``.

    Raises:
        InvalidInputError: the variable is set to anything but an integer in that range.
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        parsed = int(value)
    except ValueError:
        parsed = low - 1
    if not low <= parsed <= high:
        raise _bad(name, value, f"an integer from {low} to {high} (e.g. {default})")
    return parsed
