"""Host memory for snapshots: `HostTensor` and the reusable staging pool arrays are copied into."""

from __future__ import annotations

import math
import mmap
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from . import direct, priority
from .dtypes import DType

#: Allocates ``nbytes`` of host memory as a flat uint8 array; ``pinned`` asks for
#: page-locked memory (for device-to-host copies).
Allocator = Callable[[int, bool], np.ndarray]


@dataclass(frozen=True)
class HostTensor:
    """One array's bytes in host memory: C-contiguous, little-endian, ready to write."""

    data: np.ndarray
    dtype: DType
    #: ``data``'s address when the snapshot already knows it (a view into a slab), which
    #: saves the writer an `__array_interface__` lookup per tensor.
    address: int | None = None
    #: Set for the caller's own arrays that a save within a staging budget writes in
    #: place: the writer calls it once the bytes are written (see `handoff.Handoff`).
    written: Callable[[], None] | None = None
    #: Set while the bytes are still being copied in (a write that starts before its
    #: snapshot's copies end): blocks until they are there (see `handoff.CopyGates`).
    ready: Callable[[], None] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def data_ptr(self) -> int:
        """The address of the first byte (what the writer streams from)."""
        if self.address is not None:
            return self.address
        return int(self.data.__array_interface__["data"][0])

    def bytes(self) -> memoryview:
        """The raw bytes, without a copy."""
        return self.data.reshape(-1).view(np.uint8).data


class StagingPool:
    """Host buffers reused from one snapshot to the next, keyed by size.

    Reuse matters: copying into warm pages runs at memcpy speed, while fresh allocations
    pay a page fault per 4 KiB. Buffers the previous snapshot used become free again at
    `begin`; the ones the new snapshot cannot reuse are dropped (at `begin` when it is told
    the sizes, else at `end`), so the pool holds one snapshot at most.

    Examples:
        >>> pool = StagingPool()
        >>> pool.begin([8]); a = pool.take(8); pool.end()
        >>> pool.begin([8]); b = pool.take(8); pool.end()
        >>> a.ctypes.data == b.ctypes.data  # the same warm buffer, reused
        True
    """

    def __init__(self, pinned_allocator: Callable[[int], np.ndarray] | None = None) -> None:
        self._free: dict[tuple[int, bool], list[np.ndarray]] = {}
        self._used: dict[tuple[int, bool], list[np.ndarray]] = {}
        self.pinned_allocator = pinned_allocator
        self._warming: threading.Thread | None = None

    def warm(self, buffers: Iterable[tuple[int, bool]]) -> None:
        """Allocate and fault in ``buffers`` (byte size, pinned) before a snapshot needs
        them, so the next `begin` of that snapshot reuses warm memory and a first save
        stalls like a later one. Buffers the pool holds already count."""
        self._join_warming()
        self._warm(list(buffers))

    def warm_in_background(self, buffers: Iterable[tuple[int, bool]]) -> Future[None]:
        """`warm` on a daemon thread; the next `begin`, `warm` or `release` waits for it.

        Returns:
            A future that resolves once the buffers are warm (or holds the allocation's
            error; the next snapshot then allocates what it lacks itself).
        """
        self._join_warming()
        done: Future[None] = Future()
        wanted = list(buffers)

        def run() -> None:
            try:
                self._warm(wanted)
            except BaseException as exc:  # e.g. MemoryError: reported through the future
                done.set_exception(exc)
            else:
                done.set_result(None)

        thread = threading.Thread(
            target=priority.background(run), daemon=True, name="arrayckpt-warm"
        )
        self._warming = thread
        thread.start()
        return done

    def _warm(self, buffers: list[tuple[int, bool]]) -> None:
        wanted = Counter(buffers)
        for key, bufs in self._used.items():
            wanted[key] -= len(bufs)
        for (nbytes, pinned), missing in wanted.items():
            for _ in range(missing):
                buf = self._allocate(nbytes, pinned)
                prefault(buf)
                # As if the previous snapshot had used it: `begin` hands it out again.
                self._used.setdefault((nbytes, pinned), []).append(buf)

    def _join_warming(self) -> None:
        thread, self._warming = self._warming, None
        if thread is not None:
            thread.join()

    def begin(self, sizes: Iterable[int] | None = None) -> None:
        """Start a snapshot: the previous one's buffers may be overwritten from now on.

        Args:
            sizes: the byte sizes the snapshot will `take`, when known; buffers of other
                sizes are dropped now, so the pool never holds two snapshots at once.
        """
        self._join_warming()
        self._free, self._used = self._used, {}
        for bufs in self._free.values():
            bufs.reverse()  # `take` pops from the end: each tensor gets back its own buffer
        if sizes is None:
            return
        wanted = Counter(sizes)
        for (nbytes, pinned), bufs in list(self._free.items()):
            keep = wanted[nbytes]
            wanted[nbytes] -= min(keep, len(bufs))
            del bufs[keep:]
            if not bufs:
                del self._free[(nbytes, pinned)]

    def end(self) -> None:
        """Finish a snapshot: drop the previous snapshot's buffers it did not reuse."""
        self._free = {}

    def take(self, nbytes: int, pinned: bool = False) -> np.ndarray:
        key = (nbytes, pinned)
        free = self._free.get(key)
        buf = free.pop() if free else self._allocate(nbytes, pinned)
        self._used.setdefault(key, []).append(buf)
        return buf

    def _allocate(self, nbytes: int, pinned: bool) -> np.ndarray:
        if pinned and self.pinned_allocator is not None:
            return self.pinned_allocator(nbytes)
        if nbytes >= _ALIGNED_MIN:
            # Page-aligned, so a direct write takes the bytes from here (`direct`).
            return direct.aligned_empty(nbytes)
        return np.empty(nbytes, np.uint8)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds."""
        return sum(b.nbytes for d in (self._free, self._used) for bs in d.values() for b in bs)

    def release(self) -> None:
        self._join_warming()
        self._free.clear()
        self._used.clear()


_PAGE = mmap.PAGESIZE
#: Staging buffers this large are page-aligned anonymous memory (`direct.aligned_empty`).
_ALIGNED_MIN = 1 << 20


def prefault(buf: np.ndarray) -> None:
    """Touch every page of ``buf`` so the first copy into it runs at memcpy speed."""
    buf[::_PAGE] = 0


def host_view(flat: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """View a flat uint8 buffer as an array of ``dtype`` and ``shape``."""
    return flat.view(dtype.numpy).reshape(shape)


def nbytes_of(dtype: DType, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize
