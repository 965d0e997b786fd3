"""Reading boxes of a global tensor (arrayckpt/distributed/global_shards.py) straight into
the caller's memory: the values, the bytes read, and no temporary buffers."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt.distributed.global_shards import GlobalTensor, Piece, ReadStats, read_box
from arrayckpt.distributed.shards import ShardFile
from arrayckpt.dtypes import from_numpy
from arrayckpt.layout import MODEL_FILE

ROWS, COLS = 512, 1024  # 2 MiB of float32, saved as two boxes of 256 rows


@pytest.fixture
def tensor(tmp_path: Path) -> tuple[GlobalTensor, np.ndarray]:
    whole = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    t = GlobalTensor("w", from_numpy(whole.dtype, tensor="w"), (ROWS, COLS))
    half = ROWS // 2
    for r in range(2):
        ac.save_checkpoint(tmp_path / f"rank_{r}", {"w": whole[r * half : (r + 1) * half]})
        f = ShardFile(tmp_path / f"rank_{r}" / MODEL_FILE)
        t.pieces.append(Piece(r, f, (r * half, 0), (half, COLS)))
    return t, whole


@pytest.mark.parametrize("rows", [(0, ROWS), (100, 400), (256, 512), (10, 11)])
def test_rows_across_boxes_land_in_out_with_no_temporary_buffer(
    tensor: tuple[GlobalTensor, np.ndarray], rows: tuple[int, int]
) -> None:
    t, whole = tensor
    lo, hi = rows
    out = np.zeros((hi - lo, COLS), np.float32)
    stats = ReadStats()
    tracemalloc.start()
    try:
        got = read_box(t, (lo, 0), out.shape, stats, verify=True, out=out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got is out
    np.testing.assert_array_equal(out, whole[lo:hi])
    assert stats.bytes_read == out.nbytes  # only the rows asked for
    # NumPy reports its buffers to tracemalloc: a staging copy of even one row-run of a
    # box would be over 4 KiB; what is left is bookkeeping (range lists, views).
    assert peak < max(out.nbytes // 8, 64 * 1024), peak


def test_columns_of_a_box_fill_a_region_that_is_not_contiguous(
    tensor: tuple[GlobalTensor, np.ndarray],
) -> None:
    t, whole = tensor
    out = np.zeros((300, 10), np.float32)
    got = read_box(t, (200, 5), out.shape, ReadStats(), verify=True, out=out)
    assert got is out
    np.testing.assert_array_equal(out, whole[200:500, 5:15])


def test_a_flipped_bit_is_caught_reading_in_place(
    tensor: tuple[GlobalTensor, np.ndarray],
) -> None:
    t, _ = tensor
    path = t.pieces[1].file.path
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    out = np.zeros((ROWS, COLS), np.float32)
    with pytest.raises(ac.CorruptCheckpointError, match="'w'"):
        read_box(t, (0, 0), out.shape, ReadStats(), verify=True, out=out)


def test_without_out_a_new_array_comes_back(tensor: tuple[GlobalTensor, np.ndarray]) -> None:
    t, whole = tensor
    got = read_box(t, (0, 0), (ROWS, COLS), ReadStats(), verify=True)
    np.testing.assert_array_equal(got, whole)
