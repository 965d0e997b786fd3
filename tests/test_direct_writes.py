"""Direct (``O_DIRECT``) writes of large files (`arrayckpt.direct`): standard files, the
same arrays as a buffered write, checksums of the bytes written, page-aligned staging
written as it is, errors of the I/O thread raised in the save, and the buffered fallback.

Every test lowers `direct.MIN_BYTES` so that small files take the direct path."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from strategies import assert_same_array

import arrayckpt as ac
from arrayckpt import direct, fsops
from arrayckpt import format as fmt
from arrayckpt.errors import InvalidInputError
from arrayckpt.layout import MODEL_FILE
from arrayckpt.snapshot import take_snapshot
from arrayckpt.staging import StagingPool

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _direct_supported(path: Path) -> bool:
    fd = os.open(path / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return direct.enable(fd)
    finally:
        os.close(fd)
        os.unlink(path / "probe")


@pytest.fixture
def direct_writes(tmp_path: Path) -> Iterator[None]:
    """Every file written directly, on a file system that supports it."""
    if not direct.wanted(direct.MIN_BYTES, 1) or not _direct_supported(tmp_path):
        pytest.skip("the temporary directory's file system has no O_DIRECT (tmpfs?)")
    with (
        mock.patch.object(direct, "MIN_BYTES", 0),
        mock.patch.object(direct, "MIN_MEAN_BYTES", 0),
    ):
        yield


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _check_file(path: Path, state: dict[str, np.ndarray]) -> None:
    """Every reader sees ``state`` in ``path``, and our checksums verify."""
    got = safetensors.numpy.load_file(str(path))
    assert got.keys() == state.keys()
    for name, a in state.items():
        assert_same_array(got[name], a, name)
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(state)
    reader = fmt.SafetensorsReader(path)
    for name in state:
        reader.verify(name)


# Sizes around the block and the request size, and the offsets a view may start at.
_SIZES = st.sampled_from([0, 1, 7, 4095, 4096, 4097, 8192 + 12, 3 << 20, (8 << 20) + 4100])
_DTYPES = st.sampled_from([np.uint8, np.float32, np.float64, np.int16])


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(_DTYPES))
    n = draw(_SIZES) // dtype.itemsize
    data = np.arange(n, dtype=np.uint64).astype(dtype)
    where = draw(st.sampled_from(["numpy", "page", "page+8"]))
    if where == "numpy":
        return data
    # A page-aligned buffer (as the staging pool's), or 8 bytes past a page.
    skip = 0 if where == "page" else 8
    base = direct.aligned_empty(data.nbytes + skip + 1)
    view = base[skip : skip + data.nbytes].view(dtype)
    view[...] = data
    return view


@settings(max_examples=30, deadline=None)
@given(arrays=st.lists(_arrays(), min_size=1, max_size=6), private=st.booleans())
def test_direct_files_hold_the_same_arrays(
    tmp_path_factory: pytest.TempPathFactory, arrays: list[np.ndarray], private: bool
) -> None:
    """Whatever the sizes and the alignment of the buffers, a direct write makes a
    standard file of the exact length whose data starts on a block, holding the arrays;
    the same tensors written through the page cache read back the same."""
    d = tmp_path_factory.mktemp("direct")
    if not _direct_supported(d):
        pytest.skip("no O_DIRECT here")
    state = {f"t{i}": a for i, a in enumerate(arrays)}
    tensors = take_snapshot(state, None, None, staging=None).model
    with (
        mock.patch.object(direct, "MIN_BYTES", 0),
        mock.patch.object(direct, "MIN_MEAN_BYTES", 0),
    ):
        image = fmt.file_image(tensors, {"k": "v"})
        assert fsops.write_image(d / "direct.safetensors", image, private=private) is private
    with mock.patch.object(direct, "MIN_BYTES", 1 << 62):
        fsops.write_image(d / "buffered.safetensors", fmt.file_image(tensors, {"k": "v"}))
    path = d / "direct.safetensors"
    assert _header_length(path) % direct.BLOCK == 0
    assert path.stat().st_size == _header_length(path) + sum(a.nbytes for a in arrays)
    _check_file(path, state)
    a, b = fmt.SafetensorsReader(path), fmt.SafetensorsReader(d / "buffered.safetensors")
    assert a.header.metadata == b.header.metadata
    assert a.header.checksums == b.header.checksums
    for name in state:
        assert bytes(a.raw(name)) == bytes(b.raw(name))


def test_header_padding_is_json_whitespace(tmp_path: Path, direct_writes: None) -> None:
    """The header of a direct file is the buffered one's JSON, padded with spaces."""
    state = {"w": np.arange(10_000, dtype=np.float32), "b": np.ones(3, np.float64)}
    ac.save_checkpoint(tmp_path / "a", state)
    path = tmp_path / "a" / MODEL_FILE
    data = path.read_bytes()
    n = _header_length(path)
    text = data[8:n]
    assert n % direct.BLOCK == 0
    assert text.rstrip(b" ") != text  # padded
    assert set(json.loads(text)) == {"__metadata__", "w", "b"}


def test_page_aligned_staging_is_written_where_it_is(tmp_path: Path, direct_writes: None) -> None:
    """The staging pool's buffers are page-aligned, so an asynchronous save of large
    arrays copies nothing into bounce buffers (only the small ones' bytes)."""
    pool = StagingPool()
    big = np.zeros(1 << 20, np.float32)
    assert pool.take(big.nbytes).ctypes.data % direct.BLOCK == 0
    copied: list[int] = []
    real = direct.DirectSink._copy

    def spy(self: direct.DirectSink, data: memoryview, seed: int) -> int:
        copied.append(len(data))
        return real(self, data, seed)

    state = {f"w{i}": np.full(1 << 20, i, np.float32) for i in range(3)}
    with mock.patch.object(direct.DirectSink, "_copy", spy), ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "a", state).result()
    assert sum(copied) == 0
    got = ac.load_checkpoint(tmp_path / "a").model
    for name, a in state.items():
        np.testing.assert_array_equal(got[name], a)


def test_a_synchronous_save_checksums_what_it_wrote(tmp_path: Path, direct_writes: None) -> None:
    """A synchronous save reads the caller's arrays in place; written directly, every
    byte passes through a bounce buffer and is checksummed there, so the file agrees
    with its checksums even while another thread changes the arrays, and the save does
    not read the file back."""
    w = np.zeros(4 << 20, np.float32)
    stop = threading.Event()

    def scribble() -> None:
        i = 0
        while not stop.is_set():
            w[i % w.size :: 4096] += 1
            i += 1

    thread = threading.Thread(target=scribble)
    thread.start()
    try:
        with mock.patch.object(fmt, "_file_consistent", side_effect=AssertionError("read")):
            ac.save_checkpoint(tmp_path / "a", {"w": w})
    finally:
        stop.set()
        thread.join()
    reader = fmt.SafetensorsReader(tmp_path / "a" / MODEL_FILE)
    reader.verify("w")


def test_in_place_arrays_of_a_budgeted_save_are_copied_before_release(
    tmp_path: Path, direct_writes: None
) -> None:
    """Arrays a save within a staging budget writes in place are the caller's: the
    caller may change them once ``save`` returns, so their bytes are copied out first."""
    state = {}
    for i in range(8):  # page-aligned, as direct writes could take them where they are
        state[f"w{i}"] = direct.aligned_empty(4 << 20).view(np.float32)
        state[f"w{i}"][:] = i
    expected = {k: v.copy() for k, v in state.items()}
    with ac.AsyncCheckpointer(max_staging_bytes=4 << 20) as ckpt:
        future = ckpt.save(tmp_path / "a", state)
        for a in state.values():
            a += 100
        future.result()
    got = ac.load_checkpoint(tmp_path / "a").model
    for name, a in expected.items():
        np.testing.assert_array_equal(got[name], a)


def test_buffered_where_the_file_system_refuses_direct_writes(
    tmp_path: Path, direct_writes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without O_DIRECT (tmpfs before Linux 6.6, some network file
    systems) refuses the flag with EINVAL: the file is written through the page cache."""
    real = fcntl.fcntl

    def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(direct.fcntl, "fcntl", no_direct)
    state = {"w": np.arange(1 << 18, dtype=np.float32), "b": np.ones(3)}
    ac.save_checkpoint(tmp_path / "a", state)
    path = tmp_path / "a" / MODEL_FILE
    assert _header_length(path) % direct.BLOCK != 0  # safetensors' 8-byte padding only
    _check_file(path, state)


def test_files_of_many_small_tensors_are_written_buffered(tmp_path: Path) -> None:
    """Small tensors gather better through ``writev``: a large file of them is buffered."""
    with (
        mock.patch.object(direct, "MIN_BYTES", 0),
    ):
        ac.save_checkpoint(
            tmp_path / "small", {f"t{i}": np.ones(1024, np.float32) for i in range(64)}
        )
        ac.save_checkpoint(tmp_path / "large", {"w": np.ones(1 << 20, np.float32)})
    assert _header_length(tmp_path / "small" / MODEL_FILE) % direct.BLOCK != 0
    if _direct_supported(tmp_path):
        assert _header_length(tmp_path / "large" / MODEL_FILE) % direct.BLOCK == 0


def test_default_thresholds_write_tens_of_megabytes_directly(tmp_path: Path) -> None:
    """The defaults, unpatched: a buffered write fills cold page-cache pages on a virtual
    machine that returns freed memory to its host (`direct.MIN_BYTES`), so a save of
    16 MiB of large tensors goes direct, asynchronous or not; 8 MiB stays buffered."""
    if not direct.wanted(direct.MIN_BYTES, 1) or not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT here")
    large = {f"w{i}": np.full(1 << 20, i, np.float32) for i in range(4)}  # 16 MiB
    small = {f"w{i}": np.full(1 << 19, i, np.float32) for i in range(4)}  # 8 MiB
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "async", large).result()
    ac.save_checkpoint(tmp_path / "sync", large)
    ac.save_checkpoint(tmp_path / "small", small)
    assert _header_length(tmp_path / "async" / MODEL_FILE) % direct.BLOCK == 0
    assert _header_length(tmp_path / "sync" / MODEL_FILE) % direct.BLOCK == 0
    assert _header_length(tmp_path / "small" / MODEL_FILE) % direct.BLOCK != 0
    for name, state in (("async", large), ("sync", large), ("small", small)):
        _check_file(tmp_path / name / MODEL_FILE, state)


def test_the_switch_turns_direct_writes_off(
    tmp_path: Path, direct_writes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(direct.ENV_VAR, "0")
    state = {"w": np.arange(1 << 18, dtype=np.float32)}
    ac.save_checkpoint(tmp_path / "a", state)
    assert _header_length(tmp_path / "a" / MODEL_FILE) % direct.BLOCK != 0
    monkeypatch.setenv(direct.ENV_VAR, "sometimes")
    with pytest.raises(InvalidInputError, match=direct.ENV_VAR):
        ac.save_checkpoint(tmp_path / "b", state)


_FILE_SIZE_LIMIT = """
import resource, signal, sys
import numpy as np
import arrayckpt as ac
from arrayckpt import direct

direct.MIN_BYTES = direct.MIN_MEAN_BYTES = 0
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, 32 << 20))
state = {f"w{i}": np.full(4 << 20, i, np.float32) for i in range(4)}  # 64 MiB
with ac.AsyncCheckpointer() as ckpt:
    try:
        ckpt.save(sys.argv[1], state).result()
    except ac.CheckpointWriteError as exc:
        print("failed:", exc.__cause__.errno)
"""


def test_a_failed_direct_write_fails_the_save_and_commits_nothing(
    tmp_path: Path, direct_writes: None
) -> None:
    """A write that fails on the I/O thread (here: past the process's file-size limit)
    fails the save: nothing is committed and no partial file is left."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FILE_SIZE_LIMIT), str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert result.returncode == 0, result.stderr
    assert "failed: 27" in result.stdout  # EFBIG
    assert not (tmp_path / "a").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
