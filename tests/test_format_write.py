"""`format.write_file`: checksums computed in parallel land in a standard file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from arrayckpt import format as fmt
from arrayckpt.snapshot import take_snapshot

NAMES = ["plain", 'quote"d', "back\\slash", "ünïcödé/层", "tab\tand\nnewline", "\x01ctl", "\x7f"]


def _tensors(names: list[str], sizes: list[int] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    sizes = sizes or [1 + i * 97 for i in range(len(names))]
    state = {
        n: rng.standard_normal(k).astype(np.float32) for n, k in zip(names, sizes, strict=True)
    }
    return take_snapshot(state, None, None, staging=None).model


@pytest.mark.parametrize("threads", ["1", "2", "5"])
@pytest.mark.parametrize(
    ("names", "sizes"),
    [(NAMES, None), (["only"], None), ([], None), (["big", "small", "mid"], [1 << 20, 3, 1 << 16])],
    ids=["odd-names", "one", "none", "uneven"],
)
def test_written_checksums_verify_and_files_stay_standard(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    threads: str,
    names: list[str],
    sizes: list[int] | None,
) -> None:
    monkeypatch.setenv("ARRAYCKPT_THREADS", threads)
    tensors = _tensors(names, sizes)
    path = tmp_path / "m.safetensors"
    fmt.write_file(path, tensors)
    reader = fmt.SafetensorsReader(path)
    assert reader.header.checksums is not None
    for name, t in tensors.items():
        expected = fmt.tensor_checksum(t.dtype.code, t.shape, t.bytes())
        assert reader.header.checksums[name] == expected
        np.testing.assert_array_equal(reader.array(name), t.data)
    assert set(safetensors.numpy.load_file(str(path))) == set(names)
