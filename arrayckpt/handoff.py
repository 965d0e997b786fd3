"""Hand-offs between the thread that snapshots and the writer.

`CopyGates`: a snapshot's copies run in file order while the writer already writes the
tensors copied so far, so a save takes about max(copy, write) instead of their sum.

`Handoff`: the caller's arrays that a save within a staging budget writes in place.

A save with ``max_staging_bytes`` copies only the arrays written last (up to the budget)
into staging buffers; the others are written straight from the caller's memory, so the
caller must leave them alone until the writer has passed them. The writer reports each
one once its bytes are in the kernel (checksummed and written, not yet fsynced: from then
on the file holds them whatever the caller does), and `save` returns when all are.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future

from .errors import CheckpointWriteError


class Handoff:
    """Counts down the borrowed arrays of one save; `done` resolves when none is left.

    Examples:
        >>> h = Handoff(2)
        >>> first, second = h.callbacks()
        >>> first(); first(); h.done.done()  # each array counts once
        False
        >>> second(); h.done.done()
        True
    """

    def __init__(self, count: int) -> None:
        self._left = set(range(count))
        self._lock = threading.Lock()
        #: Resolves once the writer has written every borrowed array, or the write ended.
        self.done: Future[None] = Future()
        if not count:
            self.done.set_result(None)

    def callbacks(self) -> list[Callable[[], None]]:
        """One callback per borrowed array, for the writer to call once it is written."""
        return [functools.partial(self._written, i) for i in range(len(self._left))]

    def _written(self, index: int) -> None:
        with self._lock:
            self._left.discard(index)
            finished = not self._left and not self.done.done()
            if finished:
                self.done.set_result(None)

    def release_all(self) -> None:
        """The write ended (committed or failed): nothing reads the caller's arrays now."""
        with self._lock:
            self._left.clear()
            if not self.done.done():
                self.done.set_result(None)


class CopyGates:
    """One gate per group of tensors whose copies run after the write started; the writer
    waits at a tensor's gate (`HostTensor.ready`) before reading it.

    Examples:
        >>> gates = CopyGates(1)
        >>> wait = gates.waiter(0)
        >>> gates.open(0); wait()  # returns at once
        >>> failed = CopyGates(1); failed.fail(MemoryError("copy"))
        >>> try:
        ...     failed.waiter(0)()
        ... except Exception as exc:
        ...     print(type(exc).__name__)
        CheckpointWriteError
    """

    def __init__(self, count: int) -> None:
        self._opened = [threading.Event() for _ in range(count)]
        self._error: BaseException | None = None

    def waiter(self, gate: int) -> Callable[[], None]:
        return functools.partial(self._wait, gate)

    def _wait(self, gate: int) -> None:
        self._opened[gate].wait()
        if self._error is not None:
            raise CheckpointWriteError(
                f"the snapshot's copy failed before this tensor was copied: {self._error!r}"
            ) from self._error

    def open(self, gate: int) -> None:
        self._opened[gate].set()

    def fail(self, error: BaseException) -> None:
        """The copies stopped: every waiting writer raises instead of reading."""
        self._error = error
        for event in self._opened:
            event.set()
