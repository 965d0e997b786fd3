"""TP x FSDP (a 2 x 2 mesh of 4 gloo ranks) DTensor state: strided shards saved and resharded.

tests/_dtensor_tp_worker.py runs the ranks; see its docstring for the scenarios.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dist_launch import base_env, run_scenario

import arrayckpt as ac
from arrayckpt.distributed.types import doc_checksum

pytest.importorskip("torch.distributed.tensor", reason="needs torch with DTensor")
pytestmark = pytest.mark.distributed
WORKER = Path(__file__).resolve().parent / "_dtensor_tp_worker.py"
G = np.arange(42, dtype=np.float32).reshape(7, 6)
PLACEMENTS = ["s0_s0", "s0_s1", "s1_s0", "r_s1", "s0_r", "r_r", "ss0_s0", "s0_ss0", "ss1_s1"]


def run(scenario: str, ckpt: Path, out: Path, world: int) -> list[dict[str, Any]]:
    return run_scenario(WORKER, scenario, ckpt, out, world)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    base = tmp_path_factory.mktemp("tp")
    res = run("train", base / "ckpt", base / "train", 4)
    return base / "ckpt", res


def flat_optimizer(opt: Any) -> dict[str, np.ndarray]:
    return {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}


def test_fsdp_over_tp_gives_strided_shards_each_rank_holding_its_runs(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    ckpt, res = trained
    placements = res[0]["placements"]
    assert placements["0.weight"] == ["_S(0, 2)", "S(0)"]  # ColwiseParallel, then FSDP
    assert placements["2.weight"] == ["S(0)", "S(1)"]  # RowwiseParallel, then FSDP
    assert placements["2.bias"] == ["S(0)", "R"]
    # Each rank's local tensor is exactly the global indices arrayckpt places it at,
    # for every placement pair (torch split G itself: src_data_rank=None).
    for r in res:
        assert r["runs_match"] == dict.fromkeys(PLACEMENTS, True), r["rank"]
    ranks = json.loads((ckpt.parent / "zoo" / "sharding_meta.json").read_text())["arrayckpt"]
    # Shard(0) then _StridedShard(0, 2) over 7 rows: rank 0 holds rows 0 and 2, two runs.
    box = ranks["ranks"][0]["model"]["s0_ss0"]
    assert box["shape"] == [2, 6] and box["global_runs"] == [[[0, 1], [2, 1]], [[0, 6]]]
    assert "global_runs" not in ranks["ranks"][0]["model"]["s0_s0"]  # one box: offsets only


@pytest.mark.parametrize("which", ["ckpt", "async"])
def test_one_process_gets_the_unsharded_values(
    trained: tuple[Path, list[dict[str, Any]]], which: str
) -> None:
    ckpt, _ = trained
    stats = ac.ReadStats()
    got = ac.load_distributed_checkpoint(ckpt.parent / which, 0, world_size=1, stats=stats)
    want = ac.load_checkpoint(ckpt.parent / "whole")  # torch's full_tensor(), saved by rank 0
    assert got.model.keys() == want.model.keys() and got.optimizer is not None
    for name, value in want.model.items():
        np.testing.assert_array_equal(got.model[name], value, err_msg=name)
    assert want.optimizer is not None
    opt = flat_optimizer(got.optimizer)
    assert opt.keys() == want.optimizer.keys()
    for name, value in want.optimizer.items():
        np.testing.assert_array_equal(opt[name], value, err_msg=name)
    assert got.training_state.step == 3
    total = sum(a.nbytes for a in [*want.model.values(), *want.optimizer.values()])
    assert stats.bytes_read == total  # every byte once, none twice


def test_load_checkpoint_in_one_process_gives_whole_tensors(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    ckpt, _ = trained
    want = ac.load_checkpoint(ckpt.parent / "whole")
    got = ac.load_checkpoint(ckpt)
    assert got.model.keys() == want.model.keys() and got.training_state.step == 3
    for name, value in want.model.items():
        np.testing.assert_array_equal(got.model[name], value, err_msg=name)
    assert want.optimizer is not None and got.optimizer is not None
    assert flat_optimizer(got.optimizer).keys() == want.optimizer.keys()
    assert ac.load_checkpoint(ckpt, optimizer=False).optimizer is None
    zoo = ac.load_checkpoint(ckpt.parent / "zoo", xp="torch").model
    assert all(bool((zoo[name].numpy() == G).all()) for name in PLACEMENTS)


def test_every_placement_pair_assembles_whole(trained: tuple[Path, list[dict[str, Any]]]) -> None:
    ckpt, _ = trained
    stats = ac.ReadStats()
    got = ac.load_distributed_checkpoint(ckpt.parent / "zoo", 0, world_size=1, stats=stats)
    assert sorted(got.model) == sorted(PLACEMENTS)
    for name, value in got.model.items():
        np.testing.assert_array_equal(value, G, err_msg=name)
    assert stats.bytes_read == len(PLACEMENTS) * G.nbytes  # replicas were written once


def test_consolidate_assembles_strided_shards(
    trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ckpt, _ = trained
    ac.consolidate_checkpoint(ckpt.parent / "zoo", tmp_path / "merged")
    merged = ac.load_checkpoint(tmp_path / "merged").model
    assert sorted(merged) == sorted(PLACEMENTS)
    for name, value in merged.items():
        np.testing.assert_array_equal(value, G, err_msg=name)


@pytest.fixture(scope="module")
def resumed(
    trained: tuple[Path, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    ckpt, _ = trained
    return run("resume", ckpt, tmp_path_factory.mktemp("tp_resume") / "out", 4)


def test_resume_on_the_same_mesh_continues_bit_identically(
    trained: tuple[Path, list[dict[str, Any]]], resumed: list[dict[str, Any]]
) -> None:
    _, train = trained
    for r in resumed:
        assert r["losses"] == train[0]["losses"][3:]  # exact floats, not approximately
        assert r["step"] == 3 and all(r["equal"].values()), r["equal"]
    # 57 float32 parameters and as many of each AdamW moment are read once in all, but
    # 2.bias (3 of them, replicated over "tp") twice; each rank reads the 4 step counters.
    assert sum(r["bytes_read"] for r in resumed) == 3 * (57 + 3) * 4 + 4 * 4 * 4


def test_every_placement_loads_into_every_other(resumed: list[dict[str, Any]]) -> None:
    # Each placement's tensor loaded into the next placement's DTensor: equal whole, and
    # each rank's local tensor holds its own runs.
    for r in resumed:
        assert r["zoo"]["equal"] == dict.fromkeys(PLACEMENTS, True)
        assert r["zoo"]["local"] == dict.fromkeys(PLACEMENTS, True)
    # Only the bytes each target needs: each tensor once, and again for every further
    # replica of the targets replicated over "dp" (r_s1), "tp" (s0_r) or both (r_r).
    assert sum(r["zoo"]["bytes_read"] for r in resumed) == (9 + 1 + 1 + 3) * G.nbytes


def test_target_errors_name_the_tensor_and_ranks(resumed: list[dict[str, Any]]) -> None:
    for r in resumed:
        e = r["target_errors"]
        assert e["larger"]["type"] == "TopologyError", e["larger"]
        assert (
            f"into['ss0_s0'] on rank {r['rank']}: the target's global shape [8, 6] is "
            in (e["larger"]["error"])
        )
        assert "larger than the saved [7, 6] (saved by ranks [0, 1, 2, 3])" in e["larger"]["error"]
        assert e["changed"]["type"] == "TopologyError"
        assert "[7, 5] differs from the saved [7, 6]" in e["changed"]["error"]
        assert e["dtype"]["type"] == "InvalidInputError"
        assert (
            "into['ss0_s0']" in e["dtype"]["error"] and "the target is F64" in e["dtype"]["error"]
        )
        # A target whose local tensor is not what its placements give this rank.
        assert e["bad_local"]["type"] == "InvalidInputError"
        assert (
            f"into['ss0_s0'] on rank {r['rank']}: the DTensor's local tensor is [5, 6]"
            in (e["bad_local"]["error"])
        )
        assert "placements are inconsistent" in e["bad_local"]["error"]


def test_fsdp_only_on_two_ranks_loads_the_tp_checkpoint(
    trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ckpt, _ = trained
    res = run("fsdp", ckpt.parent / "async", tmp_path / "fsdp", 2)
    for r in res:
        assert r["step"] == 3 and all(r["equal"].values()), r["equal"]
        assert len(r["equal"]) == 4 + 4 * 3  # every parameter, moment and step counter
    # The parameters and moments once in all (FSDP alone replicates nothing); each rank
    # reads the 4 step counters.
    assert sum(r["bytes_read"] for r in res) == 3 * 57 * 4 + 2 * 4 * 4
    # The same state through the managers the 4 training ranks saved it with.
    for r in res:
        assert r["managed_step"] == 3 and all(r["managed_equal"].values()), r["managed_equal"]


def test_a_manager_on_every_rank_commits_one_checkpoint_per_step(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    ckpt, _ = trained
    root = ckpt.parent / "managed"
    # keep_last=2 of steps 1, 2, 3 (one rank deleted step 1), and no temporaries.
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]
    assert ac.CheckpointManager(root).steps() == [2, 3]
    for step in (2, 3):
        names = sorted(p.name for p in (root / f"step_{step:08d}").iterdir())
        assert names == ["rank_0", "rank_1", "rank_2", "rank_3", "sharding_meta.json"]
    got = ac.CheckpointManager(root).restore()  # one process: whole tensors
    want = ac.load_checkpoint(ckpt.parent / "whole")
    assert got is not None and got.training_state.step == 3
    for name, value in want.model.items():
        np.testing.assert_array_equal(got.model[name], value, err_msg=name)


def test_inconsistent_placements_at_save_fail_every_rank(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    ckpt, res = trained
    for r in res:
        got = r["errors"]["disagree"]
        # Ranks 0, 1 held g as (Shard(0), Shard(1)), ranks 2, 3 as (Shard(1), Shard(0)).
        assert got["type"] == ("TopologyError" if r["rank"] == 0 else "CheckpointWriteError")
        assert "model tensor 'g' [7, 6]: ranks [1, 2] each saved [0:4, 3:6]" in got["error"]
        assert "placements were inconsistent" in got["error"]
        assert "nothing was committed" in got["error"]
        got = r["errors"]["wrong_shape"]
        if r["rank"] == 3:  # its local tensor is not what its placements give it
            assert got["type"] == "InvalidInputError"
            assert (
                "model_state['g'] on rank 3: the DTensor's local tensor is [2, 6]" in (got["error"])
            )
            assert "give this rank [1, 6] of the global [7, 6]" in got["error"]
        else:  # told at once, not left to time out
            assert got["type"] == "CheckpointWriteError"
            assert "rank 3 failed: InvalidInputError" in got["error"]
    assert not (ckpt.parent / "bad1").exists() and not (ckpt.parent / "bad2").exists()


def tampered(ckpt: Path, tmp_path: Path, edit: Any) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    meta_path = broken / "sharding_meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["arrayckpt"]["ranks"])
    # a crafted file with a valid checksum: the manifest checks must catch it themselves
    meta["arrayckpt"]["crc32c"] = doc_checksum(meta)
    meta_path.write_text(json.dumps(meta))
    return broken


def test_missing_rank_directory_is_named(
    trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    ckpt, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(ckpt.parent / "zoo", broken)
    shutil.rmtree(broken / "rank_2")
    with pytest.raises(ac.CheckpointNotFoundError, match=r"saved by 4 ranks .*missing rank_2/"):
        ac.load_distributed_checkpoint(broken, 0, world_size=1)


@pytest.mark.parametrize(
    ("offset", "region"),
    [
        ([0, 0], "0:2, 0:6"),  # rank 0's rows, not 2:4
        ([1, 0], "1:2, 0:6"),  # boxes no longer on one grid: one spans two cells
    ],
)
def test_overlapping_boxes_name_the_tensor_and_ranks(
    trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path, offset: list[int], region: str
) -> None:
    ckpt, _ = trained

    def overlap(ranks: list[dict[str, Any]]) -> None:
        ranks[1]["model"]["s0_s0"]["global_offset"] = offset

    broken = tampered(ckpt.parent / "zoo", tmp_path, overlap)
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=rf"model tensor 's0_s0' \[7, 6\]: ranks \[0, 1\] each saved \[{region}\]",
    ):
        ac.load_distributed_checkpoint(broken, 0, world_size=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("global_offset", [6, 0]),  # 2 rows from row 6 of 7
        ("global_runs", [[[2, 1]], [[0, 6]]]),  # 1 row for a 2-row shard
        ("global_runs", [[[2, 1], [7, 1]], [[0, 6]]]),  # row 7 of 7
    ],
)
def test_a_box_outside_the_tensor_is_refused(
    trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path, field: str, value: Any
) -> None:
    ckpt, _ = trained

    def move(ranks: list[dict[str, Any]]) -> None:
        ranks[1]["model"]["s0_s0"][field] = value

    broken = tampered(ckpt.parent / "zoo", tmp_path, move)
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=r"model tensor 's0_s0' of rank_1: .* do not place a \[2, 6\] box inside the "
        r"global \[7, 6\]",
    ):
        ac.load_distributed_checkpoint(broken, 0, world_size=1)


def test_tp_fsdp_example_restores_exactly_on_fsdp_alone(tmp_path: Path) -> None:
    """docs/examples/tp_fsdp.py: TP x FSDP + AdamW on 4 ranks, restored by FSDP on 2."""
    script = Path(__file__).resolve().parents[1] / "docs" / "examples" / "tp_fsdp.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0.weight is (_StridedShard(dim=0, sf=2), Shard(dim=0))" in proc.stdout
    assert "restored by FSDP on 2: weights and AdamW state exact" in proc.stdout
    # 51 float32 parameters and as many of each AdamW moment, FSDP's rows of each (rank 0:
    # 29 of them, rank 1: 22), plus the 4 float32 step counters on each rank.
    assert "rank 0: read 364 bytes" in proc.stdout and "rank 1: read 280 bytes" in proc.stdout
