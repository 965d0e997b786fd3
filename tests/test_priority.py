"""A save's background threads run at lower CPU and I/O priority than the caller's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import fsops, hostcopy, pool, priority, snapshot, staging

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="per-thread nice and I/O priorities are Linux's"
)

#: A state large enough that the snapshot's copies go to the helper threads.
BIG = 4 * hostcopy.PARALLEL_MIN_BYTES
HELPER = "arrayckpt-helper-"


def _nice(tid: int) -> int:
    # Field 19 of /proc's stat, after the parenthesised command name (which may hold spaces).
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def _io(tid: int) -> str:
    """The thread's I/O priority as util-linux's ionice prints it."""
    return subprocess.run(
        ["ionice", "-p", str(tid)], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


def _expected_nice() -> int:
    return min(priority.MAX_NICE, os.getpriority(os.PRIO_PROCESS, os.getpid()) + 10)


def _here() -> tuple[str, int, int]:
    """This thread's name, nice value and native id."""
    tid = threading.get_native_id()
    return threading.current_thread().name, _nice(tid), tid


needs_ionice = pytest.mark.skipif(
    shutil.which("ionice") is None, reason="reads I/O priorities with util-linux's ionice"
)


class _Recording(fsops.FileSystem):
    """Records the thread that writes each safetensors file."""

    def __init__(self) -> None:
        self.writers: dict[str, tuple[str, int, int]] = {}

    def write_safetensors(self, path: Path, specs: Any, metadata: Any, **kw: Any) -> None:
        self.writers[path.name] = _here()
        super().write_safetensors(path, specs, metadata, **kw)


@pytest.fixture(autouse=True)
def _lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Background threads 10 levels down (the default, 0, leaves them alone)."""
    monkeypatch.setenv(priority.NICE_VAR, "10")


def test_the_default_leaves_priorities_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(priority.NICE_VAR)
    assert priority.nice_increment() == 0


@needs_ionice
def test_the_writer_and_the_second_writer_run_lowered_and_the_caller_does_not(
    tmp_path: Path,
) -> None:
    caller = threading.get_native_id()
    caller_nice, caller_io = _nice(caller), _io(caller)
    recording = _Recording()
    state = {"w": np.ones(1000, np.float32)}
    with fsops.use(recording), ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "c", state, state).result(timeout=60)
    writers = recording.writers
    assert writers["model.safetensors"][0] == "arrayckpt-writer"
    assert writers["optimizer.safetensors"][0] == "arrayckpt-second-writer"
    for name, nice, _ in writers.values():
        assert nice == _expected_nice(), name
    # The writer thread lives on; the second writer has ended, so ask the writer alone.
    assert _io(writers["model.safetensors"][2]) == "best-effort: prio 7"
    assert (_nice(caller), _io(caller)) == (caller_nice, caller_io)


def test_a_synchronous_save_writes_at_the_callers_priority(tmp_path: Path) -> None:
    recording = _Recording()
    state = {"w": np.ones(1000, np.float32)}
    with fsops.use(recording):
        ac.save_checkpoint(tmp_path / "c", state, state)
    caller_nice = _nice(threading.get_native_id())
    assert {nice for _, nice, _ in recording.writers.values()} == {caller_nice}


def _record_copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    seen: list[tuple[str, int, int]] = []
    copy_all = hostcopy._copy_all

    def recorded(pieces: list[hostcopy.Copy]) -> None:
        seen.append(_here())
        copy_all(pieces)

    monkeypatch.setattr(hostcopy, "_copy_all", recorded)
    monkeypatch.setattr(pool, "threads", lambda: 2)
    return seen


def test_background_staging_copies_lowered_and_stall_copies_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record_copies(monkeypatch)
    state = {"w": np.ones(BIG, np.uint8)}
    caller_nice = _nice(threading.get_native_id())
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "a", state).result(timeout=60)
        stall, seen[:] = list(seen), []
        ckpt.save(tmp_path / "b", state, background_staging=True).result(timeout=60)
        staged = list(seen)
    # Both ran on the copying thread and on a helper; only the background copies lowered,
    # on helpers of their own.
    assert {name.rstrip("0123456789") for name, _, _ in stall} == {"MainThread", HELPER}
    assert {nice for _, nice, _ in stall} == {caller_nice}
    assert {name.rstrip("0123456789") for name, _, _ in staged} == {"arrayckpt-stage", HELPER}
    assert {nice for _, nice, _ in staged} == {_expected_nice()}
    assert not {tid for *_, tid in stall} & {tid for *_, tid in staged}


def test_the_warm_up_thread_runs_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, int]] = []
    fault_in = staging.prefault

    def recorded(buf: np.ndarray) -> None:
        seen.append(_here())
        fault_in(buf)

    monkeypatch.setattr(staging, "prefault", recorded)
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.prepare({"w": np.ones(BIG, np.uint8)}).result(timeout=60)
    assert [(name, nice) for name, nice, _ in seen] == [("arrayckpt-warm", _expected_nice())]


def test_zero_leaves_a_background_thread_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(priority.NICE_VAR, "0")
    future = pool.in_own_thread(priority.background(_here), "arrayckpt-test")
    assert future.result(timeout=30)[1] == _nice(threading.get_native_id())


@pytest.mark.parametrize("value", ["-1", "20", "low", "2.5"])
def test_a_bad_nice_value_fails_the_save_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(priority.NICE_VAR, value)
    state = {"w": np.ones(4, np.float32)}
    with ac.AsyncCheckpointer() as ckpt:
        for background_staging in (False, True):
            with pytest.raises(ac.InvalidInputError, match=rf"{priority.NICE_VAR}='{value}'"):
                ckpt.save(tmp_path / "c", state, background_staging=background_staging)
        with pytest.raises(ac.InvalidInputError, match=priority.NICE_VAR):
            ckpt.prepare(state)
    assert not (tmp_path / "c").exists()


def test_the_stage_thread_is_not_started_when_the_value_is_bad(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(priority.NICE_VAR, "x")
    before = {t.name for t in threading.enumerate()}
    pending = snapshot.start_snapshot(
        {"w": np.ones(4, np.float32)}, None, None, staging=staging.StagingPool()
    )
    with pytest.raises(ac.InvalidInputError):
        snapshot.finish_in_background(pending)
    assert "arrayckpt-stage" not in {t.name for t in threading.enumerate()} - before


def test_helpers_started_at_another_setting_still_lower_each_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background helper pool is shared: started by a save at the default (0), its
    threads must still run a later save's copies at that save's nice value."""
    monkeypatch.delenv(priority.NICE_VAR)
    with ac.AsyncCheckpointer() as ckpt:  # may start the background pool, unlowered
        ckpt.save(tmp_path / "a", {"w": np.ones(BIG, np.uint8)}, background_staging=True)
    monkeypatch.setenv(priority.NICE_VAR, "10")
    seen = _record_copies(monkeypatch)
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "b", {"w": np.ones(BIG, np.uint8)}, background_staging=True)
    helpers = [nice for name, nice, _ in seen if name.startswith(HELPER)]
    assert helpers and set(helpers) == {_expected_nice()}
