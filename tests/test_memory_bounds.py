"""Loads hold their arrays and at most a tensor more; closing gives the staging back.

Each load runs in its own process (`memory_child.py`), its peak RSS taken from a VmHWM
reset just before the call, so what one case freed cannot hide another's peak. A load
that kept a whole-file buffer (or a copy of one) beside its arrays would exceed the bound
by the file's size, 8x the slack allowed here.
"""

from __future__ import annotations

import gc
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from memory import needs_proc, rss, run_memory_child

import arrayckpt as ac

pytestmark = needs_proc

COUNT, MIB = 8, 16  # 128 MiB of float32 tensors, 16 MiB each
TENSOR = MIB << 20
#: Allowed beyond the arrays a load returns: one tensor in flight and allocator change.
SLACK = TENSOR + (16 << 20)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint of each layout, written by a child (the writer's memory is not ours)."""
    base = tmp_path_factory.mktemp("memory")
    out = {}
    for kind in ("checkpoint", "hf", "hf_shards", "zero", "tp"):
        run_memory_child("make", kind, str(base / kind), str(COUNT), str(MIB))
        out[kind] = base / kind
    return out


def _peak(case: str, directory: Path) -> tuple[int, int]:
    """The peak RSS the load ``case`` added, and the bytes of the arrays it returned."""
    got = json.loads(run_memory_child("load", case, str(directory)).splitlines()[-1])
    return got["extra"], got["kept"]


CASES = [
    # (case, layout, what the returned arrays hold)
    ("eager", "checkpoint", COUNT * TENSOR),
    ("mmap", "checkpoint", COUNT * TENSOR),
    ("eager_keys", "checkpoint", 2 * TENSOR),
    ("mmap_keys", "checkpoint", 2 * TENSOR),
    ("eager_file", "checkpoint", COUNT * TENSOR),
    ("lazy_eager", "checkpoint", 2 * TENSOR),
    ("eager_into", "checkpoint", 0),
    ("mmap_into", "checkpoint", 0),
    ("hf_eager", "hf", COUNT * TENSOR),
    ("hf_eager", "hf_shards", COUNT * TENSOR),
    ("hf_mmap", "hf_shards", COUNT * TENSOR),
    ("dist_eager", "zero", COUNT * TENSOR),
    ("dist_mmap", "tp", COUNT * TENSOR),
]


@pytest.mark.parametrize(("case", "layout", "kept"), CASES, ids=[f"{c}-{d}" for c, d, _ in CASES])
def test_a_load_holds_its_arrays_and_at_most_a_tensor_more(
    saved: dict[str, Path], case: str, layout: str, kept: int
) -> None:
    """Before: ``mmap=False`` with ``into=`` held a whole-file buffer beside the targets
    (128 MiB here), ``into=`` from a map the mapped file, and ``open_checkpoint(...,
    mmap=False)`` read the whole file to return two tensors."""
    extra, returned = _peak(case, saved[layout])
    assert returned == kept
    assert extra <= kept + SLACK, (
        f"{case} of {layout}: peak +{extra >> 20} MiB for {kept >> 20} MiB of arrays "
        f"(bound {(kept + SLACK) >> 20} MiB)"
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_an_eager_torch_load_shares_its_buffer_with_the_tensors(saved: dict[str, Path]) -> None:
    extra, kept = _peak("eager_torch", saved["checkpoint"])
    assert kept == COUNT * TENSOR
    assert extra <= kept + SLACK, f"peak +{extra >> 20} MiB for {kept >> 20} MiB of tensors"


@pytest.mark.parametrize("owner", ["checkpointer", "manager"])
def test_close_gives_the_staging_memory_back(tmp_path: Path, owner: str) -> None:
    """After `AsyncCheckpointer.close()` or `CheckpointManager.close()` nothing of the
    snapshot is referenced: not by the owner, the writer thread or its helpers."""
    state = {f"t{i}": np.ones(8 << 20, np.float32) for i in range(8)}  # 256 MiB, touched
    gc.collect()
    before = rss()
    closing: ac.AsyncCheckpointer | ac.CheckpointManager
    if owner == "manager":
        closing = ac.CheckpointManager(tmp_path / "run")
        closing.save(1, state)
    else:
        closing = ac.AsyncCheckpointer()
        closing.save(tmp_path / "c", state)
    during = rss()  # the snapshot: about 1x the state
    closing.close()
    gc.collect()
    after = rss()
    assert during - before > 200 << 20, "the snapshot did not copy the state"
    assert after - before < 32 << 20, f"{(after - before) >> 20} MiB still held after close()"
