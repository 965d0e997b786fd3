"""Early writeback: a save asks the kernel to start writing each stretch of a large file
as soon as it is written, and a small file is left to the fsync."""

from __future__ import annotations

import itertools
import os
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
    """Stands in for ``sync_file_range``: records which file and range each call named,
    then calls the real function so the path is exercised end to end."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> int:
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes))
        return int(self.real(fd, offset, nbytes, flags))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder(writeback.sync_file_range)
    monkeypatch.setattr(writeback, "sync_file_range", rec)
    return rec


@needs_sync_file_range
def test_a_large_save_starts_writeback_stretch_by_stretch_and_round_trips(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writeback, "MIN_BYTES", 1 << 20)
    monkeypatch.setattr(writeback, "STEP_BYTES", 1 << 20)
    state = {f"w{i}": np.full(1 << 18, i, np.float32) for i in range(8)}  # 8 MiB
    ac.save_checkpoint(tmp_path / "ckpt", state)
    loaded = ac.load_checkpoint(tmp_path / "ckpt").model
    assert all(np.array_equal(loaded[k], v) for k, v in state.items())
    files = {Path(p).name for p, _, _ in recorder.calls}
    assert files == {"model.safetensors"}
    assert all(Path(p).parent.name.startswith(".ckpt.arrayckpt-tmp") for p, _, _ in recorder.calls)
    # consecutive stretches, each asked for once, covering the data as it was written
    ranges = [(offset, n) for _, offset, n in recorder.calls]
    assert len(ranges) >= 7
    assert ranges[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
    assert all(n >= 1 << 20 for _, n in ranges)


@needs_sync_file_range
def test_small_files_start_no_writeback(tmp_path: Path, recorder: Recorder) -> None:
    ac.save_checkpoint(tmp_path / "ckpt", {"w": np.ones(1 << 16, np.float32)})
    assert recorder.calls == []


def test_without_sync_file_range_nothing_happens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writeback, "sync_file_range", None)
    monkeypatch.setattr(writeback, "MIN_BYTES", 1)
    monkeypatch.setattr(writeback, "STEP_BYTES", 1)
    state = {"w": np.arange(1 << 18, dtype=np.float32)}
    ac.save_checkpoint(tmp_path / "ckpt", state)
    assert np.array_equal(ac.load_checkpoint(tmp_path / "ckpt").model["w"], state["w"])


@needs_sync_file_range
def test_streamed_files_start_writeback_too(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`FileSystem.write_chunks` (consolidation, HF export) starts the disk early as well."""
    from arrayckpt import fsops

    monkeypatch.setattr(writeback, "STEP_BYTES", 1 << 16)
    path = tmp_path / "f.bin"
    fsops.fs().write_chunks(path, (bytes(1 << 16) for _ in range(4)))
    assert path.stat().st_size == 1 << 18
    assert [(o, n) for _, o, n in recorder.calls] == [(i << 16, 1 << 16) for i in range(4)]
