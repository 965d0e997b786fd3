"""`CheckpointManager`: numbered step directories under one root, retention and resume."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from . import forking, fsops, storage
from .async_checkpointer import AsyncCheckpointer
from .closing import ClosesOnExit
from .commit import remove_directory
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidInputError,
)
from .layout import (
    OLD_MARKER,
    TRAINING_STATE_FILE,
    PathLike,
    is_complete,
    is_temporary_name,
    process_alive,
    rank_dir_name,
    scan,
    settled_scan,
    step_dir_name,
    temporary_owner,
    temporary_target,
)
from .load import Checkpoint, load_checkpoint
from .save import write_snapshot
from .snapshot import check_budget, take_snapshot
from .training_state import TrainingState

if TYPE_CHECKING:  # the object-store root is imported only for URL roots
    from .snapshot import Snapshot
    from .storage.root import ObjectRoot

log = logging.getLogger("arrayckpt")

#: A temporary whose creating process is still alive is left alone until it is this old.
DEFAULT_STALE_AFTER_S = 6 * 3600.0
#: Lifetime of an object-store writer's lease without renewal (renewed every quarter).
DEFAULT_LEASE_TTL_S = 60.0


def _recovery_rank(entry: Path) -> tuple[bool, int]:
    """Complete ``.arrayckpt-old-`` copies first, newest step first: the one to rename back."""
    if OLD_MARKER not in entry.name or not is_complete(entry):
        return False, -1
    single = entry if (entry / TRAINING_STATE_FILE).is_file() else entry / rank_dir_name(0)
    try:
        return True, TrainingState.read(single / TRAINING_STATE_FILE).step
    except CheckpointError:
        return True, -1


def _check_step(step: Any) -> None:
    if type(step) is not int or step < 0:
        raise InvalidInputError(
            f"step must be a non-negative int, not {step!r} ({type(step).__name__}); "
            "pass e.g. 100, not '100'"
        )


class CheckpointManager(ClosesOnExit):
    """Numbered checkpoints under one root: save by step, keep a few, resume from the latest.

    Each step is a checkpoint directory ``root/step_00000100/``. A step is listed and
    restored only once it is complete (committed whole); temporaries and incomplete
    directories never are. Retention deletes old steps only after the new step is
    durably committed. Temporaries left by a crashed process are removed when the
    manager starts (those of live processes are left alone until ``stale_after_s`` old).

    On an object store (``root="s3://bucket/run"``) a step is complete once its commit
    object exists and parses; each save holds a lease on its step, renewed while it
    uploads, and a new manager removes the uploads of writers whose lease expired (or
    that died on this machine), never a live writer's (see docs/storage.md).

    Args:
        root: the directory holding the steps (created if missing), or an ``s3://``,
            ``gs://`` or ``az://`` URL (``file://`` is a local path).
        keep_last: keep the newest ``keep_last`` complete steps and delete older ones;
            ``None`` keeps every step.
        keep_every: additionally keep every step divisible by ``keep_every``.
        async_save: write in the background (`AsyncCheckpointer`); ``save`` then returns
            once the state is copied to host memory. ``False`` writes before returning.
        stale_after_s: age after which any temporary is removed, even one whose creating
            pid is alive on this host (pids are reused).
        storage_options: object-store settings over those from the environment
            (``AWS_*``, ...), as in `save_checkpoint`; unused for local roots.
        lease_ttl_s: on an object store, how long a writer's lease outlives its last
            renewal: the wait before another machine may clean up after a crashed writer.
        max_staging_bytes: with ``async_save``, the most host memory a save's staging
            may take; a larger state's first arrays are written in place while ``save``
            waits (see `AsyncCheckpointer`). Unused with ``async_save=False``, which
            stages nothing.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> root = tempfile.mkdtemp()
        >>> with ac.CheckpointManager(root, keep_last=2) as mgr:
        ...     for step in (100, 200, 300):
        ...         _ = mgr.save(step, {"w": np.full(2, step, np.float32)})
        >>> mgr = ac.CheckpointManager(root)
        >>> mgr.steps()
        [200, 300]
        >>> mgr.restore().model["w"]
        array([300., 300.], dtype=float32)
    """

    def __init__(
        self,
        root: PathLike,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        async_save: bool = True,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        storage_options: Mapping[str, Any] | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        max_staging_bytes: int | None = None,
    ) -> None:
        check_budget(max_staging_bytes)  # before the root is created
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (type(value) is not int or value < 1):
                raise InvalidInputError(f"{name} must be a positive int or None, not {value!r}")
        if not (isinstance(lease_ttl_s, (int, float)) and 0 < lease_ttl_s < float("inf")):
            raise InvalidInputError(f"lease_ttl_s must be a positive number, not {lease_ttl_s!r}")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.stale_after_s = stale_after_s
        self._remote: ObjectRoot | None = None
        self.root: Path | str
        if storage.is_url(root):
            from .storage.root import ObjectRoot

            self._remote = ObjectRoot(str(root), storage_options, float(lease_ttl_s))
            self.root = str(self._remote)
            self._path = Path()
        else:
            self.root = self._path = Path(storage.local_path(root)).absolute()
            try:
                fsops.fs().makedirs(self._path)
            except OSError as exc:
                raise InvalidInputError(
                    f"cannot create the checkpoint root {self._path}: {exc}"
                ) from exc
        self._checkpointer = (
            AsyncCheckpointer(max_staging_bytes=max_staging_bytes) if async_save else None
        )
        self._closed = False
        self._lock = threading.RLock()
        #: The step and future of the last asynchronous save; see `_in_flight_step`.
        self._queued: tuple[int, Future[Path | str]] | None = None
        forking.reset_in_child(self)
        self.cleanup()

    def directory(self, step: int) -> Path | str:
        """Where step ``step`` is (or would be) saved: a path, or a URL for a store."""
        if self._remote is not None:
            return self._remote.location(step)
        return self._path / step_dir_name(step)

    def _step_path(self, step: int) -> Path:
        return self._path / step_dir_name(step)

    def save(
        self,
        step: int,
        model_state: Mapping[str, Any],
        optimizer_state: Any = None,
        training_state: TrainingState | None = None,
        *,
        extra: Any = None,
        rollback: bool = False,
        background_staging: bool = False,
    ) -> Future[Path | str]:
        """Save step ``step``, then apply retention once it is committed.

        Steps only move forward: a step at or below the newest one on disk (or already
        saved by this manager) is refused, unless ``rollback=True``. Safe to call from
        several threads; saves run one after another, each with its own state.

        Args:
            step: the training step; the directory is ``root/step_{step:08d}``.
            model_state: as in `save_checkpoint`: a flat mapping, a state dict or a pytree.
            optimizer_state: as ``model_state``; ``None`` writes no optimizer file.
            training_state: defaults to ``TrainingState(step=step)``; its ``step`` must
                equal ``step``.
            extra: scheduler, data position, RNG states, ... (see `save_checkpoint`).
            rollback: go back to ``step`` (after a loss spike, or a new run into an old
                root): every step newer than ``step`` is deleted first, newest first,
                and ``step`` itself is replaced atomically. Readers see the newest complete
                step at every instant (briefly an older one while the new step is
                written; on an object store also ``step`` itself while it is
                saved again); `restore` then returns what this call saved.
            background_staging: as in `AsyncCheckpointer.save`: return before the copy;
                wait on the future's ``staged`` before changing the arrays (ignored with
                ``async_save=False``, whose save is complete when it returns).

        Returns:
            A future resolving to the committed directory, or URL on an object store
            (already resolved when ``async_save=False``).

        Raises:
            InvalidInputError: bad step or input, a step at or below the newest without
                ``rollback=True`` (nothing is written), or the manager is closed.
            CheckpointError: the previous asynchronous save failed (raised once).
        """
        _check_step(step)
        if training_state is None:
            training_state = TrainingState(step=step)
        elif getattr(training_state, "step", step) != step:
            raise InvalidInputError(
                f"training_state.step is {training_state.step} but the step saved is {step}; "
                "pass equal values"
            )
        target = self.directory(step)
        with self._lock:
            self._check_open()
            if rollback:
                self._roll_back_to(step)
            else:
                self._check_moves_forward(step)
            from .distributed import global_shards, steps

            if global_shards.has_sharded(model_state, optimizer_state):
                # DTensor state: every rank calls save; the step is one coordinated save.
                if not isinstance(target, Path):
                    raise InvalidInputError(
                        f"{self.root}: a manager on an object store cannot save DTensor state "
                        "yet (its steps' leases are one writer's); use a local root, or "
                        "save_distributed_checkpoint to the URL"
                    )
                future: Future[Path | str] = steps.save_step(
                    target,
                    self._checkpointer,
                    model_state,
                    optimizer_state,
                    training_state,
                    extra,
                    self._retain,
                )
                if self._checkpointer is not None:
                    self._queued = (step, future)
                return future
            if self._checkpointer is None:
                snap = take_snapshot(
                    model_state, optimizer_state, training_state, staging=None, extra=extra
                )
                done: Future[Path | str] = Future()
                done.set_result(self._write(step, snap))
                self._retain()
                return done
            future = cast(
                "Future[Path | str]",
                self._checkpointer.save(
                    target,
                    model_state,
                    optimizer_state,
                    training_state,
                    extra=extra,
                    on_commit=lambda _: self._retain(),
                    background_staging=background_staging,
                    # on a store the write takes the step's lease, on the writer thread
                    commit=None if self._remote is None else lambda snap: self._write(step, snap),
                ),
            )
            self._queued = (step, future)
            return future

    def _write(self, step: int, snap: Snapshot) -> Path | str:
        if self._remote is not None:
            return self._remote.write(step, snap)
        return Path(write_snapshot(self._step_path(step), snap))

    def _check_moves_forward(self, step: int) -> None:
        newer = [s for s in self._all_steps() if s >= step]
        in_flight = self._in_flight_step()
        if in_flight is not None and in_flight >= step and in_flight not in newer:
            newer.append(in_flight)  # queued by this manager, not committed yet
        if newer:
            raise InvalidInputError(
                f"cannot save step {step} under {self.root}: steps only move forward, and it "
                f"already holds step(s) {sorted(newer)} at or above it (from this run or an "
                f"earlier one). Save a step above {max(newer)}, resume with restore(), use a "
                f"new root, or pass rollback=True to go back to step {step} (deletes the "
                "newer steps and replaces this one)"
            )

    def _roll_back_to(self, step: int) -> None:
        self.wait()  # the save in flight may be one of the steps going away
        for newer in reversed(self._all_steps()):
            # an object store cannot replace a committed step: it goes too
            if newer > step or (newer == step and self._remote is not None):
                self._delete(newer)
        self._queued = None

    def _in_flight_step(self) -> int | None:
        """The step of this manager's last queued save, unless it failed (then its step is
        free again) or committed (then it is on disk, or retention deleted it)."""
        if self._queued is None:
            return None
        step, future = self._queued
        # `Future.exception`, not the override: looking here must not count as the user
        # seeing the failure, which the next wait() still raises.
        if future.done() and Future.exception(future, 0) is not None:
            return None
        return step

    def _all_steps(self) -> list[int]:
        """Every step directory, complete or not: an incomplete one still holds the name.
        On an object store, only committed steps: an upload is under its writer's lease."""
        if self._remote is not None:
            return self._remote.steps()
        return [e.step for e in scan(self._path) if e.step is not None]

    def steps(self) -> list[int]:
        """The complete steps on disk, oldest first (call `wait` to include one in flight)."""
        if self._remote is not None:
            return self._remote.steps()
        entries = settled_scan(self._path)
        return [e.step for e in entries if e.status == "complete" and e.step is not None]

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(
        self,
        step: int | None = None,
        *,
        xp: ModuleType | str | None = None,
        device: Any = None,
        into: Any = None,
        keys: Iterable[str] | None = None,
        verify: bool = True,
        mmap: bool = True,
        optimizer: bool = True,
        optimizer_into: Any = None,
    ) -> Checkpoint | None:
        """Load step ``step``, or the newest complete step; ``None`` when there is none.

        Waits for this manager's save in flight first. With ``step=None``, a newest step
        that fails its checksums is skipped (with a warning) for the one before it, and a
        step that retention (another process's, too) deletes while it is being read is
        replaced by the newest complete step then on disk.

        Args:
            step: the step to load; ``None`` for the latest complete one.
            xp: the framework of the returned arrays, as in `load_checkpoint`.
            device: where they go, as in `load_checkpoint`.
            into: a model state to fill in place (or a JAX template), as in
                `load_checkpoint`.
            keys: load only these model tensors, as in `load_checkpoint`.
            verify: check every tensor's CRC32C.
            mmap: map files (local disks) or read them sequentially (network file systems).
            optimizer: ``False`` skips the optimizer file.
            optimizer_into: the same as ``into`` for the optimizer state.

        Returns:
            The `Checkpoint`, or ``None`` when ``step`` is ``None`` and no step is complete.

        Raises:
            InvalidInputError: ``step`` is not a non-negative int.
            CheckpointNotFoundError: ``step`` was given and is not a complete step.
            CorruptCheckpointError: every candidate step is corrupt (the newest's error).
        """
        if step is not None:
            _check_step(step)
        if keys is not None and not isinstance(keys, str):  # load_checkpoint refuses a str
            keys = list(keys)  # read again if a step vanishes

        options = self._remote.options if self._remote is not None else None

        def load(path: Path | str) -> Checkpoint:
            from .distributed import steps

            if isinstance(path, Path) and steps.is_sharded_step(path):
                # each rank's share, at any world size
                return steps.load_step(
                    path,
                    into=into,
                    optimizer_into=optimizer_into if optimizer else None,
                    xp=xp,
                    device=device,
                    verify=verify,
                    mmap=mmap,
                )
            return load_checkpoint(
                path,
                xp=xp,
                device=device,
                into=into,
                keys=keys,
                verify=verify,
                mmap=mmap,
                optimizer=optimizer,
                optimizer_into=optimizer_into,
                storage_options=options,
            )

        self.wait()
        if step is not None:
            path = self.directory(step)
            try:
                return load(path)
            except CheckpointError as exc:
                if self._complete(step):
                    raise
                raise CheckpointNotFoundError(
                    f"no complete checkpoint for step {step} at {path}; complete steps: "
                    f"{self.steps()}"
                ) from exc
        first_error: CorruptCheckpointError | None = None
        tried: set[int] = set()
        while True:
            # Rescanned after every failure: retention may have deleted the step we chose
            # and committed a newer one meanwhile.
            untried = [s for s in self.steps() if s not in tried]
            if not untried:
                break
            candidate = untried[-1]
            tried.add(candidate)
            path = self.directory(candidate)
            try:
                return load(path)
            except CheckpointError as exc:
                if not self._complete(candidate):
                    log.debug("step %d vanished while being read; rescanning", candidate)
                    continue
                if not isinstance(exc, CorruptCheckpointError):
                    raise
                log.warning("step %d is corrupt, trying the one before: %s", candidate, exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return None

    def _complete(self, step: int) -> bool:
        if self._remote is not None:
            return self._remote.is_complete(step)
        return is_complete(self._step_path(step))

    def prepare(
        self, model_state: Mapping[str, Any], optimizer_state: Any = None, *, extra: Any = None
    ) -> Future[None]:
        """Warm the host buffers an asynchronous save of this state will use, in the
        background; see `AsyncCheckpointer.prepare`. With ``async_save=False`` there is
        nothing to warm (saves write the arrays in place) and the future is already done."""
        with self._lock:
            self._check_open()
            if self._checkpointer is None:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            return self._checkpointer.prepare(model_state, optimizer_state, extra=extra)

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error, once."""
        if self._checkpointer is not None:
            self._checkpointer.wait()

    def close(self) -> None:
        """Wait for the save in flight (raising its error) and release the staging buffers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._checkpointer is not None:
                self._checkpointer.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this CheckpointManager is closed; create a new one")

    def _start_fresh(self) -> None:
        # Also in a forked child (see `forking`): the parent's lock may be held by a thread
        # the child does not have, and its save in flight is the parent's; the
        # checkpointer resets itself.
        self._lock = threading.RLock()
        self._queued = None

    def _retain(self) -> None:
        """Delete the complete steps retention does not keep: of ``keep_last`` exactly the
        newest N stay, plus every multiple of ``keep_every``. Runs after a commit."""
        if self.keep_last is None:
            return
        complete = self.steps()
        keep = set(complete[-self.keep_last :])
        if self.keep_every is not None:
            keep |= {s for s in complete if s % self.keep_every == 0}
        for step in complete:
            if step not in keep:
                try:
                    self._delete(step)
                except (OSError, CheckpointError) as exc:  # the new step is safe; an old lingers
                    log.warning("retention could not delete step %d: %s", step, exc)

    def _delete(self, step: int) -> None:
        if self._remote is not None:
            self._remote.delete(step)
        else:
            remove_directory(self._step_path(step))
        log.info("retention deleted %s", self.directory(step))

    def cleanup(self) -> list[Path] | list[str]:
        """Remove temporaries left by crashed processes under the root (and its step dirs).

        A temporary is stale when the pid in its name is not alive on this host, or it is
        older than ``stale_after_s``. When a checkpoint is missing and a stale, complete
        ``.arrayckpt-old-`` copy of it exists (a replace interrupted between its two
        renames), that copy is renamed back instead of removed — the one of the highest
        step, if a power cut left several.

        On an object store, remove the uncommitted steps whose writer's lease expired (or
        whose writer died on this machine) instead; steps live writers hold stay.

        Returns:
            The temporaries removed or renamed back (the steps' URLs on an object store).
        """
        if self._remote is not None:
            return self._remote.cleanup()
        handled = []
        places = [self._path] + [e.path for e in scan(self._path) if e.step is not None]
        for place in places:
            try:
                names = [e for e in place.iterdir() if is_temporary_name(e.name)]
            except OSError:
                continue
            stale = sorted((e for e in names if self._stale(e)), key=_recovery_rank, reverse=True)
            for entry in stale:
                try:
                    self._clean(entry)
                except OSError as exc:
                    log.warning("could not clean up %s: %s", entry, exc)
                    continue
                handled.append(entry)
        return handled

    def _stale(self, entry: Path) -> bool:
        pid = temporary_owner(entry.name)
        if pid is None or not process_alive(pid):
            return True
        try:
            age = time.time() - entry.lstat().st_mtime
        except OSError:
            return False
        return age > self.stale_after_s

    def _clean(self, entry: Path) -> None:
        fs = fsops.fs()
        if OLD_MARKER in entry.name and is_complete(entry):
            original = entry.with_name(temporary_target(entry.name) or "")
            if original.name and not os.path.lexists(original):
                fs.rename(entry, original)
                fs.fsync_dir(entry.parent)
                log.warning("recovered %s from %s (a replace was interrupted)", original, entry)
                return
        if entry.is_dir() and not entry.is_symlink():
            fs.remove_tree(entry)
        else:
            entry.unlink()
        log.info("removed stale temporary %s", entry)
