"""Coordinated saves over torch.distributed (gloo on 127.0.0.1), ranks as spawned processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _dist_launch import check_async, check_fault, check_given, check_sync, run_torch

pytestmark = pytest.mark.distributed

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out: Path = tmp_path_factory.mktemp(f"torch{request.param}")
    return run_torch(out, request.param)


def test_coordinated_save_commits_once_and_reshards(ranks: list[dict[str, Any]]) -> None:
    check_sync(ranks)


def test_save_through_a_given_group(ranks: list[dict[str, Any]]) -> None:
    check_given(ranks)


def test_halves_save_through_their_own_subgroups(ranks: list[dict[str, Any]]) -> None:
    if len(ranks) != 4:
        pytest.skip("needs world size 4 (two groups of two)")
    for r in ranks:
        assert r["subgroups"]["ok"], r["subgroups"]
    assert {"half0", "half1"} <= set(ranks[0]["listing"])


def test_async_save_runs_beside_training_collectives(ranks: list[dict[str, Any]]) -> None:
    check_async(ranks)


@pytest.mark.parametrize("name", ["fault", "fault_async"])
def test_one_rank_failing_fails_all_and_commits_nothing(
    ranks: list[dict[str, Any]], name: str
) -> None:
    check_fault(ranks, name)


def test_absent_rank_is_named_within_the_timeout(ranks: list[dict[str, Any]]) -> None:
    last = len(ranks) - 1  # this rank never calls save
    got = ranks[0]["absent"]
    assert got["type"] == "TopologyError" and f"Ranks {last} failed" in got["error"], got
    for r in ranks[1:last]:
        assert not r["absent"]["ok"] and r["absent"]["elapsed"] < 15, r["absent"]
    assert got["elapsed"] < 15
    assert "absent" not in ranks[0]["listing"]
