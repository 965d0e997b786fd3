"""Host memory for snapshots: `HostTensor` and the reusable staging pool arrays are copied into."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

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

    def begin(self, sizes: Iterable[int] | None = None) -> None:
        """Start a snapshot: the previous one's buffers may be overwritten from now on.

        Args:
            sizes: the byte sizes the snapshot will `take`, when known; buffers of other
                sizes are dropped now, so the pool never holds two snapshots at once.
        """
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
        return np.empty(nbytes, np.uint8)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds."""
        return sum(b.nbytes for d in (self._free, self._used) for bs in d.values() for b in bs)

    def release(self) -> None:
        self._free.clear()
        self._used.clear()


def fresh_allocator(nbytes: int, pinned: bool) -> np.ndarray:
    """An allocator with no reuse (for one-off saves)."""
    return np.empty(nbytes, np.uint8)


def host_view(flat: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """View a flat uint8 buffer as an array of ``dtype`` and ``shape``."""
    return flat.view(dtype.numpy).reshape(shape)


def nbytes_of(dtype: DType, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize
