"""A few helper threads shared by the snapshot copies and the writer's side work
(checksums, a second file), which all release the GIL.

Not `concurrent.futures.ThreadPoolExecutor`: that one refuses work once the interpreter
starts exiting, and pending checkpoint writes still run then (see `writer`).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

#: Upper bound on helper threads; memory and disk bandwidth stop scaling well before cores.
MAX_THREADS = 8


_CPUS = os.cpu_count() or 1  # asked once: the call costs microseconds


def threads() -> int:
    """How many threads may work on one job at once (env ``ARRAYCKPT_THREADS`` overrides)."""
    env = os.environ.get("ARRAYCKPT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(MAX_THREADS, _CPUS))


class HelperPool:
    """Daemon threads running short jobs. Jobs must never wait on other jobs of the pool."""

    def __init__(self, size: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        for i in range(size):
            threading.Thread(target=self._run, name=f"arrayckpt-helper-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((future, lambda: fn(*args)))
        return future

    def _run(self) -> None:
        while True:
            future, job = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:
                    future.set_exception(exc)


_lock = threading.Lock()
_pool: HelperPool | None = None
_pool_pid = 0


def executor() -> HelperPool:
    """The shared pool, started on first use."""
    global _pool, _pool_pid
    with _lock:
        # A forked child inherits the pool object but not its threads: make a new one.
        if _pool is None or _pool_pid != os.getpid():
            _pool = HelperPool(threads())
            _pool_pid = os.getpid()
        return _pool


def in_new_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """Run ``fn`` on a thread of its own (for work that itself uses the pool)."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
