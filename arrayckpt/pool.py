"""A few helper threads shared by the snapshot copies and the writer's side work
(checksums, a second file), which all release the GIL.

Helpers run at the priority of the thread they work for (`priority`): a save's
background threads get helpers of their own, lowered like them, so the copies the caller
waits for never queue behind background work on a lowered thread.

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

from . import env, forking, priority

T = TypeVar("T")

#: Upper bound on helper threads; memory and disk bandwidth stop scaling well before cores.
MAX_THREADS = 8


_CPUS = os.cpu_count() or 1  # asked once: the call costs microseconds


def threads() -> int:
    """How many threads may work on one job at once (env ``ARRAYCKPT_THREADS`` overrides)."""
    return env.positive_int("ARRAYCKPT_THREADS", max(1, min(MAX_THREADS, _CPUS)))


def start(thread: threading.Thread) -> bool:
    """Start ``thread``; False where the interpreter refuses (Python 3.12 at exit)."""
    try:
        thread.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown"
        return False
    return True


def _run_into(future: Future[T], job: Callable[[], T]) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(job())
        except BaseException as exc:
            future.set_exception(exc)


class HelperPool:
    """Daemon threads running short jobs. Jobs must never wait on other jobs of the pool.

    Each job runs at the priority of the thread that submitted it. A pool made while the
    interpreter exits may get no threads (Python 3.12 refuses new ones then); its jobs run
    on the submitting thread instead, so writes still finish.
    """

    def __init__(self, size: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self.size = 0
        for i in range(size):
            thread = threading.Thread(target=self._run, name=f"arrayckpt-helper-{i}", daemon=True)
            if not start(thread):
                break
            self.size += 1

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        if self.size == 0:
            _run_into(future, lambda: fn(*args))
        else:
            # Lowered per job, like the submitting thread: the pool may have been started
            # by a background thread that ran at another ARRAYCKPT_WRITER_NICE.
            self._jobs.put((future, priority.like_this_thread(lambda: fn(*args))))
        return future

    def _run(self) -> None:
        while True:
            future, job = self._jobs.get()
            _run_into(future, job)
            # Else this idle thread keeps its last job's arguments (tensors) alive.
            del future, job


_lock = threading.Lock()
#: The shared pools by kind: True for the one serving a save's background threads.
_pools: dict[bool, HelperPool] = {}
_pools_pid = 0


def executor() -> HelperPool:
    """The shared pool for this thread's kind (a save's background thread or not),
    started on first use."""
    global _pools_pid
    kind = priority.in_background()
    with _lock:
        # A forked child inherits the pool objects but not their threads: make new ones.
        if _pools_pid != os.getpid():
            _pools.clear()
            _pools_pid = os.getpid()
        if kind not in _pools:
            _pools[kind] = HelperPool(threads())
        return _pools[kind]


@forking.in_child
def _after_fork_in_child() -> None:
    # fork copies only the forking thread: another one may have held the lock, and the
    # pools' threads are gone (`executor` would also notice the pid).
    global _lock
    _lock = threading.Lock()
    _pools.clear()
    _spares.clear()


class _Spare:
    """A thread that runs long jobs (one at a time) and is kept for the next one."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="arrayckpt-spare", daemon=True)

    def _run(self) -> None:
        while True:
            future, job = self.jobs.get()
            _run_into(future, job)
            del future, job  # else the idle thread keeps its last job's arguments alive
            # Listed by what the job left it: a job may have made it a background thread.
            kind = priority.in_background()
            with _lock:
                _spares.setdefault(kind, []).append(self)


#: Idle spare threads by kind (as `_pools`).
_spares: dict[bool, list[_Spare]] = {}


def on_spare_thread(fn: Callable[[], T], name: str) -> Future[T] | None:
    """Run ``fn`` on a thread of its own, at this thread's priority, for work that itself
    uses the pool or waits a long time (a second file's write, a direct write's I/O);
    None where no thread can start (at exit on Python 3.12), and ``fn`` has not run.

    The thread is an idle one from an earlier job where there is one, because a thread
    that ends can swallow a Ctrl-C: its `threading.Thread` object is dropped, a weak
    reference's callback runs (threading's registry of threads), and a SIGINT whose handler
    runs inside that callback is lost (CPython reports "Exception ignored" and goes on).
    Saves that started three threads each lost 24 of 200 Ctrl-Cs so.
    """
    future: Future[T] = Future()
    kind = priority.in_background()
    with _lock:  # a forked child starts with none (`_after_fork_in_child`)
        idle = _spares.get(kind)
        spare = idle.pop() if idle else None
    if spare is None:
        spare = _Spare()
        if not start(spare.thread):
            return None
    spare.thread.name = name
    spare.jobs.put((future, priority.like_this_thread(fn)))
    return future


def in_own_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """`on_spare_thread`, or where no thread can start, ``fn`` run here and now."""
    future = on_spare_thread(fn, name)
    if future is None:
        future = Future()
        _run_into(future, fn)  # at exit on Python 3.12: here, one after the other
    return future
