"""Caller-coordinated distributed checkpoints in one process: save, load, reshard, consolidate."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidInputError,
    TopologyError,
)

SPLIT = {"attn.wq": 0, "mlp.w1": 1}


def global_state() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    model = {
        "attn.wq": rng.standard_normal((7, 4)).astype(np.float32),  # 7 rows: uneven splits
        "mlp.w1": rng.standard_normal((3, 10)).astype(ml_dtypes.bfloat16),
        "norm.weight": np.arange(5, dtype=np.float64),
    }
    optimizer = {
        "attn.wq": rng.standard_normal((7, 4)).astype(np.float32),
        "step": np.array(12, dtype=np.int64),
    }
    return model, optimizer


def shard(state: dict[str, np.ndarray], rank: int, n: int) -> dict[str, np.ndarray]:
    return {
        k: np.ascontiguousarray(np.array_split(v, n, axis=SPLIT[k])[rank]) if k in SPLIT else v
        for k, v in state.items()
    }


def save_tp(directory: Path, n: int) -> None:
    model, optimizer = global_state()
    sharding = ac.ShardingConfig(ac.TensorParallel(), SPLIT)
    for r in range(n):
        ac.save_distributed_checkpoint(
            directory,
            r,
            n,
            shard(model, r, n),
            shard(optimizer, r, n),
            ac.TrainingState(300, epoch=2),
            sharding,
            coordinator=None,
        )


def zero_keys() -> dict[str, np.ndarray]:
    return {f"layer{i}.w": np.full(i + 1, i, np.float32) for i in range(10)}


def save_zero(directory: Path, n: int) -> None:
    keys = zero_keys()
    names = sorted(keys)
    for r in range(n):
        mine = {k: keys[k] for k in names[r::n]}
        if n > 1:
            mine["shared.bias"] = np.ones(3, np.float32)  # every rank holds it: replicated
        opt = {f"exp_avg.{k}": v * 2 for k, v in mine.items()}
        ac.save_distributed_checkpoint(
            directory,
            r,
            n,
            mine,
            opt,
            ac.TrainingState(7),
            ac.ShardingConfig(ac.ZeroPartitioned(3)),
            coordinator=None,
        )


def save_replicated(directory: Path, n: int) -> None:
    model, optimizer = global_state()
    for r in range(n):
        ac.save_distributed_checkpoint(
            directory,
            r,
            n,
            model,
            optimizer,
            ac.TrainingState(1),
            ac.ShardingConfig(ac.Replicated()),
            coordinator=None,
        )


def assert_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_boostr_layout_and_same_topology_round_trip(tmp_path: Path) -> None:
    save_tp(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0", "rank_1", "sharding_meta.json"]
    meta = json.loads((tmp_path / "sharding_meta.json").read_text())
    assert meta == {
        "version": 2,
        "world_size": 2,
        "strategy": "TensorParallel",
        "split_dims": {"attn.wq": 0, "mlp.w1": 1},
    }
    model, optimizer = global_state()
    for r in range(2):
        m, o, s = ac.load_distributed_checkpoint(tmp_path, r)
        assert_equal(m, shard(model, r, 2))
        assert o is not None
        assert_equal(o, shard(optimizer, r, 2))
        assert s.step == 300 and s.epoch == 2


def test_rank_beyond_saved_world_size_is_out_of_range(tmp_path: Path) -> None:
    save_tp(tmp_path, 2)
    with pytest.raises(TopologyError, match="out of range") as info:
        ac.load_distributed_checkpoint(tmp_path, 3)
    assert "world_size=" in str(info.value) and "consolidate_checkpoint" in str(info.value)
    with pytest.raises(TopologyError, match="out of range"):
        ac.load_distributed_checkpoint(tmp_path, 4, world_size=4)


def test_missing_rank_directory_is_named(tmp_path: Path) -> None:
    save_tp(tmp_path, 3)
    shutil.rmtree(tmp_path / "rank_1")
    (tmp_path / "rank_2" / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        ac.load_distributed_checkpoint(tmp_path, 0)
    assert "rank_1/" in str(info.value) and "rank_2/model.safetensors" in str(info.value)
    with pytest.raises(CheckpointNotFoundError, match="rank_1/"):
        ac.consolidate_checkpoint(tmp_path, tmp_path.parent / "merged")


def test_meta_missing_is_not_found(tmp_path: Path) -> None:
    save_tp(tmp_path, 2)
    (tmp_path / "sharding_meta.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="not a distributed checkpoint"):
        ac.load_distributed_checkpoint(tmp_path, 0)


def test_invalid_rank_arguments(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="out of range"):
        ac.save_distributed_checkpoint(tmp_path, 2, 2, {}, None, None, None, coordinator=None)
    with pytest.raises(InvalidInputError):
        ac.save_distributed_checkpoint(tmp_path, -1, 2, {}, None, None, None, coordinator=None)
    with pytest.raises(InvalidInputError, match="ShardingConfig"):
        ac.save_distributed_checkpoint(tmp_path, 0, 1, {}, None, None, "TP", coordinator=None)


def test_consolidate_tensor_parallel_concatenates_model_and_optimizer(tmp_path: Path) -> None:
    save_tp(tmp_path / "tp", 3)
    ac.consolidate_checkpoint(tmp_path / "tp", tmp_path / "merged")
    m, o, s = ac.load_checkpoint(tmp_path / "merged")
    model, optimizer = global_state()
    assert_equal(m, model)
    assert o is not None
    assert_equal(o, optimizer)
    assert s.step == 300


def test_consolidate_zero_and_replicated(tmp_path: Path) -> None:
    save_zero(tmp_path / "z", 3)
    ac.consolidate_checkpoint(tmp_path / "z", tmp_path / "zm")
    m, o, _ = ac.load_checkpoint(tmp_path / "zm")
    assert_equal(m, {**zero_keys(), "shared.bias": np.ones(3, np.float32)})
    assert o is not None and len(o) == 11
    save_replicated(tmp_path / "r", 2)
    ac.consolidate_checkpoint(tmp_path / "r", tmp_path / "rm")
    model, _ = global_state()
    assert_equal(ac.load_checkpoint(tmp_path / "rm").model, model)


@pytest.mark.parametrize(("n", "m"), [(2, 1), (1, 2), (2, 4), (4, 2), (3, 2)])
def test_reshard_tensor_parallel_matches_consolidation(tmp_path: Path, n: int, m: int) -> None:
    save_tp(tmp_path / "tp", n)
    ac.consolidate_checkpoint(tmp_path / "tp", tmp_path / "merged")
    merged = ac.load_checkpoint(tmp_path / "merged")
    loaded = [ac.load_distributed_checkpoint(tmp_path / "tp", r, world_size=m) for r in range(m)]
    for part in ("model", "optimizer"):
        want = getattr(merged, part)
        for name, full in want.items():
            pieces = [getattr(c, part)[name] for c in loaded]
            if name in SPLIT:
                for r, piece in enumerate(pieces):  # each rank's even slice
                    np.testing.assert_array_equal(
                        piece, np.array_split(full, m, axis=SPLIT[name])[r]
                    )
                np.testing.assert_array_equal(np.concatenate(pieces, axis=SPLIT[name]), full)
            else:
                for piece in pieces:
                    np.testing.assert_array_equal(piece, full)
    assert all(c.training_state.step == 300 for c in loaded)


@pytest.mark.parametrize(("n", "m"), [(2, 1), (1, 2), (2, 4), (4, 2), (3, 2)])
def test_reshard_zero_partitions_keys_against_consolidation(tmp_path: Path, n: int, m: int) -> None:
    save_zero(tmp_path / "z", n)
    ac.consolidate_checkpoint(tmp_path / "z", tmp_path / "merged")
    merged = ac.load_checkpoint(tmp_path / "merged")
    loaded = [ac.load_distributed_checkpoint(tmp_path / "z", r, world_size=m) for r in range(m)]
    for part in ("model", "optimizer"):
        want = getattr(merged, part)
        shared = {k for k in want if "shared" in k}
        seen: dict[str, Any] = {}
        for c in loaded:
            got = getattr(c, part)
            assert shared <= set(got)  # replicated keys go to every rank
            for k, v in got.items():
                assert k in shared or k not in seen, f"{k} loaded by two ranks"
                seen[k] = v
        assert_equal(seen, want)
    sizes = [len(c.model) for c in loaded]
    assert min(sizes) > 0  # 10 keys over <= 4 ranks: nobody is left empty
    again = [ac.load_distributed_checkpoint(tmp_path / "z", r, world_size=m) for r in range(m)]
    assert [sorted(c.model) for c in again] == [sorted(c.model) for c in loaded]


@pytest.mark.parametrize(("n", "m"), [(2, 1), (1, 2), (2, 4)])
def test_reshard_replicated_gives_rank0_state(tmp_path: Path, n: int, m: int) -> None:
    save_replicated(tmp_path, n)
    model, optimizer = global_state()
    for r in range(m):
        c = ac.load_distributed_checkpoint(tmp_path, r, world_size=m)
        assert_equal(c.model, model)
        assert c.optimizer is not None
        assert_equal(c.optimizer, optimizer)


def test_explicit_keys(tmp_path: Path) -> None:
    save_zero(tmp_path, 2)
    keys = ["layer3.w", "exp_avg.layer3.w"]
    c = ac.load_distributed_checkpoint(tmp_path, 0, world_size=3, keys=keys)
    assert list(c.model) == ["layer3.w"] and c.optimizer is not None
    assert list(c.optimizer) == ["exp_avg.layer3.w"]
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        ac.load_distributed_checkpoint(tmp_path, 0, keys=["nope"])


class CountingFS(fsops.FileSystem):
    def __init__(self) -> None:
        self.read = 0

    def read_ranges(self, path: Path, ranges: Any, out: memoryview) -> None:
        ranges = list(ranges)
        self.read += sum(length for _, length in ranges)
        super().read_ranges(path, ranges, out)


@pytest.mark.parametrize("dim", [0, 1])
def test_resharding_reads_only_needed_byte_ranges(tmp_path: Path, dim: int) -> None:
    big = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)  # 256 KiB
    sharding = ac.ShardingConfig(ac.TensorParallel(), {"w": dim})
    for r, part in enumerate(np.array_split(big, 2, axis=dim)):
        ac.save_distributed_checkpoint(
            tmp_path,
            r,
            2,
            {"w": np.ascontiguousarray(part)},
            None,
            None,
            sharding,
            coordinator=None,
        )
    files = sum(p.stat().st_size for p in tmp_path.glob("rank_*/model.safetensors"))
    with fsops.use(CountingFS()) as counting:
        w = ac.load_distributed_checkpoint(tmp_path, 1, world_size=4).model["w"]
    np.testing.assert_array_equal(w, np.array_split(big, 4, axis=dim)[1])
    # a quarter of the tensor plus two small headers, never whole files
    assert counting.read < files / 4 + 2 * 4096
    assert counting.read >= big.nbytes / 4


def test_consolidation_memory_is_about_one_merged_tensor(tmp_path: Path) -> None:
    n_tensors, shape = 8, (64, 2048)  # 512 KiB each, 4 MiB in all
    sharding = ac.ShardingConfig(ac.TensorParallel(), {f"t{i}": 1 for i in range(n_tensors)})
    full = {f"t{i}": np.full(shape, i, np.float32) for i in range(n_tensors)}
    for r in range(2):
        ac.save_distributed_checkpoint(
            tmp_path / "tp", r, 2, shard_all(full, r), None, None, sharding, coordinator=None
        )
    del full
    calls: list[tuple[int, int]] = []
    tracemalloc.start()
    try:
        ac.consolidate_checkpoint(
            tmp_path / "tp",
            tmp_path / "merged",
            progress=lambda done, total: calls.append((done, total)),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one = 64 * 2048 * 4
    # merged tensor + one shard of it; loading the model would take 8 * one
    assert peak < 2 * one, f"peak {peak} B for merged tensors of {one} B"
    assert [d for d, _ in calls] == [one * (i + 1) for i in range(n_tensors)]
    assert {t for _, t in calls} == {one * n_tensors}
    merged = ac.load_checkpoint(tmp_path / "merged").model
    np.testing.assert_array_equal(merged["t5"], np.full(shape, 5, np.float32))


def shard_all(full: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.array_split(v, 2, axis=1)[r]) for k, v in full.items()}


def test_consolidation_refuses_missing_shard(tmp_path: Path) -> None:
    sharding = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
    ac.save_distributed_checkpoint(
        tmp_path, 0, 2, {"w": np.ones(2), "b": np.ones(1)}, None, None, sharding, coordinator=None
    )
    ac.save_distributed_checkpoint(
        tmp_path, 1, 2, {"b": np.ones(1)}, None, None, sharding, coordinator=None
    )
    with pytest.raises(CorruptCheckpointError, match=r"'w'.*rank_1/model.safetensors"):
        ac.consolidate_checkpoint(tmp_path, tmp_path.parent / "out")
    assert not (tmp_path.parent / "out").exists()
    with pytest.raises(CorruptCheckpointError, match="rank_1"):
        ac.load_distributed_checkpoint(tmp_path, 0, world_size=1)


def test_consolidation_refuses_inconsistent_shapes(tmp_path: Path) -> None:
    sharding = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
    ac.save_distributed_checkpoint(
        tmp_path, 0, 2, {"w": np.ones((2, 3))}, None, None, sharding, coordinator=None
    )
    ac.save_distributed_checkpoint(
        tmp_path, 1, 2, {"w": np.ones((2, 4))}, None, None, sharding, coordinator=None
    )
    with pytest.raises(CorruptCheckpointError, match=r"rank_1 holds F64\[2, 4\]"):
        ac.consolidate_checkpoint(tmp_path, tmp_path.parent / "out")


def test_tensor_parallel_without_split_dims_cannot_be_consolidated(tmp_path: Path) -> None:
    ac.save_distributed_checkpoint(
        tmp_path,
        0,
        1,
        {"w": np.ones(2)},
        None,
        None,
        ac.ShardingConfig(ac.TensorParallel()),
        coordinator=None,
    )
    with pytest.raises(CorruptCheckpointError, match="split_dims"):
        ac.consolidate_checkpoint(tmp_path, tmp_path.parent / "out")


def test_reads_a_checkpoint_written_the_way_boostr_writes_it(tmp_path: Path) -> None:
    """No arrayckpt checksums, meta and training state written by serde as text."""
    for r in range(2):
        d = tmp_path / f"rank_{r}"
        d.mkdir()
        save_file(
            {"attn.wq": np.full((2, 4), r, np.float32), "norm.weight": np.ones(2)},
            str(d / "model.safetensors"),
        )
        (d / "training_state.json").write_text('{\n  "version": 2,\n  "step": 300\n}')
    (tmp_path / "sharding_meta.json").write_text(
        '{\n  "version": 2,\n  "world_size": 2,\n  "strategy": "TensorParallel",\n'
        '  "split_dims": {\n    "attn.wq": 0\n  }\n}'
    )
    ac.consolidate_checkpoint(tmp_path, tmp_path.parent / "merged")
    m = ac.load_checkpoint(tmp_path.parent / "merged").model
    assert m["attn.wq"].shape == (4, 4) and m["attn.wq"][2, 0] == 1
    resharded = ac.load_distributed_checkpoint(tmp_path, 0, world_size=1).model
    assert resharded["attn.wq"].shape == (4, 4)


def test_async_caller_coordinated_snapshot_is_taken_at_call(tmp_path: Path) -> None:
    sharding = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
    ws = [np.zeros(3, np.float32), np.zeros(3, np.float32)]
    with ac.AsyncCheckpointer() as ckpt:
        for r in range(2):
            future = ckpt.save_distributed(
                tmp_path, r, 2, {"w": ws[r]}, None, ac.TrainingState(4), sharding, coordinator=None
            )
            ws[r] += 1  # after the call: must not reach the checkpoint
            assert future.result(timeout=30) == tmp_path.absolute()
    merged = ac.load_distributed_checkpoint(tmp_path, 0, world_size=1).model["w"]
    np.testing.assert_array_equal(merged, np.zeros(6, np.float32))


def test_load_checkpoint_on_distributed_root_points_to_distributed_loader(tmp_path: Path) -> None:
    save_tp(tmp_path, 2)
    with pytest.raises(InvalidInputError, match="load_distributed_checkpoint"):
        ac.load_checkpoint(tmp_path)


def test_resharding_reports_a_split_tensor_missing_from_rank_0(tmp_path: Path) -> None:
    sharding = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
    ac.save_distributed_checkpoint(
        tmp_path, 0, 2, {"b": np.ones(1)}, None, None, sharding, coordinator=None
    )
    ac.save_distributed_checkpoint(
        tmp_path, 1, 2, {"w": np.ones(2), "b": np.ones(1)}, None, None, sharding, coordinator=None
    )
    with pytest.raises(CorruptCheckpointError, match=r"'w'.*rank_0/model.safetensors"):
        ac.load_distributed_checkpoint(tmp_path, 0, world_size=1)


class TruncatedFS(fsops.FileSystem):
    def read_ranges(self, path: Path, ranges: Any, out: memoryview) -> None:
        if any(offset > 0 for offset, _ in ranges) and "rank_1" in str(path):
            raise EOFError(f"{path}: ran past the end")  # shrank after its header was read
        super().read_ranges(path, ranges, out)


def test_a_shard_failing_while_read_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    save_tp(tmp_path, 2)
    with fsops.use(TruncatedFS()), pytest.raises(CorruptCheckpointError, match="rank_1"):
        ac.load_distributed_checkpoint(tmp_path, 0, world_size=1)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 4),
    m=st.integers(1, 5),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    data=st.data(),
)
def test_any_reshard_is_the_even_slice_of_the_merged_tensor(
    tmp_path_factory: pytest.TempPathFactory, n: int, m: int, shape: list[int], data: Any
) -> None:
    dim = data.draw(st.integers(0, len(shape) - 1))
    full = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    d = tmp_path_factory.mktemp("prop")
    sharding = ac.ShardingConfig(ac.TensorParallel(), {"t": dim})
    for r, part in enumerate(np.array_split(full, n, axis=dim)):
        ac.save_distributed_checkpoint(
            d, r, n, {"t": np.ascontiguousarray(part)}, None, None, sharding, coordinator=None
        )
    for r in range(m):
        got = ac.load_distributed_checkpoint(d, r, world_size=m).model["t"]
        np.testing.assert_array_equal(got, np.array_split(full, m, axis=dim)[r])


def test_missing_checkpoint_names_the_aside_copy_a_failed_save_left(tmp_path: Path) -> None:
    """A two-rename save whose undo failed leaves the previous checkpoint aside: say where."""
    aside = tmp_path / ".ckpt.arrayckpt-old-1-0123456789ab"
    for r in range(2):
        ac.save_distributed_checkpoint(
            aside, r, 2, {"w": np.zeros(2)}, None, ac.TrainingState(7), coordinator=None
        )
    for load in (lambda p: ac.load_distributed_checkpoint(p, 0), ac.load_checkpoint):
        with pytest.raises(ac.CheckpointNotFoundError, match=r"\(step 7\) in .*arrayckpt-old-1"):
            load(tmp_path / "ckpt")


@pytest.mark.parametrize("output", [".", "rank_0", "rank_1/merged", ".."])
def test_consolidating_into_or_over_the_source_is_refused(tmp_path: Path, output: str) -> None:
    src = tmp_path / "tp" / "inner"
    for r in range(2):
        ac.save_distributed_checkpoint(src, r, 2, {"w": np.full(2, r, np.int32)}, None, None)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    with pytest.raises(ac.InvalidInputError, match="overlaps the distributed checkpoint"):
        ac.consolidate_checkpoint(src, src / output)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    merged = ac.consolidate_checkpoint(src, tmp_path / "merged")
    assert ac.load_checkpoint(merged).model["w"].tolist() == [0, 0]
