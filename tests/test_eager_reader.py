"""The parallel eager reader (`SafetensorsReader` with ``mmap=False``): how it cuts a file
into pieces, and that it never waits for a helper thread that has nothing to read."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import assert_same_array

import arrayckpt as ac
from arrayckpt import dtypes, pool
from arrayckpt import format as fmt
from arrayckpt.errors import CheckpointReadError
from arrayckpt.format import Entry


def _entries(sizes: list[int], start: int) -> list[Entry]:
    out, at = [], start
    for i, n in enumerate(sizes):
        out.append(Entry(f"t{i}", dtypes.by_code("U8"), (n,), at, at + n))
        at += n
    return out


@given(
    sizes=st.lists(st.integers(0, 50), max_size=12),
    start=st.integers(0, 20),
    step=st.integers(1, 16),
)
def test_pieces_cover_the_range_and_cut_large_tensors_from_their_start(
    sizes: list[int], start: int, step: int
) -> None:
    entries = _entries(sizes, start)
    end = start + sum(sizes)
    pieces = fmt._plan_pieces(entries, start, end, step)
    # the pieces tile [start, end), none larger than a step
    assert pieces[0][0] == start and pieces[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    assert all(hi - lo <= step for lo, hi, _ in pieces)
    parts = {e.name: [] for e in entries}
    for lo, hi, inside in pieces:
        for name, a, b, seed, whole in inside:
            assert lo <= a <= b <= hi
            parts[name].append((a, b, seed, whole))
    for e in entries:
        got = parts[e.name]
        # each tensor: its parts in order, covering it exactly; the seed on the first only
        assert got[0][0] == e.start and got[-1][1] == e.end
        assert all(x[1] == y[0] for x, y in itertools.pairwise(got))
        assert got[0][2] == fmt.checksum_seed("U8", e.shape)
        assert all(p[2] == 0 for p in got[1:])
        assert (len(got) == 1) == got[0][3]
        if e.end - e.start > step:  # cut from its own start: whole steps, then the rest
            assert all(b - a == step for a, b, _, _ in got[:-1])


def test_no_tensors_means_plain_steps() -> None:
    assert [p[:2] for p in fmt._plan_pieces([], 10, 35, 10)] == [(10, 20), (20, 30), (30, 35)]
    assert [p[:2] for p in fmt._plan_pieces([], 10, 10, 10)] == [(10, 10)]


def test_split_tensors_of_one_shape_combine_with_few_shift_lengths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new length costs tens of microseconds in Python: tensors of one shape (a
    transformer's layers) must not each bring their own."""
    monkeypatch.setattr(fmt, "_READ_CHUNK", 4096)
    state = {f"layer{i}": np.full(2500, i, np.float32) for i in range(12)}  # 10,000 bytes
    state["bias"] = np.ones(3, np.float32)  # shifts every layer against the pieces
    ckpt = ac.save_checkpoint(tmp_path / "c", state)
    fmt._crc_shift.cache_clear()
    got = ac.load_checkpoint(ckpt, mmap=False).model
    for name, a in state.items():
        assert_same_array(got[name], a, name)
    assert fmt._crc_shift.cache_info().currsize <= 2  # a whole piece, and the rest


@pytest.mark.parametrize("threads", ["2", "4"])
def test_eager_read_does_not_wait_for_helpers_that_have_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str
) -> None:
    """Before: every helper's job was waited for, so a helper whose core was busy with
    another process held the whole read until it ran, only to find nothing left to read.
    Here every helper thread is held by other work: the read must finish on this one."""
    monkeypatch.setenv("ARRAYCKPT_THREADS", threads)
    monkeypatch.setattr(fmt, "_READ_CHUNK", 1 << 12)
    state = {f"t{i}": np.random.default_rng(i).random(3000) for i in range(8)}
    ckpt = ac.save_checkpoint(tmp_path / "c", state)
    helpers = pool.executor()
    release = threading.Event()
    held = [helpers.submit(release.wait) for _ in range(helpers.size)]
    timer = threading.Timer(5, release.set)  # the old reader waited until this
    timer.start()
    try:
        done = ac.load_checkpoint(ckpt, mmap=False).model
        finished_while_held = not release.is_set()
    finally:
        timer.cancel()
        release.set()
        for f in held:
            f.result()
    assert finished_while_held
    for name, a in state.items():
        assert_same_array(done[name], a, name)


def test_a_failed_piece_stops_the_read_and_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARRAYCKPT_THREADS", "3")
    monkeypatch.setattr(fmt, "_READ_CHUNK", 1 << 12)
    state = {f"t{i}": np.arange(3000, dtype=np.float64) + i for i in range(6)}
    ckpt = ac.save_checkpoint(tmp_path / "c", state)
    from arrayckpt import fsops

    calls = []

    class Failing(fsops.FileSystem):
        def read_into(self, fd, path, ranges, out):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 3:
                raise OSError(5, "Input/output error")
            super().read_into(fd, path, ranges, out)

    with fsops.use(Failing()), pytest.raises(CheckpointReadError, match=r"model\.safetensors"):
        ac.load_checkpoint(ckpt, mmap=False)
    got = ac.load_checkpoint(ckpt, mmap=False).model  # and the pool is still usable
    assert_same_array(got["t5"], state["t5"], "t5")


@pytest.mark.parametrize("pad", [0, 100, 4096 - 8])
def test_eager_buffer_sits_in_memory_as_the_data_sits_in_the_file(tmp_path: Path, pad: int) -> None:
    """Before: NumPy's buffer started 16 bytes into a page whatever the file's layout, and
    the kernel's copy of a 4096-aligned file (direct writes) into it ran 25-35 % slower."""
    state = {"w": np.arange(1 << 19, dtype=np.float32), "b": np.ones(3, np.int16)}
    path = ac.save_checkpoint(tmp_path / "c", state) / "model.safetensors"
    blob = path.read_bytes()
    start = 8 + int.from_bytes(blob[:8], "little")
    header = blob[8:start].rstrip(b" ")
    header += b" " * (pad + (-(8 + len(header) + pad) % 8))  # keep the data 8-aligned
    path.write_bytes(len(header).to_bytes(8, "little") + header + blob[start:])
    reader = fmt.SafetensorsReader(path, mmap=False, verify_while_reading=True)
    page = fmt._PAGE
    assert reader._buf.ctypes.data % page == reader.header.data_start % page
    assert_same_array(reader.array("w"), state["w"], "w")
    assert_same_array(reader.array("b"), state["b"], "b")
    e = reader.header.entries["w"]
    alone = fmt.SafetensorsReader(path, mmap=False, ranges=True)._read_one(e)
    assert alone.ctypes.data % page == e.start % page
