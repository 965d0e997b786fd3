"""The priority of a save's background threads (``ARRAYCKPT_WRITER_NICE``; 0, the
default, leaves it alone: see `DEFAULT_NICE`).

Set, a background write takes the time training leaves idle: the writer thread (before
each job), the stage thread of background staging and the warm-up thread lower
themselves (`background`), and the helpers they use take their priority per job
(`like_this_thread`). Threads that work while the caller waits (the copies
of a save's stall, a synchronous save, a load) keep the caller's priority.

On Linux nice values and I/O priorities belong to each thread, so lowering one thread
leaves the others as they are. An unprivileged thread cannot raise its priority back:
a thread once lowered stays lowered, which is what reused threads want. Where the
platform refuses or lacks these calls the threads run as they are (logged at debug).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from . import env, libc

log = logging.getLogger("arrayckpt")

T = TypeVar("T")

NICE_VAR = "ARRAYCKPT_WRITER_NICE"
#: Nice levels the background threads sit below the main thread; 0 by default: measured
#: with 2 training threads on 2 cores (docs/performance.md, "Training under a background
#: write"), nice 10 stretched the write from 2.6 s to 16.6 s and cost training more
#: (2.7 s against 2.0 s), the lowered writer holding the GIL while the scheduler kept it
#: off the CPU. Set it where that measurement comes out the other way.
DEFAULT_NICE = 0
MAX_NICE = 19

#: Best-effort, lowest level: the background I/O waits behind training's at the same
#: class, yet is always served in turn. Not the idle class: idle requests are served
#: only when the disk has nothing else, so a data loader that keeps it busy could hold
#: a checkpoint back indefinitely, and other threads' fsyncs can end up waiting on
#: those starved writes through the file system's journal.
IOPRIO_CLASS_BEST_EFFORT = 2
IOPRIO_CLASS_IDLE = 3
IOPRIO_LOWEST_LEVEL = 7
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread alone
#: (ioprio_set, ioprio_get) system call numbers; the generic table serves arm64.
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "arm64": (30, 31)}

_syscall = (
    libc.function("syscall", [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int])
    if sys.platform == "linux"
    else None
)
_numbers = _IOPRIO_SYSCALLS.get(os.uname().machine) if hasattr(os, "uname") else None

_local = threading.local()


def nice_increment() -> int:
    """How many nice levels a save's background threads sit below the main thread
    (``ARRAYCKPT_WRITER_NICE``, default 0: their CPU and I/O priority are left alone).

    Raises:
        InvalidInputError: the variable is set to anything but an integer from 0 to 19.
    """
    return env.int_between(NICE_VAR, DEFAULT_NICE, 0, MAX_NICE)


def background(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` as the target of a save's background thread: it lowers that thread first.

    The variable is read now, so a bad value raises in the thread that starts the
    background one, where the caller sees it.
    """
    increment = nice_increment()

    def run() -> T:
        lower_this_thread(increment)
        return fn()

    return run


def like_this_thread(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` as the target of a helper of this thread: lowered like it, if it is."""
    increment: int | None = getattr(_local, "increment", None)
    if increment is None:
        return fn

    def run() -> T:
        lower_this_thread(increment)
        return fn()

    return run


def in_background() -> bool:
    """Whether this thread is one of a save's background threads."""
    return getattr(_local, "increment", None) is not None


def lower_this_thread(increment: int) -> None:
    """Mark this thread a background one and lower its CPU and I/O priority: nice
    ``increment`` above the main thread's (at most 19), best-effort I/O at the lowest
    level. Never raises its priority; nothing changes with ``increment`` 0."""
    _local.increment = increment
    if increment == 0:
        return
    tid = threading.get_native_id()
    try:
        target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, os.getpid()) + increment)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except (OSError, AttributeError) as exc:  # not Linux, or refused
        log.debug("could not lower the nice value of thread %d: %s", tid, exc)
    current = io_priority(tid)
    if current is None or current[0] == IOPRIO_CLASS_IDLE:
        return
    lowest = IOPRIO_CLASS_BEST_EFFORT << _IOPRIO_CLASS_SHIFT | IOPRIO_LOWEST_LEVEL
    if _ioprio_call(0, tid, lowest) < 0:
        log.debug(
            "could not lower the I/O priority of thread %d: errno %d", tid, ctypes.get_errno()
        )


def io_priority(tid: int) -> tuple[int, int] | None:
    """Thread ``tid``'s I/O priority as (class, level), or None where it cannot be read.

    Class 0 ("none") means the kernel derives it from the nice value."""
    value = _ioprio_call(1, tid, 0)
    if value < 0:
        return None
    return value >> _IOPRIO_CLASS_SHIFT, value & ((1 << _IOPRIO_CLASS_SHIFT) - 1)


def _ioprio_call(which: int, tid: int, value: int) -> int:
    """``ioprio_set`` (``which`` 0) or ``ioprio_get`` (1) of thread ``tid``; -1 on failure."""
    if _syscall is None or _numbers is None:
        return -1
    return int(_syscall(_numbers[which], _IOPRIO_WHO_PROCESS, tid, value))
