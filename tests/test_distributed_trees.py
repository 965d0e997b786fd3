"""Nested state (torch state dicts) through distributed saves, consolidation and resharding."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac

torch = pytest.importorskip("torch")


def trained() -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)  # flat files sort their names
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    else:
        assert got == want and type(got) is type(want)


def zero_shares(model: Any, opt: Any, world: int) -> list[tuple[dict, dict]]:
    """What each ZeRO rank holds: its model keys and its params' optimizer state."""
    sd, osd = model.state_dict(), opt.state_dict()
    shares = []
    for r in range(world):
        keys = list(sd)[r::world]
        state = {i: s for i, s in osd["state"].items() if i % world == r}
        shares.append(
            ({k: sd[k] for k in keys}, {"state": state, "param_groups": osd["param_groups"]})
        )
    return shares


def test_replicated_torch_state_dicts_consolidate_to_their_structure(tmp_path):
    model, opt = trained()
    for r in range(2):
        ac.save_distributed_checkpoint(
            tmp_path / "d", r, 2, model.state_dict(), opt.state_dict(), ac.TrainingState(7)
        )
    ac.consolidate_checkpoint(tmp_path / "d", tmp_path / "merged")
    ckpt = ac.load_checkpoint(tmp_path / "merged", xp="torch")
    assert_same(ckpt.model, model.state_dict())
    assert_same(ckpt.optimizer, opt.state_dict())
    _, fresh_opt = trained()
    fresh_opt.load_state_dict(ckpt.optimizer)  # torch accepts it as it is
    resharded = ac.load_distributed_checkpoint(tmp_path / "d", 2, world_size=3, xp="torch")
    assert_same(resharded.optimizer, opt.state_dict())


def test_zero_partitioned_torch_state_dicts_merge_into_the_whole_state(tmp_path):
    model, opt = trained()
    zero = ac.ShardingConfig(ac.ZeroPartitioned(2))
    for r, (m, o) in enumerate(zero_shares(model, opt, 2)):
        ac.save_distributed_checkpoint(tmp_path / "d", r, 2, m, o, None, zero)
    ac.consolidate_checkpoint(tmp_path / "d", tmp_path / "merged")
    ckpt = ac.load_checkpoint(tmp_path / "merged", xp="torch")
    assert ckpt.model.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model[k], v)
    want = opt.state_dict()
    assert_same(ckpt.optimizer["param_groups"], want["param_groups"])
    assert sorted(ckpt.optimizer["state"]) == sorted(want["state"])
    for i, s in want["state"].items():
        assert_same(ckpt.optimizer["state"][i], s)
    _, fresh_opt = trained()
    fresh_opt.load_state_dict(ckpt.optimizer)
    # into one rank: the whole state, structured; into three: each a flat partial share
    one = ac.load_distributed_checkpoint(tmp_path / "d", 0, world_size=1, xp="torch")
    assert set(one.optimizer["state"]) == set(want["state"])
    part = ac.load_distributed_checkpoint(tmp_path / "d", 0, world_size=3, xp="torch")
    assert all(isinstance(v, torch.Tensor) for v in part.optimizer.values())
    assert all(k.startswith("state.") for k in part.optimizer)


def test_ranks_that_disagree_about_a_leaf_merge_flat_with_a_warning(tmp_path, caplog):
    zero = ac.ShardingConfig(ac.ZeroPartitioned(2))
    for r in range(2):
        opt = {"state": {r: {"m": np.full(2, r, np.float32)}}, "param_groups": [{"params": [r]}]}
        ac.save_distributed_checkpoint(
            tmp_path / "d", r, 2, {f"w{r}": np.zeros(1)}, opt, None, zero
        )
    with caplog.at_level(logging.WARNING, logger="arrayckpt"):
        ac.consolidate_checkpoint(tmp_path / "d", tmp_path / "merged")
    assert "merged flat" in caplog.text and "param_groups" in caplog.text
    opt = ac.load_checkpoint(tmp_path / "merged").optimizer
    assert sorted(opt) == ["state.0.m", "state.1.m"]


def test_tensor_parallel_nested_state_reshards_and_merges_structured(tmp_path):
    tp = ac.ShardingConfig(ac.TensorParallel(), {"w": 0, "state.0.m": 0})
    for r in range(2):
        opt = {"state": {0: {"m": np.full(2, r)}}, "lr": 0.1}
        ac.save_distributed_checkpoint(
            tmp_path / "d",
            r,
            2,
            {"w": np.full((2, 3), r, np.float32)},
            opt,
            ac.TrainingState(7),
            tp,
        )
    third = ac.load_distributed_checkpoint(tmp_path / "d", 2, world_size=3).optimizer
    assert third["lr"] == 0.1 and third["state"][0]["m"].tolist() == [1]
    ac.consolidate_checkpoint(tmp_path / "d", tmp_path / "merged")
    merged = ac.load_checkpoint(tmp_path / "merged").optimizer
    assert merged["lr"] == 0.1 and merged["state"][0]["m"].tolist() == [0, 0, 1, 1]
