"""Pausing Python's cyclic garbage collector around bulk work that makes many objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """The collector off inside the block (if it was on), back on after.

    Every few hundred new objects that can hold references it scans the young ones, and
    with enough survivors all objects of the process; none of the objects a snapshot or
    a header parse makes is garbage, so those scans are pure cost there. Restarted only
    if it was running: a caller that turned it off keeps it off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
