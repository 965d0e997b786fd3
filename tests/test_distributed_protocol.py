"""The coordinated commit protocol, with ranks as threads of one process (fast, deterministic).

Real multi-process runs over torch.distributed and MPI are in test_distributed_torch.py and
test_distributed_mpi.py; these cover every failure path without starting processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.distributed import Coordinator
from arrayckpt.errors import CheckpointError, CheckpointWriteError, TopologyError

try:
    from .dist_threads import Hub, ThreadCoordinator, run_ranks
except ImportError:
    from dist_threads import Hub, ThreadCoordinator, run_ranks


TP = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})


def state(r: int, rows: int = 2) -> dict[str, np.ndarray]:
    return {"w": np.full((rows, 3), r, np.float32), "b": np.ones(3, np.float32)}


def save(directory: Path, sharding: ac.ShardingConfig = TP, **kw: Any) -> Callable[..., Any]:
    def body(r: int, coord: Coordinator) -> Any:
        return ac.save_distributed_checkpoint(
            directory,
            r,
            coord.world_size,
            state(r),
            {"m": np.zeros(1)},
            ac.TrainingState(9),
            sharding,
            coordinator=coord,
            **kw,
        )

    return body


def no_debris(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".arrayckpt-" in p.name]


def test_commit_writes_everything_and_records_manifests(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    assert run_ranks(3, save(target)) == [target.absolute()] * 3
    meta = json.loads((target / "sharding_meta.json").read_text())
    assert [meta[k] for k in ("version", "world_size", "strategy", "split_dims")] == [
        2,
        3,
        "TensorParallel",
        {"w": 0},
    ]
    ranks = meta["arrayckpt"]["ranks"]
    assert [m["rank"] for m in ranks] == [0, 1, 2]
    assert [m["model"]["w"]["offset"] for m in ranks] == [0, 2, 4]
    w1 = ranks[1]["model"]["w"]
    assert w1["dtype"] == "F32" and w1["shape"] == [2, 3] and len(w1["crc32c"]) == 8
    assert "offset" not in ranks[1]["model"]["b"] and "optimizer" in ranks[1]
    merged = ac.load_distributed_checkpoint(target, 0, world_size=1).model["w"]
    np.testing.assert_array_equal(merged[:, 0], [0, 0, 1, 1, 2, 2])
    assert no_debris(tmp_path)


class FailFor(fsops.FileSystem):
    """Fails the first write of rank ``rank``'s model file (mid-save)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def write_safetensors(self, path: Path, specs: Any, metadata: Any, **kw: Any) -> None:
        if path.parent.name == f"rank_{self.rank}":
            raise OSError(28, "No space left on device (injected)")
        super().write_safetensors(path, specs, metadata, **kw)


@pytest.mark.parametrize("failing", [0, 2])
def test_one_rank_failing_mid_save_fails_every_rank_and_commits_nothing(
    tmp_path: Path, failing: int
) -> None:
    target = tmp_path / "ckpt"
    run_ranks(3, save(target))  # a previous checkpoint that must survive
    before = (target / "sharding_meta.json").read_bytes()
    with fsops.use(FailFor(failing)):
        out = run_ranks(3, save(target, ac.ShardingConfig(ac.TensorParallel(), {"w": 1})))
    assert all(isinstance(e, CheckpointWriteError) for e in out), out
    assert "No space left" in str(out[failing])
    for r in set(range(3)) - {failing}:
        assert f"rank {failing} failed" in str(out[r]) and "nothing was committed" in str(out[r])
    assert (target / "sharding_meta.json").read_bytes() == before
    assert no_debris(tmp_path)


def test_new_target_stays_absent_when_a_rank_fails(tmp_path: Path) -> None:
    with fsops.use(FailFor(1)):
        out = run_ranks(2, save(tmp_path / "ckpt"))
    assert all(isinstance(e, CheckpointWriteError) for e in out)
    assert not (tmp_path / "ckpt").exists() and no_debris(tmp_path)


def test_absent_rank_is_named_and_nobody_hangs(tmp_path: Path) -> None:
    body = save(tmp_path / "ckpt")

    def maybe(r: int, coord: Coordinator) -> Any:
        return None if r == 2 else body(r, coord)  # rank 2 never calls save

    out = run_ranks(3, maybe, timeout=0.5)
    assert isinstance(out[0], TopologyError) and "[2]" in str(out[0])
    assert isinstance(out[1], CheckpointError)
    assert not (tmp_path / "ckpt").exists() and no_debris(tmp_path)


def test_ranks_disagreeing_on_sharding_commit_nothing(tmp_path: Path) -> None:
    def body(r: int, coord: Coordinator) -> Any:
        sharding = TP if r != 1 else ac.ShardingConfig(ac.TensorParallel(), {"w": 1})
        return save(tmp_path / "ckpt", sharding)(r, coord)

    out = run_ranks(3, body)
    assert isinstance(out[0], TopologyError) and "ranks [1]" in str(out[0])
    assert all(isinstance(e, CheckpointWriteError) for e in out[1:])
    assert not (tmp_path / "ckpt").exists()


def test_split_shards_that_do_not_fit_fail_at_save_time(tmp_path: Path) -> None:
    def body(r: int, coord: Coordinator) -> Any:
        s = state(r) if r != 1 else {"w": np.ones((2, 4), np.float32), "b": np.ones(3, np.float32)}
        return ac.save_distributed_checkpoint(
            tmp_path / "ckpt", r, 2, s, None, None, TP, coordinator=coord
        )

    out = run_ranks(2, body)
    assert all(isinstance(e, CheckpointError) for e in out)
    assert "rank_1 holds F32[2, 4]" in str(out[0])
    assert not (tmp_path / "ckpt").exists()


def test_target_that_is_not_a_checkpoint_is_refused_on_every_rank(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    out = run_ranks(2, save(target))
    assert all(isinstance(e, CheckpointError) for e in out)
    assert "not part of a checkpoint" in str(out[1])
    assert (target / "notes.txt").read_text() == "mine"


def test_rank_must_match_the_coordinator(tmp_path: Path) -> None:
    coord = ThreadCoordinator(Hub(), 1, 2)
    with pytest.raises(TopologyError, match="rank 1 of 2"):
        ac.save_distributed_checkpoint(tmp_path, 0, 2, state(0), None, None, TP, coordinator=coord)


def test_load_checks_rank_files_against_the_recorded_manifests(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_ranks(2, save(a))
    run_ranks(2, save(b))
    # replace b's rank_1 by another save of the same keys and shapes: its checksums differ
    ac.save_distributed_checkpoint(
        b,
        1,
        2,
        {"w": np.full((2, 3), 7, np.float32), "b": np.ones(3, np.float32)},
        {"m": np.zeros(1)},
        None,
        TP,
        coordinator=None,
    )
    with pytest.raises(ac.CorruptCheckpointError, match=r"rank_1/model.safetensors.*\['w'\]"):
        ac.load_distributed_checkpoint(b, 1)
    with pytest.raises(ac.CorruptCheckpointError, match="rank_1"):
        ac.load_distributed_checkpoint(b, 0, world_size=1)
    with pytest.raises(ac.CorruptCheckpointError, match="rank_1"):
        ac.consolidate_checkpoint(b, tmp_path / "merged")
    ac.load_distributed_checkpoint(b, 0)  # rank 0 is intact
    np.testing.assert_array_equal(ac.load_distributed_checkpoint(a, 1).model["w"], state(1)["w"])


def test_invalid_state_on_one_rank_fails_every_rank_at_once(tmp_path: Path) -> None:
    def body(r: int, coord: Coordinator) -> Any:
        s: dict[str, Any] = state(r) if r != 1 else {"w": b"not an array"}
        return ac.save_distributed_checkpoint(
            tmp_path / "ckpt", r, 3, s, None, None, TP, coordinator=coord
        )

    started = time.monotonic()
    out = run_ranks(3, body, timeout=30)
    assert time.monotonic() - started < 10  # told at once, not by a timeout
    assert isinstance(out[1], ac.UnsupportedArrayError)
    for r in (0, 2):
        assert isinstance(out[r], CheckpointWriteError) and "rank 1 failed" in str(out[r])
    assert not (tmp_path / "ckpt").exists() and no_debris(tmp_path)
