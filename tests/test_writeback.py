"""Early writeback: the flusher asks the kernel to write new files' pages while they are
being written, leaves other files alone, and is gone when the block ends."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import writeback

needs_sync_file_range = pytest.mark.skipif(
    writeback.sync_file_range is None, reason="sync_file_range exists on Linux only"
)


class Recorder:
    """Stands in for ``sync_file_range``: records which file each call named, then calls
    the real function so the flusher's path is exercised end to end."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.paths: list[str] = []
        self.called = threading.Event()

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> int:
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.called.set()
        return int(self.real(fd, offset, nbytes, flags))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder(writeback.sync_file_range)
    monkeypatch.setattr(writeback, "sync_file_range", rec)
    return rec


def _flusher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "arrayckpt-writeback"]


@needs_sync_file_range
def test_new_files_are_flushed_and_old_ones_left_alone(tmp_path: Path, recorder: Recorder) -> None:
    (tmp_path / "old").write_bytes(b"x" * 100)
    with writeback.early_writeback(tmp_path, writeback.MIN_BYTES):
        (tmp_path / "new").write_bytes(b"y" * 4096)
        assert recorder.called.wait(10), "the flusher never ran"
        assert _flusher_threads()
    assert not _flusher_threads()
    assert set(recorder.paths) == {str(tmp_path / "new")}


@needs_sync_file_range
def test_a_file_renamed_while_written_is_followed(tmp_path: Path, recorder: Recorder) -> None:
    # What the safetensors writer does: a temporary name, renamed into place at the end.
    with writeback.early_writeback(tmp_path, writeback.MIN_BYTES):
        (tmp_path / ".tmp1").write_bytes(b"y" * 4096)
        assert recorder.called.wait(10)
        os.rename(tmp_path / ".tmp1", tmp_path / "final")
        count = len(recorder.paths)
        deadline = time.monotonic() + 10
        while len(recorder.paths) == count and time.monotonic() < deadline:
            time.sleep(0.005)
    assert recorder.paths[-1] == str(tmp_path / "final")


def test_small_writes_start_no_flusher(tmp_path: Path, recorder: Recorder) -> None:
    with writeback.early_writeback(tmp_path, writeback.MIN_BYTES - 1):
        assert not _flusher_threads()
        (tmp_path / "new").write_bytes(b"y")
        time.sleep(5 * writeback.INTERVAL_S)
    assert recorder.paths == []


def test_without_sync_file_range_nothing_happens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writeback, "sync_file_range", None)
    with writeback.early_writeback(tmp_path):
        assert not _flusher_threads()


@needs_sync_file_range
def test_the_flusher_stops_when_the_block_raises(tmp_path: Path, recorder: Recorder) -> None:
    with pytest.raises(OSError, match="disk full"), writeback.early_writeback(tmp_path):
        (tmp_path / "new").write_bytes(b"y")
        assert recorder.called.wait(10)
        raise OSError("disk full")
    assert not _flusher_threads()
    assert not any(
        os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
        for fd in map(int, os.listdir("/proc/self/fd"))
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


@needs_sync_file_range
def test_a_save_flushes_its_files_while_writing_and_round_trips(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writeback, "MIN_BYTES", 1 << 20)
    import safetensors

    real_serialize = safetensors.serialize_file

    def slow_serialize(*args: Any, **kw: Any) -> None:
        # A write this small can end before the flusher's first turn; wait for it.
        real_serialize(*args, **kw)
        recorder.called.wait(10)

    monkeypatch.setattr(safetensors, "serialize_file", slow_serialize)
    state = {f"w{i}": np.full(1 << 18, i, np.float32) for i in range(8)}  # 8 MiB
    ac.save_checkpoint(tmp_path / "ckpt", state)
    loaded = ac.load_checkpoint(tmp_path / "ckpt").model
    assert all(np.array_equal(loaded[k], v) for k, v in state.items())
    assert recorder.paths, "the flusher never ran during the save"
    assert all(Path(p).parent.name.startswith(".ckpt.arrayckpt-tmp") for p in recorder.paths)
    assert not _flusher_threads()
