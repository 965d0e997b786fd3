"""Host-to-host copies spread across threads: one core alone cannot saturate memory
bandwidth (measured on 2 cores: two threads copy 512 MiB 1.8x faster than one), and
NumPy releases the GIL while copying.

A snapshot collects its copies (`batched`) and runs them together, so each thread gets
one hand-off per snapshot however many tensors there are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from . import pool

#: Below this many bytes in total, copies run on the caller's thread (a hand-off costs more).
PARALLEL_MIN_BYTES = 1 << 20
#: Copies smaller than this stay on the caller's thread: tiny copies hold the GIL.
SMALL_COPY_BYTES = 256 << 10

Copy = tuple[np.ndarray, np.ndarray]
_local = threading.local()


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy the flat uint8 array ``src`` into ``dst`` (same size), in parallel when large.

    Inside `batched`, the copy is only recorded and runs when the block ends.

    Args:
        dst: a writable, C-contiguous uint8 array.
        src: a C-contiguous uint8 array of ``dst.size`` bytes; it must stay unchanged
            until the copy has run.

    Examples:
        >>> a, b = np.arange(10, dtype=np.uint8), np.empty(10, np.uint8)
        >>> copy_bytes(b, a); int(b[-1])
        9
    """
    jobs: list[Copy] | None = getattr(_local, "jobs", None)
    if jobs is not None:
        jobs.append((dst, src))
    else:
        run_copies([(dst, src)])


@contextmanager
def batched() -> Iterator[None]:
    """Defer this thread's `copy_bytes` calls inside the block and run them all at its end.

    If the block raises, the recorded copies are dropped. Nested blocks join the outer one.
    """
    if getattr(_local, "jobs", None) is not None:
        yield
        return
    jobs: list[Copy] = []
    _local.jobs = jobs
    try:
        yield
    finally:
        _local.jobs = None
    run_copies(jobs)


@contextmanager
def recorded() -> Iterator[list[Copy]]:
    """Record this thread's `copy_bytes` calls inside the block into the list it yields,
    and run none of them: the caller runs them (`run_copies`), possibly in pieces, e.g. a
    snapshot whose write starts on the first tensors while the later ones still copy."""
    outer = getattr(_local, "jobs", None)
    jobs: list[Copy] = []
    _local.jobs = jobs
    try:
        yield jobs
    finally:
        _local.jobs = outer


def run_copies(jobs: list[Copy]) -> None:
    """Run ``jobs``: large ones split evenly across the helper threads and this one."""
    workers = pool.threads()
    large = [job for job in jobs if job[0].nbytes >= SMALL_COPY_BYTES]
    large_bytes = sum(d.nbytes for d, _ in large)
    if workers == 1 or large_bytes < PARALLEL_MIN_BYTES:
        for d, s in jobs:
            np.copyto(d, s)
        return
    bins = _split(large, large_bytes, workers)
    helper = pool.executor()
    futures = [helper.submit(_copy_all, pieces) for pieces in bins[1:]]
    try:
        _copy_all(bins[0])
        _copy_all([job for job in jobs if job[0].nbytes < SMALL_COPY_BYTES])
    finally:
        for future in futures:
            future.result()


def _copy_all(pieces: list[Copy]) -> None:
    for d, s in pieces:
        np.copyto(d, s)


def _split(jobs: list[Copy], total: int, workers: int) -> list[list[Copy]]:
    """Cut ``jobs`` into ``workers`` runs of about equal bytes (splitting copies as needed)."""
    share = -(-total // workers)
    bins: list[list[Copy]] = [[]]
    room = share
    for d, s in jobs:
        at, n = 0, d.nbytes
        while at < n:
            if room == 0:
                bins.append([])
                room = share
            take = min(n - at, room)
            bins[-1].append((d[at : at + take], s[at : at + take]))
            at += take
            room -= take
    return bins
