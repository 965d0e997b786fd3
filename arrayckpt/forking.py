"""What a child made by ``fork()`` resets: objects and module state whose threads it lacks.

``fork()`` copies only the forking thread. A write in flight runs on a writer thread the
child does not have, and a lock another thread held stays held forever in the child, so
anything that waits on either hangs (DataLoader workers fork). Each registered object's
``_start_fresh()`` and each registered function runs in the child right after the fork.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Protocol


class StartsFresh(Protocol):
    def _start_fresh(self) -> None: ...


_objects: weakref.WeakSet[StartsFresh] = weakref.WeakSet()  # weak: never keeps one alive
_functions: list[Callable[[], None]] = []


def reset_in_child(obj: StartsFresh) -> None:
    """Call ``obj._start_fresh()`` in every forked child while ``obj`` is alive."""
    _objects.add(obj)


def in_child(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` in every forked child (a decorator for module-level resets)."""
    _functions.append(fn)
    return fn


def _after_fork_in_child() -> None:
    for fn in _functions:
        fn()
    for obj in list(_objects):
        obj._start_fresh()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
