"""The ``ARRAYCKPT_*`` environment variables: the one place that reads and validates them.

Each is read where it is used (not at import, so a bad value never breaks
``import arrayckpt``), and a bad value is an `InvalidInputError` naming the variable,
the value and the fix, never a bare ``ValueError`` from ``int()`` or ``float()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TypeVar

from .errors import InvalidInputError

T = TypeVar("T")


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or not value.strip() else value.strip()


def _bad(name: str, value: str, expected: str) -> InvalidInputError:
    return InvalidInputError(
        f"environment variable {name}={value!r} is not {expected}; set it to {expected} "
        f"or unset it for the default"
    )


def _read(
    name: str, default: T, parse: Callable[[str], T], valid: Callable[[T], bool], expected: str
) -> T:
    """``parse(os.environ[name])`` when set, else ``default``; `_bad` unless ``valid``."""
    value = _raw(name)
    if value is None:
        return default
    try:
        parsed = parse(value)
    except ValueError:
        raise _bad(name, value, expected) from None
    if not valid(parsed):
        raise _bad(name, value, expected)
    return parsed


def positive_int(name: str, default: int) -> int:
    """``int(os.environ[name])`` when set (it must be >= 1), else ``default``.

    Raises:
        InvalidInputError: the variable is set to anything but a positive integer.
    """
    return _read(name, default, int, lambda n: n >= 1, "a positive integer (e.g. 4)")


def positive_seconds(name: str, default: float) -> float:
    """``float(os.environ[name])`` when set (finite and > 0), else ``default``.

    Raises:
        InvalidInputError: the variable is set to anything but a positive number of seconds.
    """
    return _read(
        name,
        default,
        float,
        lambda s: math.isfinite(s) and s > 0,
        "a positive number of seconds (e.g. 600)",
    )


def int_between(name: str, default: int, low: int, high: int) -> int:
    """``int(os.environ[name])`` when set (it must lie in ``low..high``), else ``default``.

    Raises:
        InvalidInputError: the variable is set to anything but an integer in that range.
    """
    return _read(
        name,
        default,
        int,
        lambda n: low <= n <= high,
        f"an integer from {low} to {high} (e.g. {default})",
    )


_SWITCH = {"1": True, "true": True, "yes": True, "on": True}
_SWITCH.update({"0": False, "false": False, "no": False, "off": False})


def switch(name: str, default: bool) -> bool:
    """Whether ``os.environ[name]`` turns a behaviour on (``1``/``true``/``yes``/``on``)
    or off (``0``/``false``/``no``/``off``, any case) when set, else ``default``.

    Raises:
        InvalidInputError: the variable is set to anything else.
    """

    def parse(text: str) -> bool:
        try:
            return _SWITCH[text.lower()]
        except KeyError:
            raise ValueError(text) from None

    return _read(name, default, parse, lambda _: True, "1 or 0 (on or off)")
