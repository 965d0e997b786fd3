"""`extra=` state: saved as extra.safetensors by every save entry point, loaded as
Checkpoint.extra."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors

import arrayckpt as ac
from arrayckpt.layout import EXTRA_FILE, is_complete


def _resume_state() -> dict:
    rng = np.random.default_rng(7)
    rng.random(3)
    return {
        "data": {"epoch": 2, "index": 17, "generator": rng.bit_generator.state},
        "python": random.Random(3).getstate(),
        "floats": [math.inf, -math.inf, math.nan, 1e-300],
        "big": -(2**130) + 1,
        3: ("a", None, True),
        "momentum_buffer": np.arange(6, dtype=np.float32).reshape(2, 3),
    }


def _check_resume_state(extra: dict) -> None:
    expected = _resume_state()
    rng = np.random.default_rng()
    rng.bit_generator.state = extra["data"]["generator"]
    assert rng.random() == np.random.default_rng(7).random(4)[3]  # PCG64's 128-bit ints exact
    assert extra["python"] == expected["python"] and isinstance(extra["python"], tuple)
    assert random.Random().setstate(extra["python"]) is None
    assert extra["floats"][:2] == [math.inf, -math.inf] and math.isnan(extra["floats"][2])
    assert extra["floats"][3] == 1e-300
    assert extra["big"] == -(2**130) + 1 and extra[3] == ("a", None, True)
    np.testing.assert_array_equal(extra["momentum_buffer"], expected["momentum_buffer"])


def test_save_checkpoint_extra_round_trips_and_unpacking_gives_three(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)}, extra=_resume_state())
    ckpt = ac.load_checkpoint(tmp_path / "c")
    model, optimizer, state = ckpt
    assert optimizer is None and state.step == 0 and list(model) == ["w"]
    _check_resume_state(ckpt.extra)
    assert ckpt._replace(optimizer={}).extra is ckpt.extra


def test_no_extra_writes_no_file_and_loads_none(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)})
    assert not (tmp_path / "c" / EXTRA_FILE).exists()
    assert ac.load_checkpoint(tmp_path / "c").extra is None


def test_empty_extra_is_kept_as_empty(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)}, extra={})
    assert ac.load_checkpoint(tmp_path / "c").extra == {}


def test_extra_file_is_plain_safetensors_with_hf_format(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)}, extra={"lr": 0.5, "b": np.zeros(1)})
    with safetensors.safe_open(str(tmp_path / "c" / EXTRA_FILE), "np") as f:
        assert list(f.keys()) == ["b"]
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["arrayckpt.tree"])["root"]["dict"][0] == ["lr", {"float": 0.5}]


def test_extra_directory_is_complete_and_replaceable(tmp_path: Path) -> None:
    d = tmp_path / "c"
    ac.save_checkpoint(d, {"w": np.ones(2)}, extra={"i": 1})
    assert is_complete(d)
    ac.save_checkpoint(d, {"w": np.zeros(2)}, extra={"i": 2})  # replaces it whole
    assert ac.load_checkpoint(d).extra == {"i": 2}
    ac.save_checkpoint(d, {"w": np.zeros(2)})  # a save without extra drops the old one
    assert ac.load_checkpoint(d).extra is None


def test_bad_extra_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ac.InvalidInputError, match=r"'when'.*set"):
        ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)}, extra={"when": {1, 2}})
    assert not (tmp_path / "c").exists()


def test_flipped_bit_in_extra_is_caught(tmp_path: Path) -> None:
    d = tmp_path / "c"
    ac.save_checkpoint(d, {"w": np.ones(2)}, extra={"buf": np.arange(4, dtype=np.int64)})
    data = bytearray((d / EXTRA_FILE).read_bytes())
    data[-3] ^= 1
    (d / EXTRA_FILE).write_bytes(bytes(data))
    with pytest.raises(ac.CorruptCheckpointError, match="buf"):
        ac.load_checkpoint(d)


def test_async_and_manager_save_extra(tmp_path: Path) -> None:
    extra = _resume_state()
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "a", {"w": np.ones(2)}, extra=extra).result()
        extra["momentum_buffer"] += 1  # the snapshot was taken at save time
    _check_resume_state(ac.load_checkpoint(tmp_path / "a").extra)
    for async_save in (True, False):
        with ac.CheckpointManager(tmp_path / f"m{async_save}", async_save=async_save) as mgr:
            mgr.save(5, {"w": np.ones(2)}, extra=_resume_state())
            mgr.wait()
            restored = mgr.restore()
        assert restored is not None
        _check_resume_state(restored.extra)


def test_distributed_extra_per_rank(tmp_path: Path) -> None:
    for rank in range(2):
        ac.save_distributed_checkpoint(
            tmp_path,
            rank,
            2,
            {"w": np.ones(2)},
            None,
            ac.TrainingState(3),
            coordinator=None,
            extra={"rank": rank},
        )
    for rank in range(2):
        assert ac.load_distributed_checkpoint(tmp_path, rank).extra == {"rank": rank}
    with ac.AsyncCheckpointer() as ckpt:
        for rank in range(2):
            ckpt.save_distributed(
                tmp_path / "async",
                rank,
                2,
                {"w": np.ones(2)},
                None,
                ac.TrainingState(3),
                coordinator=None,
                extra={"rank": rank},
            ).result()
    assert ac.load_distributed_checkpoint(tmp_path / "async", 1).extra == {"rank": 1}


def test_verify_checks_the_extra_file(tmp_path: Path) -> None:
    from arrayckpt.inspection import verify

    d = tmp_path / "c"
    ac.save_checkpoint(d, {"w": np.ones(2)}, extra={"buf": np.arange(4, dtype=np.int64)})
    assert verify(d)["ok"] and any(f["path"].endswith(EXTRA_FILE) for f in verify(d)["files"])
    data = bytearray((d / EXTRA_FILE).read_bytes())
    data[-3] ^= 1
    (d / EXTRA_FILE).write_bytes(bytes(data))
    report = verify(d)
    assert not report["ok"]
    assert [f["path"] for f in report["files"] if f["errors"]] == [str(d / EXTRA_FILE)]


def test_tied_arrays_in_extra_come_back_tied(tmp_path: Path) -> None:
    w = np.arange(6.0)
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)}, extra={"a": w, "b": {"again": w}})
    extra = ac.load_checkpoint(tmp_path / "c").extra
    assert extra["b"]["again"] is extra["a"]
    np.testing.assert_array_equal(extra["a"], w)


def _save_zero_with_extra(root: Path) -> None:
    zero = ac.ShardingConfig(ac.ZeroPartitioned(3))
    for rank in range(2):
        ac.save_distributed_checkpoint(
            root,
            rank,
            2,
            {f"w{rank}": np.full(3, rank, np.float32)},
            None,
            ac.TrainingState(4),
            zero,
            coordinator=None,
            extra={"rank": rank, "sched": {"last_epoch": 4}, "buf": np.arange(3) + rank},
        )


@pytest.mark.parametrize("world_size", [1, 3])
def test_resharded_load_returns_rank_0s_extra(tmp_path: Path, world_size: int) -> None:
    _save_zero_with_extra(tmp_path)
    for rank in range(world_size):
        extra = ac.load_distributed_checkpoint(tmp_path, rank, world_size=world_size).extra
        assert extra["rank"] == 0 and extra["sched"] == {"last_epoch": 4}
        np.testing.assert_array_equal(extra["buf"], np.arange(3))


def test_partial_load_at_the_saved_world_size_returns_the_ranks_own_extra(
    tmp_path: Path,
) -> None:
    _save_zero_with_extra(tmp_path)
    ckpt = ac.load_distributed_checkpoint(tmp_path, 1, keys=["w1"])
    assert list(ckpt.model) == ["w1"] and ckpt.extra["rank"] == 1


def test_consolidate_keeps_rank_0s_extra(tmp_path: Path) -> None:
    _save_zero_with_extra(tmp_path / "sharded")
    ac.consolidate_checkpoint(tmp_path / "sharded", tmp_path / "merged")
    extra = ac.load_checkpoint(tmp_path / "merged").extra
    assert extra["rank"] == 0 and extra["sched"] == {"last_epoch": 4}
    np.testing.assert_array_equal(extra["buf"], np.arange(3))


def test_consolidate_checks_the_extra_file(tmp_path: Path) -> None:
    _save_zero_with_extra(tmp_path / "sharded")
    path = tmp_path / "sharded" / "rank_0" / EXTRA_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ac.CorruptCheckpointError, match="buf"):
        ac.consolidate_checkpoint(tmp_path / "sharded", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
