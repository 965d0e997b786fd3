"""FSDP2 + AdamW saved on 2 gloo ranks (nested optimizer state with DTensor leaves) and
resumed on 3, 1 and 4 ranks: the continued losses are bit-identical to the uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dist_launch import run_scenario

import arrayckpt as ac

pytest.importorskip("torch.distributed.tensor", reason="needs torch with DTensor")
pytestmark = pytest.mark.distributed
WORKER = Path(__file__).resolve().parent / "_fsdp2_worker.py"


def run(scenario: str, ckpt: Path, out: Path, world: int) -> list[dict[str, Any]]:
    return run_scenario(WORKER, scenario, ckpt, out, world)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    base = tmp_path_factory.mktemp("fsdp2")
    res = run("train", base / "ckpt", base / "train", 2)
    return base / "ckpt", res[0]["losses"]


@pytest.mark.parametrize(("world", "which"), [(3, "ckpt"), (1, "async"), (4, "ckpt")])
def test_resume_at_another_world_size_continues_bit_identically(
    trained: tuple[Path, list[float]], tmp_path: Path, world: int, which: str
) -> None:
    ckpt, losses = trained
    res = run("resume", ckpt.parent / which, tmp_path / "resume", world)
    assert res[0]["losses"] == losses[3:]  # exact floats, not approximately
    assert all(r["step"] == 3 and r["opt_steps"] == [3.0] for r in res)
    # 66 float32 parameters and as many of each AdamW moment: the ranks' shards together
    # are read once; each rank also reads the 4 float32 step counters whole.
    assert sum(r["bytes_read"] for r in res) == 3 * 66 * 4 + world * 4 * 4


def test_nested_optimizer_state_keeps_its_structure(trained: tuple[Path, list[float]]) -> None:
    ckpt, _ = trained
    opt = ac.load_distributed_checkpoint(ckpt, 0, world_size=1).optimizer
    assert opt is not None and sorted(opt) == ["param_groups", "state"]
    assert sorted(opt["state"]) == [0, 1, 2, 3]  # parameter indices, as torch keys them
    assert sorted(opt["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert opt["state"][0]["exp_avg"].shape == (7, 5)  # whole, from both ranks' rows
    assert opt["param_groups"][0]["lr"] == 0.05 and opt["param_groups"][0]["params"] == [0, 1, 2, 3]
    # Rank 1 wrote only its rows of each moment; the plain step tensors are rank 0's.
    r1 = ac.load_checkpoint(ckpt / "rank_1").optimizer
    assert r1 is not None and "step" not in r1["state"][0]
    assert r1["state"][0]["exp_avg"].shape == (3, 5)
    assert np.array_equal(r1["state"][0]["exp_avg"], opt["state"][0]["exp_avg"][4:])
