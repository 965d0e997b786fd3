"""`format.write_file`: checksums computed while writing are patched into the header."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from arrayckpt import format as fmt
from arrayckpt import fsops
from arrayckpt.checkpoint import take_snapshot

NAMES = ["plain", 'quote"d', "back\\slash", "ünïcödé/层", "tab\tand\nnewline", "\x01ctl", "\x7f"]


def _tensors(names: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal(1 + i * 97).astype(np.float32) for i, n in enumerate(names)}
    return take_snapshot(state, None, None, staging=None).model


@pytest.mark.parametrize("names", [NAMES, ["only"], []], ids=["odd-names", "one", "none"])
def test_written_checksums_verify_and_files_stay_standard(tmp_path: Path, names: list[str]) -> None:
    tensors = _tensors(names)
    path = tmp_path / "m.safetensors"
    fmt.write_file(path, tensors)
    reader = fmt.SafetensorsReader(path)
    assert reader.header.checksums is not None
    for name, t in tensors.items():
        assert reader.header.checksums[name] == fmt.checksum(t.bytes())
        np.testing.assert_array_equal(reader.array(name), t.data)
    assert set(safetensors.numpy.load_file(str(path))) == set(names)


class CountingFS(fsops.FileSystem):
    def __init__(self) -> None:
        self.writes = 0
        self.patches = 0

    def write_safetensors(self, path: Path, specs: Any, metadata: Any) -> None:
        self.writes += 1
        super().write_safetensors(path, specs, metadata)

    def write_range(self, path: Path, offset: int, data: bytes) -> None:
        self.patches += 1
        super().write_range(path, offset, data)


def test_checksums_are_patched_in_place_not_written_twice(tmp_path: Path) -> None:
    fs = CountingFS()
    with fsops.use(fs):
        fmt.write_file(tmp_path / "m.safetensors", _tensors(NAMES))
    assert (fs.writes, fs.patches) == (1, 1)


def test_a_header_that_cannot_be_patched_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmt, "_patch_header", lambda *a: False)
    fs = CountingFS()
    path = tmp_path / "m.safetensors"
    with fsops.use(fs):
        fmt.write_file(path, _tensors(["a", "b"]))
    assert fs.writes == 2
    reader = fmt.SafetensorsReader(path)
    for name in ("a", "b"):
        reader.verify(name)
