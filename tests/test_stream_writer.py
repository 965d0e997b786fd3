"""The streaming writer (`fsops.write_image`) and the parallel eager reader: standard
files equivalent to safetensors' own, short and failed writes, checksums while reading."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from safetensors import safe_open
from strategies import assert_same_array, states

import arrayckpt as ac
from arrayckpt import format as fmt
from arrayckpt.layout import MODEL_FILE
from arrayckpt.snapshot import take_snapshot


def _header_json(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + n]))


def _serialize_file(path: Path, tensors: dict[str, Any], meta: dict[str, str]) -> None:
    """What safetensors' own writer makes of the same host buffers and metadata."""
    specs = {
        name: safetensors.TensorSpec(
            dtype=t.dtype.name,
            shape=list(t.data.shape),
            data_ptr=t.data.__array_interface__["data"][0],
            data_len=t.data.nbytes,
        )
        for name, t in tensors.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=meta)


def _load_numpy(path: Path) -> dict[str, np.ndarray] | type[Exception]:
    try:
        return safetensors.numpy.load_file(str(path))
    except Exception as exc:  # dtypes safetensors' NumPy front end lacks (BF16, F8)
        return type(exc)


@settings(max_examples=40, deadline=None)
@given(state=states(max_size=6))
def test_files_are_equivalent_to_serialize_files(
    tmp_path_factory: pytest.TempPathFactory, state: dict[str, np.ndarray]
) -> None:
    """Every safetensors reader sees in our file what it sees in serialize_file's of the
    same state: the same header (entries and metadata, as JSON), the same bytes per
    tensor, the same arrays from safetensors.numpy; and our checksums verify."""
    d = tmp_path_factory.mktemp("eq")
    tensors = take_snapshot(state, None, None, staging=None).model
    ours = d / "ours.safetensors"
    fmt.write_file(ours, tensors, {"k": "v"})
    meta = _header_json(ours)["__metadata__"]
    theirs = d / "theirs.safetensors"
    _serialize_file(theirs, tensors, meta)

    a, b = _header_json(ours), _header_json(theirs)
    assert a["__metadata__"] == b["__metadata__"]
    assert set(a) == set(b)
    for path in (ours, theirs):
        with safe_open(str(path), framework="numpy") as f:
            assert set(f.keys()) == set(state)
            assert f.metadata() == meta
    reader, other = fmt.SafetensorsReader(ours), fmt.SafetensorsReader(theirs)
    for name in state:
        ea, eb = reader.header.entries[name], other.header.entries[name]
        assert (ea.dtype, ea.shape) == (eb.dtype, eb.shape)
        assert bytes(reader.raw(name)) == bytes(other.raw(name))
        reader.verify(name)  # the CRC recorded is that of the bytes written
        assert ea.start % max(1, ea.dtype.itemsize) == 0  # aligned
    got, expected = _load_numpy(ours), _load_numpy(theirs)
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys()
        for name in expected:
            assert_same_array(got[name], expected[name], name)
    else:
        assert got is expected


def test_torch_and_numpy_states_write_the_same_bytes(tmp_path: Path) -> None:
    """Arrays of any framework reach the writer as host buffers: one path, one file."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.random((64, 33), dtype=np.float32) for i in range(5)}
    state["ids"] = np.arange(7, dtype=np.int64)
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "np", state).result()
        ckpt.save(tmp_path / "pt", {k: torch.from_numpy(v) for k, v in state.items()}).result()
    assert (tmp_path / "np" / MODEL_FILE).read_bytes() == (
        tmp_path / "pt" / MODEL_FILE
    ).read_bytes()


def test_short_writes_are_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may write less than asked (a signal, a nearly full disk): the rest follows."""
    real = os.writev
    calls = []

    def short(fd: int, buffers: list[Any]) -> int:
        calls.append(len(buffers))
        first = memoryview(buffers[0]).cast("B")
        return real(fd, [first[: max(1, len(first) // 3)], *buffers[1:2]])

    monkeypatch.setattr(os, "writev", short)
    rng = np.random.default_rng(1)
    state = {f"t{i}": rng.random(n) for i, n in enumerate([3, 0, 1000, 1 << 18, 5])}
    path = ac.save_checkpoint(tmp_path / "c", state)
    monkeypatch.setattr(os, "writev", real)
    assert len(calls) > len(state)
    got = ac.load_checkpoint(path).model
    for name, a in state.items():
        assert_same_array(got[name], a, name)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "c"
    ac.save_checkpoint(target, {"w": np.ones(4, np.float32)})
    real = os.writev
    count = [0]

    def full(fd: int, buffers: list[Any]) -> int:
        count[0] += 1
        if count[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", full)
    big = {f"t{i}": np.full(1 << 18, i, np.float32) for i in range(4)}
    with pytest.raises(ac.CheckpointWriteError) as info:
        ac.save_checkpoint(target, big)
    monkeypatch.setattr(os, "writev", real)
    assert "No space left" in str(info.value) or isinstance(info.value.__cause__, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert_same_array(ac.load_checkpoint(target).model["w"], np.ones(4, np.float32))


def test_layout_text_is_reused_between_saves(tmp_path: Path) -> None:
    """The header text of an unchanged layout is built once (W2: 20,000 entries)."""
    fmt._layout_text.cache_clear()
    state = {f"p{i}": np.full(16, i, np.float32) for i in range(50)}
    for step in range(3):
        ac.save_checkpoint(tmp_path / f"s{step}", state, training_state=ac.TrainingState(step))
    info = fmt._layout_text.cache_info()
    assert info.misses == 1 and info.hits >= 2


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("piece", [64, 4096, 1 << 20])
def test_eager_reads_in_pieces_verify_split_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str, piece: int
) -> None:
    """Pieces read by several threads; a tensor spread over many pieces gets the CRC of
    the whole (combined from its parts), and a flipped bit in its last part is found."""
    monkeypatch.setenv("ARRAYCKPT_THREADS", threads)
    monkeypatch.setattr(fmt, "_READ_CHUNK", piece)
    rng = np.random.default_rng(2)
    state = {
        "big": rng.random(70_001),
        "empty": np.empty((0, 3), np.float32),
        "small": np.arange(5, dtype=np.int16),
        "mid": rng.random(3000).astype(np.float32),
    }
    ckpt = ac.save_checkpoint(tmp_path / "c", state)
    path = ckpt / MODEL_FILE
    reader = fmt.SafetensorsReader(path, mmap=False, verify_while_reading=True)
    assert set(reader._computed) == set(state)
    for name, a in state.items():
        assert_same_array(reader.array(name), a, name)
    e = reader.header.entries["big"]
    blob = bytearray(path.read_bytes())
    blob[e.end - 3] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ac.CorruptCheckpointError, match="'big' fails its CRC32C"):
        ac.load_checkpoint(ckpt, mmap=False)
    got = ac.load_checkpoint(ckpt, mmap=False, verify=False).model
    assert_same_array(got["mid"], state["mid"], "mid")


def test_crc32c_combine_matches_one_pass() -> None:
    import crc32c

    rng = np.random.default_rng(3)
    for n1, n2 in [(0, 0), (1, 0), (0, 7), (100, 3), (4096, (1 << 20) + 5)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        seed = crc32c.crc32c(b"F32:3")
        combined = fmt.crc32c_combine(crc32c.crc32c(a, seed), crc32c.crc32c(b), n2)
        assert combined == crc32c.crc32c(a + b, seed)
