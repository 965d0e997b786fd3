"""Several threads, processes and forks at once: one manager shared by threads, arrays
changed during a synchronous save, readers racing retention, forked children."""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import os
import threading
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from async_helpers import GatedFS

import arrayckpt as ac
from arrayckpt import cli, fsops
from arrayckpt.inspection import verify

#: Above the snapshot's slab limit, so both staging paths (slab and own buffer) are used.
BIG = 20_000


def _state(step: int) -> dict[str, np.ndarray]:
    """State whose every value names its step."""
    return {
        "big": np.full(BIG, step, np.int64),
        "small_a": np.full(7, step, np.int64),
        "small_b": np.full(3, step, np.int32),
    }


def _ts(step: int) -> ac.TrainingState:
    return ac.TrainingState(step=step)


def _wrong(path: Path, step: int) -> bool:
    ckpt = ac.load_checkpoint(path)
    values = [ckpt.training_state.step] + [int(v) for a in ckpt.model.values() for v in a]
    return any(v != step for v in values)


def test_four_threads_saving_through_one_manager_never_mix_steps(tmp_path: Path) -> None:
    counter = itertools.count(1)
    counter_lock = threading.Lock()
    committed: list[tuple[int, Future[Path]]] = []
    refused: list[ac.CheckpointError] = []
    errors: list[BaseException] = []

    with ac.CheckpointManager(tmp_path) as mgr:

        def trainer() -> None:
            try:
                for _ in range(100):
                    with counter_lock:
                        step = next(counter)
                    # Saved outside the lock: another thread may save a newer step first,
                    # which makes this one a step below the newest (refused, by design).
                    try:
                        future = mgr.save(step, _state(step))
                    except ac.InvalidInputError as exc:
                        refused.append(exc)
                        continue
                    committed.append((step, future))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=trainer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a saving thread hung"
    assert not errors, errors
    assert len(committed) + len(refused) == 400
    assert all("rollback=True" in str(exc) for exc in refused)
    wrong = [step for step, future in committed if _wrong(future.result(), step)]
    assert wrong == []
    assert sorted(step for step, _ in committed) == ac.CheckpointManager(tmp_path).steps()


def test_threads_sharing_one_async_checkpointer_get_their_own_state(tmp_path: Path) -> None:
    saved: list[tuple[int, Future[Path]]] = []
    with ac.AsyncCheckpointer() as ckpt:

        def trainer(first: int) -> None:
            for step in range(first, first + 25):
                future = ckpt.save(tmp_path / f"c{step}", _state(step), None, _ts(step))
                saved.append((step, future))

        threads = [threading.Thread(target=trainer, args=(i * 100,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert len(saved) == 100
    assert [step for step, future in saved if _wrong(future.result(), step)] == []


def _mutating(arrays: list[Any], add: Any) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()

    def mutate() -> None:
        while not stop.is_set():
            for a in arrays:
                add(a)  # large in-place adds release the GIL: they overlap the save

    thread = threading.Thread(target=mutate, daemon=True)
    thread.start()
    return stop, thread


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("through", ["save_checkpoint", "manager"])
def test_a_synchronous_save_of_arrays_changed_meanwhile_commits_files_that_verify(
    tmp_path: Path, framework: str, through: str
) -> None:
    if framework == "torch":
        torch = pytest.importorskip("torch", reason="PyTorch is not installed")
        arrays: list[Any] = [torch.zeros(2 << 20), torch.zeros(1 << 20, dtype=torch.float64)]

        def add(a: Any) -> None:
            a.add_(1)
    else:
        arrays = [np.zeros(2 << 20, np.float32), np.zeros(1 << 20, np.float64)]

        def add(a: Any) -> None:
            np.add(a, 1, out=a)

    mgr = ac.CheckpointManager(tmp_path / "root", async_save=False)
    stop, thread = _mutating(arrays, add)
    try:
        for trial in range(10):
            state = {"w": arrays[0], "v": arrays[1]}
            if through == "manager":
                path = mgr.save(trial, state).result()
            else:
                path = ac.save_checkpoint(tmp_path / f"c{trial}", state)
            report = verify(path)
            assert report["ok"], report
            ac.load_checkpoint(path)  # checksums verified
    finally:
        stop.set()
        thread.join(timeout=60)
        mgr.close()


def _child_uses_inherited(ckpt: ac.AsyncCheckpointer, mgr: ac.CheckpointManager, out: Path) -> None:
    try:
        fsops._current = fsops.FileSystem()  # the parent's gate stays closed in this copy
        ckpt.wait()  # the parent's write in flight is not this process's
        ckpt.save(out / "child", _state(7), None, _ts(7)).result(timeout=60)
        assert mgr.restore() is not None
        mgr.save(1000, _state(1000)).result(timeout=60)
        ckpt.close()
        mgr.close()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _until_held(lock: Any) -> None:
    """Wait (up to 10 s) until another thread holds ``lock``."""
    for _ in range(1000):
        if not lock.acquire(blocking=False):
            return
        lock.release()
        threading.Event().wait(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_using_an_inherited_checkpointer_or_manager_does_not_hang(
    tmp_path: Path,
) -> None:
    with ac.CheckpointManager(tmp_path / "root") as warm:
        warm.save(1, _state(1))
    fs = GatedFS()
    with fsops.use(fs):
        ckpt = ac.AsyncCheckpointer()
        mgr = ac.CheckpointManager(tmp_path / "root")
        ckpt.save(tmp_path / "a", _state(2))  # in flight until the gate opens
        mgr.save(2, _state(2))
        # Two more saves block inside the objects' locks, waiting for those writes: fork
        # copies neither these threads nor the writer, so the child must not wait on them.
        blocked = [
            threading.Thread(target=lambda: ckpt.save(tmp_path / "b", _state(3))),
            threading.Thread(target=lambda: mgr.save(3, _state(3))),
        ]
        for t in blocked:
            t.start()
        _until_held(ckpt._lock)
        _until_held(getattr(mgr, "_lock", threading.Lock()))
        child = multiprocessing.get_context("fork").Process(
            target=_child_uses_inherited, args=(ckpt, mgr, tmp_path)
        )
        child.start()
        child.join(timeout=120)
        hung = child.is_alive()
        if hung:
            child.kill()
            child.join()
        fs.open_gate()
        for t in blocked:
            t.join(timeout=60)
        ckpt.close()
        mgr.close()
    assert not hung, "the forked child hung on its parent's checkpointer"
    assert child.exitcode == 0
    assert not _wrong(tmp_path / "child", 7)
    assert ac.CheckpointManager(tmp_path / "root").steps() == [1, 2, 3, 1000]


def test_readers_racing_retention_always_get_the_newest_complete_step(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with ac.CheckpointManager(root, keep_last=1, async_save=False) as first:
        first.save(0, _state(0))
    done = threading.Event()
    failures: list[str] = []

    def trainer() -> None:
        try:
            with ac.CheckpointManager(root, keep_last=1, async_save=False) as mgr:
                for step in range(1, 301):
                    mgr.save(step, _state(step))
        finally:
            done.set()

    def evaluator() -> None:
        reader = ac.CheckpointManager(root)
        calls = 0
        while not done.is_set() or calls < 50:
            calls += 1
            try:
                ckpt = reader.restore()
                if ckpt is None:
                    failures.append("restore() returned None")
                elif _values(ckpt) != {ckpt.training_state.step}:
                    failures.append(f"step {ckpt.training_state.step} holds {_values(ckpt)}")
                if calls % 10 == 0:
                    report = verify(root)
                    if not report["ok"]:
                        failures.append(f"verify: {report}")
                    with contextlib.redirect_stdout(io.StringIO()):
                        if cli.main(["ls", str(root)]) != 0:
                            failures.append("ls failed")
            except Exception as exc:  # every failure is collected
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=trainer), threading.Thread(target=evaluator)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def _values(ckpt: ac.Checkpoint) -> set[int]:
    return {int(v) for a in ckpt.model.values() for v in np.unique(a)}
