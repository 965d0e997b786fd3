"""Parallel host copies: every byte lands, whatever the size and thread count."""

from __future__ import annotations

import numpy as np
import pytest

from arrayckpt import hostcopy


@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("nbytes", [0, 1, hostcopy.PARALLEL_MIN_BYTES - 1, 3 * (1 << 20) + 7])
def test_copy_bytes_copies_every_byte(
    monkeypatch: pytest.MonkeyPatch, threads: str, nbytes: int
) -> None:
    monkeypatch.setenv("ARRAYCKPT_THREADS", threads)
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    hostcopy.copy_bytes(dst, src)
    np.testing.assert_array_equal(dst, src)
