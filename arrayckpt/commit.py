"""Atomic commit: build a directory in a temporary sibling, fsync it, swap it into place."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from . import forking, fsops
from .errors import CheckpointError, CheckpointWriteError, InvalidInputError
from .layout import (
    OLD_MARKER,
    TEMP_MARKER,
    process_alive,
    replaceable,
    temporary_name,
    temporary_owner,
    temporary_target,
)

log = logging.getLogger("arrayckpt")


def temporary_sibling(target: Path, marker: str = TEMP_MARKER) -> Path:
    """A unique hidden name beside ``target``; the pid tells a later cleanup who made it."""
    return target.with_name(temporary_name(target.name, marker, os.getpid(), uuid.uuid4().hex[:12]))


def remove_directory(target: Path) -> None:
    """Delete the checkpoint ``target``: renamed aside first, so no half-deleted directory
    can ever look complete; a crash before the removal leaves a temporary that
    `CheckpointManager.cleanup` removes later."""
    fs = fsops.fs()
    doomed = temporary_sibling(target)
    fs.rename(target, doomed)
    fs.fsync_dir(target.parent)
    fs.remove_tree(doomed)


def commit_directory(target: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Create ``target`` atomically with the files ``fill(tmp_dir)`` writes.

    ``fill`` must write and fsync every file it creates. Afterwards the temporary directory
    is fsynced, swapped into place in one step (replacing an empty directory or a previous
    checkpoint), and the parent directory is fsynced. At every instant ``target`` holds
    either its previous content or the complete new one.

    Raises:
        InvalidInputError: ``target`` exists and holds files that are not a checkpoint's.
        CheckpointWriteError: any I/O step failed; no temporary directory is left behind.
    """
    target = Path(target).absolute()
    if target.is_symlink():
        # Save where the link points (e.g. `latest -> step_100`): swapping the link itself
        # would replace it with a directory and leave it behind under a temporary name.
        target = target.resolve()
    fs = fsops.fs()
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"{target} exists and is not a directory; choose another path")
    try:
        fs.makedirs(target.parent)
    except OSError as exc:
        raise CheckpointWriteError(
            f"saving {target} failed: cannot create {target.parent}: {exc}"
        ) from exc
    if target.is_dir() and not replaceable(target):
        raise InvalidInputError(
            f"{target} holds files that are not part of a checkpoint; refusing to replace it. "
            "Save into an empty or new directory."
        )
    tmp = temporary_sibling(target)
    undo: Callable[[], None] | None = None
    _in_use(tmp, True)
    try:
        fs.mkdir(tmp)
        fill(tmp)
        fs.fsync_dir(tmp)
        undo, replaced = _swap_into_place(tmp, target)
        fs.fsync_dir(target.parent)
    except BaseException as exc:
        # A (second) Ctrl-C while cleaning up must not leave the temporary directory behind.
        with interrupts_deferred():
            restored = undo is None or _attempt(undo, f"restoring the previous content of {target}")
            if restored:  # else `tmp` may hold the previous checkpoint: keep it for the user
                _discard(tmp)
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            raise
        raise CheckpointWriteError(f"saving {target} failed: {exc}") from exc
    finally:
        _in_use(tmp, False)
    with interrupts_deferred():  # committed: Ctrl-C now must not strand the old copy
        if replaced is not None:
            _discard(replaced)
        _discard_stale_siblings(target)
    return target


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) inside the block and deliver it right after.

    For clean-up, and for joining threads that still write into a temporary directory:
    a `KeyboardInterrupt` in the middle of either would leave debris behind. Python runs
    signal handlers on the main thread only, so elsewhere there is nothing to hold back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, FrameType | None]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(*received[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


_IN_USE: set[Path] = set()
_IN_USE_LOCK = threading.Lock()


@forking.in_child
def _after_fork_in_child() -> None:
    # A thread fork did not copy may have held the lock; the parent's saves are its own.
    global _IN_USE_LOCK
    _IN_USE_LOCK = threading.Lock()
    _IN_USE.clear()


def _in_use(path: Path, using: bool) -> None:
    """Track the temporary siblings this process's saves are using right now."""
    with _IN_USE_LOCK:
        if using:
            _IN_USE.add(path)
        else:
            _IN_USE.discard(path)


def _discard_stale_siblings(target: Path) -> None:
    """Remove temporary siblings of ``target`` that no running save owns.

    A process killed mid-save, a power cut or a failed cleanup leaves them. Called only
    after ``target`` holds a complete new checkpoint, so even an aside copy of an older
    checkpoint is superseded. Siblings of a live process other than this one are left:
    that save may still be running.
    """
    try:
        names = [entry.name for entry in target.parent.iterdir()]
    except OSError:
        return
    for name in names:
        if temporary_target(name) != target.name:
            continue
        path = target.parent / name
        pid = temporary_owner(name)
        with _IN_USE_LOCK:
            busy = path in _IN_USE
        if busy or (pid is not None and pid != os.getpid() and process_alive(pid)):
            continue
        _discard(path)


def _swap_into_place(tmp: Path, target: Path) -> tuple[Callable[[], None], Path | None]:
    """Put ``tmp`` at ``target``; return how to undo that and where the old content went."""
    fs = fsops.fs()
    if not target.exists() or not any(target.iterdir()):
        existed = target.exists()
        try:
            fs.rename(tmp, target)  # POSIX rename replaces an empty directory atomically
        except OSError as exc:
            # Another process's save filled `target` since we looked: replace that instead.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        else:

            def undo_rename() -> None:
                fs.rename(target, tmp)
                if existed:
                    fs.mkdir(target)

            return undo_rename, None
    try:
        fs.exchange(tmp, target)
        return (lambda: fs.exchange(tmp, target)), tmp
    except NotImplementedError:
        pass
    # No atomic exchange here: move the old one aside first. A crash between the two
    # renames leaves the old checkpoint under its `.arrayckpt-old-` name, not lost.
    old = temporary_sibling(target, OLD_MARKER)
    fs.rename(target, old)
    try:
        fs.rename(tmp, target)
    except BaseException:
        fs.rename(old, target)
        raise

    def undo_aside() -> None:
        fs.rename(target, tmp)
        fs.rename(old, target)

    return undo_aside, old


def _attempt(step: Callable[[], None], what: str) -> bool:
    try:
        step()
    except OSError as exc:
        log.error("%s failed: %s", what, exc)
        return False
    return True


def _discard(path: Path) -> None:
    """Remove a temporary directory; a failure here is logged, never raised over the cause."""
    if not os.path.lexists(path):
        return
    _attempt(lambda: fsops.fs().remove_tree(path), f"removing temporary directory {path}")
