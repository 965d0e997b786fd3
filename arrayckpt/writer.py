"""The one process-wide writer thread that every checkpointer hands its writes to."""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from . import env, forking, priority
from .errors import InvalidInputError

log = logging.getLogger("arrayckpt")

T = TypeVar("T")

#: Seconds the interpreter waits at exit for pending writes (env ARRAYCKPT_EXIT_TIMEOUT).
DEFAULT_EXIT_TIMEOUT = 600.0
EXIT_TIMEOUT_VAR = "ARRAYCKPT_EXIT_TIMEOUT"


def exit_timeout() -> float:
    """Seconds to wait at exit for pending writes.

    Raises:
        InvalidInputError: ``ARRAYCKPT_EXIT_TIMEOUT`` is set to a bad value.
    """
    return env.positive_seconds(EXIT_TIMEOUT_VAR, DEFAULT_EXIT_TIMEOUT)


def _resolved() -> Future[None]:
    done: Future[None] = Future()
    done.set_result(None)
    return done


class WriteFuture(Future[T]):
    """A `Future` that remembers whether anyone looked at its outcome.

    A failure nobody looked at is printed on stderr at interpreter exit.
    """

    description: str = ""
    observed: bool = False
    #: Resolves once the snapshot is in host memory arrayckpt owns: from then on the
    #: caller may change its arrays. Done when `save` returns, except for saves made with
    #: ``background_staging=True``; holds the copy's error if the copy failed.
    staged: Future[None] = _resolved()

    def result(self, timeout: float | None = None) -> T:
        try:
            value = super().result(timeout)
        except BaseException as exc:
            # A timeout is not the outcome: only the write's own error counts as seen.
            if self.done() and not self.cancelled() and Future.exception(self, 0) is exc:
                self.observed = True
            raise
        self.observed = True
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        self.observed = True
        return error


class Writer:
    """A single daemon thread running write jobs in submission order, each at the
    priority `priority` gives a save's background threads (``ARRAYCKPT_WRITER_NICE``)."""

    def __init__(self) -> None:
        self._start_fresh()

    def _start_fresh(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[WriteFuture[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: set[WriteFuture[Any]] = set()
        self._failed: list[WriteFuture[Any]] = []

    def submit(self, fn: Callable[[], T], description: str) -> WriteFuture[T]:
        # Checked now, while the caller can still fix it: at exit a bad value could only be
        # reported, and the write it should have waited for would be lost.
        exit_timeout()
        # Read per write (and checked now, likewise): the thread lowers itself before each
        # job, so a value set after the thread started still applies.
        job = priority.background(fn)
        future: WriteFuture[T] = WriteFuture()
        future.description = description
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="arrayckpt-writer", daemon=True
                )
                self._thread.start()
            self._pending.add(future)
        self._jobs.put((future, job))
        return future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    log.debug("write failed: %s", future.description, exc_info=True)
                    future.set_exception(exc)
                    with self._lock:
                        self._failed.append(future)
            with self._lock:
                self._pending.discard(future)
            # Locals outlive the loop iteration: without this the last job (and the snapshot
            # its closure holds, 1x the state) stays referenced until the next write.
            del job, future, fn

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every pending write; False if some did not finish."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return True
            for future in pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    # Not result(): waiting here must not count as the user looking.
                    Future.exception(future, remaining)
                except TimeoutError:
                    return False

    def at_exit(self) -> None:
        try:
            timeout = exit_timeout()
        except InvalidInputError as exc:  # changed after the last save: still wait
            timeout = DEFAULT_EXIT_TIMEOUT
            print(f"arrayckpt: {exc}; waiting the default {timeout:.0f} s", file=sys.stderr)
        if not self.drain(timeout):
            with self._lock:
                names = ", ".join(sorted(f.description for f in self._pending))
            print(
                f"arrayckpt: gave up after {timeout:.0f} s waiting for pending checkpoint "
                f"writes at exit ({names}); they are incomplete and were never committed",
                file=sys.stderr,
            )
        with self._lock:
            unobserved = [f for f in self._failed if not f.observed]
        for future in unobserved:
            print(
                f"arrayckpt: checkpoint write failed and nobody waited for it: "
                f"{future.description}: {Future.exception(future, 0)!r}",
                file=sys.stderr,
            )


_writer = Writer()
atexit.register(_writer.at_exit)
# A forked child has no writer thread and must not wait at exit for its parent's writes
# (they would never finish there); it starts afresh.
forking.reset_in_child(_writer)


def submit(fn: Callable[[], T], description: str) -> WriteFuture[T]:
    """Queue ``fn`` on the shared writer thread; its result or error lands in the future."""
    return _writer.submit(fn, description)
