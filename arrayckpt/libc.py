"""C library calls that Python's `os` module does not offer, loaded through ctypes."""

from __future__ import annotations

import ctypes
from typing import Any


def function(name: str, argtypes: list[Any]) -> Any:
    """The C library's ``name`` returning ``int`` (errno kept for `ctypes.get_errno`),
    or None where this platform's C library lacks it."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn
