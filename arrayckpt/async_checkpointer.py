"""`AsyncCheckpointer`: snapshot on the caller's thread, write on the shared writer thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import backends, collector, forking, format, storage, writer
from .closing import ClosesOnExit
from .errors import InvalidInputError
from .layout import PathLike
from .save import write_snapshot
from .snapshot import (
    Snapshot,
    check_budget,
    finish_in_background,
    forget_slab_views,
    staging_buffers,
    start_snapshot,
)
from .staging import StagingPool
from .training_state import TrainingState
from .writer import WriteFuture

if TYPE_CHECKING:  # only a type hint: importing arrayckpt.distributed here costs every import
    from .distributed.types import ShardingConfig

log = logging.getLogger("arrayckpt")

T = TypeVar("T")


class AsyncCheckpointer(ClosesOnExit):
    """Saves checkpoints without stalling training.

    `save` returns once every array is copied into host buffers this checkpointer owns
    (reused between saves, so the copy runs at memcpy speed); the shared writer thread
    then checksums, writes, fsyncs and commits. One write per checkpointer is in flight:
    a new `save` first waits for the previous one. A failed write is raised exactly once,
    by `wait`, the next `save`, or `close`.

    Every method is safe to call from several threads (saves run one after another). A
    child made by ``fork()`` (e.g. a DataLoader worker) gets a fresh checkpointer: no
    write in flight (the parent's stays the parent's) and empty staging buffers.

    Args:
        max_staging_bytes: the most host memory the staging buffers may take (``None``:
            as much as the state). A larger state is saved within it: the arrays written
            last are staged, the ones before are written straight from the caller's
            memory while `save` waits, so the stall grows by the time it takes to write
            what did not fit (docs/async.md, "Bounded host memory"). Arrays that have no
            host view (device arrays, strided ones) are always staged and must fit.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with ac.AsyncCheckpointer() as ckpt:
        ...     w = np.zeros(4, np.float32)
        ...     future = ckpt.save(f"{d}/step_1", {"w": w}, training_state=ac.TrainingState(1))
        ...     w += 1  # safe: the checkpoint holds the values at save time
        >>> ac.load_checkpoint(f"{d}/step_1").model["w"]
        array([0., 0., 0., 0.], dtype=float32)
    """

    def __init__(self, *, max_staging_bytes: int | None = None) -> None:
        self.max_staging_bytes = check_budget(max_staging_bytes)
        self._start_fresh()
        self._closed = False
        #: Seconds the last `save` blocked the caller (waiting + copying).
        self.last_stall_s = 0.0
        forking.reset_in_child(self)

    def _start_fresh(self) -> None:
        """Own state only: no write in flight, empty staging, a new lock.

        Also what a forked child gets (see `forking`): its parent's write in
        flight runs on a thread the child does not have, so waiting for it would hang, and
        the parent's lock may have been held by one of the threads fork did not copy.
        """
        self._staging = StagingPool(pinned_allocator=backends.pinned_empty)
        self._pending: WriteFuture[Any] | None = None
        self._lock = threading.RLock()

    def save(
        self,
        directory: PathLike,
        model_state: Mapping[str, Any],
        optimizer_state: Mapping[str, Any] | None = None,
        training_state: TrainingState | None = None,
        *,
        extra: Any = None,
        on_commit: Callable[[Path | str], None] | None = None,
        background_staging: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        commit: Callable[[Snapshot], Path | str] | None = None,
    ) -> WriteFuture[Path | str]:
        """Snapshot the state now and write it in the background; see `save_checkpoint`.

        Safe to call from several threads: each call waits for the write in flight,
        snapshots and queues as one step, so every directory gets the state passed with
        it. A relative ``directory`` is resolved now, against the current directory.

        Args:
            on_commit: called on the writer thread with the committed directory, after the
                commit and before the future resolves (`CheckpointManager` applies
                retention there); its error fails the future.
            background_staging: return as soon as the state is validated, copying it to
                host memory on a thread of its own; the caller must not change its arrays
                until ``future.staged`` resolves (e.g. wait on it right before
                ``optimizer.step()``, so the copy overlaps the forward and backward
                passes). Device arrays' copies are issued before `save` returns
                (asynchronous on a side stream); JAX arrays in host memory need no copy.
            storage_options: settings of the object store when ``directory`` is a URL
                (see `save_checkpoint`).
            commit: writes and commits the snapshot on the writer thread in place of the
                plain atomic commit at ``directory`` (`CheckpointManager` holds a lease on
                object stores there); returns where it committed.

        Returns:
            A future resolving to the committed directory once it is durable; its
            ``staged`` future tells when the arrays may change again.

        Raises:
            CheckpointError: the previous write failed (raised once), or the input is
                invalid (nothing is queued).
        """
        target = absolute(directory)
        with self._lock:
            started = time.perf_counter()
            self._check_open()
            self.wait()
            # No garbage collection during the stall: a snapshot of 20,000 tensors set
            # off ~180 young-generation passes (30 ms); it makes no cyclic garbage.
            with collector.paused():
                pending = start_snapshot(
                    model_state,
                    optimizer_state,
                    training_state,
                    staging=self._staging,
                    extra=extra,
                    max_staging_bytes=self.max_staging_bytes,
                )
                snapshot: Future[Snapshot]
                copy = None
                if background_staging:
                    snapshot, staged = finish_in_background(pending)
                else:
                    # The write starts now, on the tensors copied so far (see `start_copies`).
                    snap, copy = pending.start_copies()
                    snapshot = Future()
                    snapshot.set_result(snap)

                def write() -> Path | str:
                    snap = snapshot.result()
                    if commit is not None:
                        path = commit(snap)
                    else:
                        path = write_snapshot(target, snap, storage_options)
                    if on_commit is not None:
                        on_commit(path)
                    return path

                future = self._submit(write, f"save {target}")
                if copy is not None:
                    self._copy_or_abandon(copy, future)
                handoff = pending.handoff
                # The plans' per-tensor tuples die here, before the collector is back on:
                # alive, they would be scanned by the pass its first allocation sets off.
                del pending, copy
            if handoff is not None:
                # Once the write ends (also if it fails) nothing reads the caller's arrays.
                future.add_done_callback(lambda _: handoff.release_all())
            if background_staging:
                future.staged = staged if handoff is None else _all_done(staged, handoff.done)
            elif handoff is not None:
                handoff.done.result()  # the arrays written in place are out
            self.last_stall_s = time.perf_counter() - started
            return future

    def prepare(
        self,
        model_state: Mapping[str, Any],
        optimizer_state: Mapping[str, Any] | None = None,
        *,
        extra: Any = None,
    ) -> Future[None]:
        """Allocate and fault in the host buffers a save of this state will use, in the
        background, so the first `save` stalls like later ones.

        Fresh memory costs a page fault per 4 KiB on first touch, paid during the stall of
        the first save of a process otherwise (on a 2-core VM, 1 GiB: a cold copy 0.79 s, a
        warm one 0.10 s). Call it once the state exists, e.g. right after building the
        model and optimizer; arrays of the same shapes and dtypes work as well. Saves of a
        different state still work (they allocate what the pool lacks). `save` waits for
        a warm-up still running, so the two never race.

        Returns:
            A future that resolves when the buffers are ready.

        Raises:
            CheckpointError: the state is not one `save` accepts (the same checks).
        """
        # The native modules a write imports (crc32c: 20-60 ms) are imported now, in the
        # caller's thread as every save does, rather than in the first save's stall.
        format.import_writer_modules()
        with self._lock:
            self._check_open()
            return self._staging.warm_in_background(
                staging_buffers(
                    model_state,
                    optimizer_state,
                    extra=extra,
                    max_staging_bytes=self.max_staging_bytes,
                )
            )

    def save_distributed(
        self,
        directory: PathLike,
        rank: int,
        world_size: int,
        model_state: Mapping[str, Any],
        optimizer_state: Mapping[str, Any] | None = None,
        training_state: TrainingState | None = None,
        sharding: ShardingConfig | None = None,
        *,
        coordinator: Any = "auto",
        timeout: float | None = None,
        extra: Any = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> WriteFuture[Path | str]:
        """Snapshot this rank's state now and write it in the background; see
        `save_distributed_checkpoint` for the arguments (``coordinator``, ``timeout``,
        ``extra``, ``storage_options``; ``directory`` may be an object-store URL, and then
        only the writer thread talks to the store).

        Coordinated saves talk to the other ranks from the writer thread over a dedicated
        channel (a gloo group of their own, a duplicated MPI communicator, keys of their
        own in jax.distributed's store), never the training loop's; the channel is built
        here, on the caller's thread.
        """
        from .distributed.save import prepare_save

        if self.max_staging_bytes is not None:
            raise InvalidInputError(
                "max_staging_bytes does not apply to save_distributed yet (a coordinated "
                "save stages its whole shard); use an AsyncCheckpointer without it"
            )
        directory = absolute(directory)
        with self._lock:
            started = time.perf_counter()
            self._check_open()
            self.wait()
            job = prepare_save(
                directory,
                rank,
                world_size,
                model_state,
                optimizer_state,
                training_state,
                sharding,
                staging=self._staging,
                background=True,
                coordinator=coordinator,
                timeout=timeout,
                extra=extra,
                storage_options=storage_options,
            )
            future = self._submit(job, f"save_distributed {directory} rank {rank}")
            self.last_stall_s = time.perf_counter() - started
            return future

    def _copy_or_abandon(self, copy: Callable[[], None], future: WriteFuture[Any]) -> None:
        """Run the snapshot's copies while the write starts. If they fail (or Ctrl-C
        stops them), the write fails at the first tensor not copied and commits nothing;
        the error is raised here, once, and the failed write is not raised again."""
        try:
            copy()
        except BaseException:
            Future.exception(future)  # the writer stops at the first gate still closed
            future.observed = True
            self._pending = None
            raise

    def _submit(self, job: Callable[[], T], description: str) -> WriteFuture[T]:
        """Queue ``job``; the caller holds the lock and has waited for the previous write."""
        future = writer.submit(job, description)
        self._pending = future
        return future

    @property
    def staging(self) -> StagingPool:
        return self._staging

    def wait(self) -> None:
        """Block until the write in flight is durable; raise its error, once.

        An error the caller already saw through the `save` future is not raised again.

        Raises:
            CheckpointError: the write failed; a second `wait` returns quietly.
        """
        with self._lock:
            future = self._pending
        if future is None:
            return
        # Wait without claiming: if the wait is interrupted (KeyboardInterrupt), the write
        # stays pending, so the next save still waits before reusing the staging buffers.
        Future.exception(future)
        with self._lock:
            if self._pending is not future:
                return  # another thread's wait claimed (and raised) it
            self._pending = None
        if not future.observed:
            future.result()

    def close(self) -> None:
        """Wait for the write in flight (raising its error) and release the staging buffers.

        Afterwards the checkpointer holds no host memory; `save` then raises.
        """
        with self._lock:
            if self._closed:
                return
            try:
                self.wait()
            finally:
                self._closed = True
                forget_slab_views(self._staging)
                self._staging.release()
                self._pending = None

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this AsyncCheckpointer is closed; create a new one")


def _all_done(first: Future[None], second: Future[None]) -> Future[None]:
    """A future that resolves once both have (with ``first``'s error if it failed)."""
    both: Future[None] = Future()

    def after_first(done: Future[None]) -> None:
        error = done.exception()
        if error is not None:
            both.set_exception(error)
        else:
            second.add_done_callback(lambda _: both.set_result(None))

    first.add_done_callback(after_first)
    return both


def absolute(directory: PathLike) -> Path | str:
    """``directory`` made absolute now, so a later ``os.chdir`` cannot move a queued write
    (an object-store URL is absolute already)."""
    if storage.is_url(directory):
        return str(directory)
    return Path(storage.local_path(directory)).absolute()
