"""Child processes for the durability suites: ``python durability_child.py COMMAND ARGS``.

Each prints one line per event (``committed N``, ``ready``) and flushes, so the parent
knows what had returned before it killed or interrupted the child.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faults

import arrayckpt as ac
from arrayckpt import fsops

KEEP: list[object] = []


def say(line: str) -> None:
    print(line, flush=True)


def save_args(target: str, step: int, scale: int):
    model = faults.model_state(step, scale)
    return (target, model, faults.optimizer_state(step, scale), faults.training_state(step)), model


def save_loop(target: str, mode: str, scale: str, first: str = "1", last: str = "0") -> None:
    """Save steps first, first+1, ... (forever if last is 0), reporting each commit."""
    scale_n, stop = int(scale), int(last)
    steps = count(int(first)) if not stop else range(int(first), stop + 1)
    if mode == "sync":
        for step in steps:
            args, _ = save_args(target, step, scale_n)
            ac.save_checkpoint(*args)
            say(f"committed {step}")
        return
    ckpt = ac.AsyncCheckpointer()
    previous = None
    for step in steps:
        args, model = save_args(target, step, scale_n)
        ckpt.save(*args)  # returns after step-1 is committed and step is snapshotted
        if previous is not None:
            say(f"committed {previous}")
        for array in model.values():
            array[...] = 255  # training goes on: the snapshot must not see this
        previous = step
    ckpt.close()
    say(f"committed {previous}")


def install(filesystem: fsops.FileSystem) -> None:
    """Route this child's file operations through ``filesystem`` until it exits."""
    installed = fsops.use(filesystem)
    installed.__enter__()
    KEEP.append(installed)  # a collected context manager would uninstall it


def pending_at_exit(target: str, scale: str) -> None:
    """Queue an async save and leave: the interpreter must finish it before exiting."""
    install(faults.SlowFS(0.2))  # the save is certainly still pending at exit
    args, _ = save_args(target, 1, int(scale))
    ac.AsyncCheckpointer().save(*args)
    say("queued")


def failing_unobserved(target: str) -> None:
    """Queue a save that fails and never look at it: stderr must say so at exit."""
    args, _ = save_args(target, 1, 1)
    ac.AsyncCheckpointer().save(*args)
    say("queued")


def exit_during_save(target: str, scale: str) -> None:
    """Commit step 1, queue step 2, and leave with os._exit (no atexit, no cleanup)."""
    args, _ = save_args(target, 1, 1)
    ac.save_checkpoint(*args)
    install(faults.SlowFS(5))
    args, _ = save_args(target, 2, int(scale))
    ac.AsyncCheckpointer().save(*args)
    say("queued")
    deadline = time.monotonic() + 60
    while not faults.debris(Path(target).parent) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the write has begun: its temporary directory exists
    os._exit(3)


def stuck_storage(target: str) -> None:
    """Commit step 1, then queue step 2 on storage that never answers, and exit."""
    args, _ = save_args(target, 1, 1)
    ac.save_checkpoint(*args)
    stuck = faults.StuckFS()
    install(stuck)
    args, _ = save_args(target, 2, 1)
    ac.AsyncCheckpointer().save(*args)
    stuck.entered.wait()
    say("stuck")


def interrupt_during_save(target: str, scale: str) -> None:
    """Queue a save, then die of Ctrl-C in the main thread: the save still completes."""
    install(faults.SlowFS(0.2))
    args, _ = save_args(target, 1, int(scale))
    ac.AsyncCheckpointer().save(*args)
    say("queued")
    signal.raise_signal(signal.SIGINT)
    threading.Event().wait(5)


def read_loop(target: str, seconds: str, scale: str) -> None:
    """Load ``target`` over and over; report each step seen, fail on a torn checkpoint."""
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        step = faults.loaded_step(Path(target), int(scale))
        say(f"read {step}")


def fail_cleanly(kind: str, target_name: str, mode: str, arg: str = "") -> None:
    """Save step 1, make the storage refuse a bigger step 2, check nothing was lost.

    kind: ``disk-full`` (run on a small tmpfs), ``fsize`` (RLIMIT_FSIZE of ``arg`` bytes)
    or ``readonly`` (the parent directory is made read-only; run without root's
    CAP_DAC_OVERRIDE). Prints ``failed <cause>`` then ``ok``; any other outcome raises.
    """
    import resource

    target = Path(target_name)
    small, big = faults.Saver(mode), faults.Saver(mode, scale=1024)
    small.save(target, 1)
    if kind == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit gets EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), resource.RLIM_INFINITY))
    elif kind == "readonly":
        target.parent.chmod(0o555)
    try:
        big.save(target, 2)
    except ac.CheckpointWriteError as exc:
        cause = exc.__cause__
        say(f"failed {type(cause).__name__} {getattr(cause, 'errno', '')}: {exc}")
    else:
        raise AssertionError(f"{kind}: the save did not fail")
    big.after_failure()
    faults.assert_checkpoint(target, 1)
    assert faults.debris(target.parent) == [], faults.debris(target.parent)
    if kind == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        big.save(target, 3)
    elif kind == "readonly":
        target.parent.chmod(0o755)
        big.save(target, 3)
    else:
        small.save(target, 3)
    faults.loaded_step(target, 1 if kind == "disk-full" else 1024)
    small.close()
    big.close()
    say("ok")


def save_once(target: str, step: str, scale: str) -> None:
    """One save; the parent looks at how it failed (exit status 1 and the message)."""
    args, _ = save_args(target, int(step), int(scale))
    try:
        ac.save_checkpoint(*args)
    except ac.CheckpointError as exc:
        say(f"failed {type(exc).__name__} cause={type(exc.__cause__).__name__}: {exc}")
        sys.exit(1)
    say(f"committed {step}")


def dist_save_loop(target: str, rank: str, port: str, scale: str, seconds: str) -> None:
    """Rank ``rank`` of 2: coordinated saves over torch.distributed (gloo, 127.0.0.1:port)
    in a loop, every array filled with the step; prints ``committed N`` after each.

    Stops by itself after ``seconds`` (the parent normally kills it long before); every
    wait for the other rank is bounded by a 20 s timeout.
    """
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=int(rank),
        world_size=2,
        timeout=datetime.timedelta(seconds=20),
    )
    from arrayckpt.distributed import TorchCoordinator

    coord = TorchCoordinator(timeout=20)
    say("ready")
    deadline = time.monotonic() + float(seconds)
    for step in count(1):
        if time.monotonic() > deadline:
            break
        args, _ = save_args(target, step, int(scale))
        ac.save_distributed_checkpoint(args[0], int(rank), 2, *args[1:], coordinator=coord)
        say(f"committed {step}")
    os._exit(0)  # no teardown handshake with a peer that may be gone


def dist_read_loop(target: str, seconds: str, scale: str) -> None:
    """Load each rank of the distributed checkpoint ``target`` over and over; report the
    steps seen (``read R0 R1``), fail on a torn rank or one not matching its manifest.

    Each rank is a separate load, so the two may come from consecutive saves."""
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        steps = faults.loaded_rank_steps(Path(target), int(scale))
        say("read " + " ".join(map(str, steps)))


def dist_caller_save_loop(target: str, scale: str, first: str = "1") -> None:
    """Both ranks of a distributed checkpoint saved caller-coordinated (rank 0, rank 1)
    in this one process, steps first, first+1, ... forever."""
    saver = faults.Saver("dist2-caller", int(scale))
    for step in count(int(first)):
        saver.save(Path(target), step)
        say(f"committed {step}")


COMMANDS = {
    f.__name__.replace("_", "-"): f
    for f in (
        save_loop,
        pending_at_exit,
        failing_unobserved,
        exit_during_save,
        stuck_storage,
        interrupt_during_save,
        read_loop,
        fail_cleanly,
        save_once,
        dist_save_loop,
        dist_read_loop,
        dist_caller_save_loop,
    )
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
