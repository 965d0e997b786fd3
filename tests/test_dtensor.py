"""DTensor state (placements read from the arrays) saved on 2 gloo ranks, resharded on load."""

from __future__ import annotations

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
WORKER = Path(__file__).resolve().parent / "_dtensor_worker.py"


def run(scenario: str, ckpt: Path, out: Path, world: int) -> list[dict[str, Any]]:
    return run_scenario(WORKER, scenario, ckpt, out, world)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dtensor")
    run("save", base / "ckpt", base / "save", 2)
    return base / "ckpt"


def expected() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    w = np.arange(15, dtype=np.float32).reshape(5, 3)
    return (
        {
            "w": w,
            "c": np.arange(10, dtype=np.int64).reshape(2, 5) * 7,
            "b": np.arange(4, dtype=np.float32) / 4,
            "plain": np.ones(3, np.float32),
        },
        {"w.exp_avg": w * 0.5},
    )


def test_each_rank_writes_only_its_shards_and_replicas_once(saved: Path) -> None:
    r0 = ac.load_checkpoint(saved / "rank_0").model
    r1 = ac.load_checkpoint(saved / "rank_1").model
    assert {k: v.shape for k, v in r0.items()} == {
        "w": (3, 3),
        "c": (2, 3),
        "b": (4,),
        "plain": (3,),
    }
    assert {k: v.shape for k, v in r1.items()} == {"w": (2, 3), "c": (2, 2)}  # uneven halves
    import json

    ranks = json.loads((saved / "sharding_meta.json").read_text())["arrayckpt"]["ranks"]
    assert ranks[1]["model"]["w"]["global_offset"] == [3, 0]
    assert ranks[1]["model"]["c"]["global_offset"] == [0, 3]
    assert ranks[0]["model"]["w"]["global_shape"] == [5, 3]


@pytest.mark.parametrize("how", ["sync", "async"])
def test_one_process_gets_whole_tensors(saved: Path, how: str) -> None:
    stats = ac.ReadStats()
    where = saved if how == "sync" else saved.parent / "async"
    ckpt = ac.load_distributed_checkpoint(where, 0, world_size=1, stats=stats)
    model, opt = expected()
    assert ckpt.model.keys() == model.keys() and ckpt.optimizer is not None
    for name, want in model.items():
        np.testing.assert_array_equal(ckpt.model[name], want)
    np.testing.assert_array_equal(ckpt.optimizer["w.exp_avg"], opt["w.exp_avg"])
    assert ckpt.training_state.step == 7
    assert ckpt.extra is not None and ckpt.extra["rank"] == 0  # rank 0's, as resharded
    np.testing.assert_array_equal(ckpt.extra["buf"], [0, 1])
    total = sum(a.nbytes for a in [*model.values(), *opt.values()])
    assert stats.bytes_read == total  # every byte once, none twice


def test_reshard_into_dtensors_on_three_ranks(saved: Path, tmp_path: Path) -> None:
    res = run("load", saved, tmp_path / "load", 3)
    total = 0
    for r in res:
        assert all(r["equal"].values()), r["equal"]
        assert r["filled_in_place"] and r["step"] == 7 and r["metadata"] == {"k": "v"}
        assert r["extra"] == [0, [0, 1]]  # every new rank resumes from rank 0's extra state
        assert r["bigger"].startswith("TopologyError") and "'w'" in r["bigger"]
        assert "larger than the saved [5, 3]" in r["bigger"] and "ranks [0, 1]" in r["bigger"]
        total += r["bytes_read"]
    # Sharded tensors are read once in all; replicated ones (b, plain) once per rank.
    sharded = (15 + 15) * 4 + 10 * 8
    assert total == sharded + 3 * (4 * 4 + 3 * 4)


def test_missing_shard_names_tensor_and_ranks(saved: Path, tmp_path: Path) -> None:
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    meta_path = broken / "sharding_meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["arrayckpt"]["ranks"][1]["model"]["w"]  # rank 1's box of w: lost
    # a crafted file with a valid checksum: the manifest checks must catch it themselves
    meta["arrayckpt"]["crc32c"] = doc_checksum(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ac.CorruptCheckpointError, match=r"rank_1.*does not match"):
        ac.load_distributed_checkpoint(broken, 0, world_size=1)


def test_ranks_disagreeing_on_global_shape_name_tensor_and_ranks(
    saved: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    meta_path = broken / "sharding_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["arrayckpt"]["ranks"][1]["model"]["w"]["global_shape"] = [6, 3]
    # a crafted file with a valid checksum: the manifest checks must catch it themselves
    meta["arrayckpt"]["crc32c"] = doc_checksum(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=r"'w': rank_1 saved a box of F32\[6, 3\], "
        r"rank_0 of F32\[5, 3\]",
    ):
        ac.load_distributed_checkpoint(broken, 0, world_size=1)


def test_several_ranks_without_targets_are_told_to_pass_into(saved: Path) -> None:
    with pytest.raises(ac.InvalidInputError, match="needs into="):
        ac.load_distributed_checkpoint(saved, 1, world_size=3)


def test_fsdp2_example_reshards_2_to_3_exactly(tmp_path: Path) -> None:
    """docs/examples/fsdp2_reshard.py: fully_shard + AdamW on 2 ranks, restored on 3."""
    script = Path(__file__).resolve().parents[1] / "docs" / "examples" / "fsdp2_reshard.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restored on 3: weights and AdamW state exact" in proc.stdout
    # 51 float32 parameters, and as many of each AdamW moment: each of the 3 ranks reads
    # its third of the three (3 x 68 bytes), plus the 4 float32 step counters (16 bytes).
    assert sorted(proc.stdout.count(f"rank {r}: step 3, read 220 bytes") for r in range(3)) == [
        1,
        1,
        1,
    ]


def test_consolidate_assembles_whole_tensors(saved: Path, tmp_path: Path) -> None:
    ac.consolidate_checkpoint(saved, tmp_path / "merged")
    merged = ac.load_checkpoint(tmp_path / "merged")
    model, opt = expected()
    assert merged.model.keys() == model.keys()
    for name, want in model.items():
        np.testing.assert_array_equal(merged.model[name], want)
    np.testing.assert_array_equal(merged.optimizer["w.exp_avg"], opt["w.exp_avg"])
    assert merged.training_state.step == 7 and merged.training_state.metadata == {"k": "v"}
    assert merged.extra is not None and merged.extra["rank"] == 0
    np.testing.assert_array_equal(merged.extra["buf"], [0, 1])


def test_edited_training_state_fails_its_checksum(saved: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    path = broken / "rank_0" / "training_state.json"
    text = path.read_text()
    edited = text.replace('"step":7', '"step":8').replace('"step": 7', '"step": 8')
    assert edited != text  # still valid JSON: only the checksum can tell
    path.write_text(edited)
    with pytest.raises(ac.CorruptCheckpointError, match=r"training_state\.json fails the CRC32C"):
        ac.load_distributed_checkpoint(broken, 0, world_size=1)


def test_changed_dtype_or_larger_target_names_the_tensor(saved: Path) -> None:
    torch = pytest.importorskip("torch")
    model, _ = expected()
    into = {n: torch.zeros(a.shape, dtype=torch.from_numpy(a).dtype) for n, a in model.items()}
    ac.load_distributed_checkpoint(saved, 0, world_size=1, into=into)
    assert torch.equal(into["w"], torch.from_numpy(model["w"]))  # filled in place
    with pytest.raises(
        ac.InvalidInputError,
        match=r"into\['w'\] on rank 0: the target is F64, "
        r"the checkpoint holds F32",
    ):
        ac.load_distributed_checkpoint(
            saved, 0, world_size=1, into={"w": torch.zeros(5, 3, dtype=torch.float64)}
        )
    with pytest.raises(
        ac.TopologyError,
        match=r"into\['c'\].*\[2, 6\] is larger than the saved "
        r"\[2, 5\] \(saved by ranks \[0, 1\]\)",
    ):
        ac.load_distributed_checkpoint(
            saved, 0, world_size=1, into={"c": torch.zeros(2, 6, dtype=torch.int64)}
        )


def test_keys_on_a_distributed_checkpoint_are_refused_not_ignored(saved: Path) -> None:
    """keys= selects tensors of one file: on a distributed checkpoint it is refused with
    the fix, also beside a JAX template (whose restore would otherwise drop it)."""
    with pytest.raises(ac.InvalidInputError, match="keys= selects tensors of one file"):
        ac.load_checkpoint(saved, keys=["w"])
    jax = pytest.importorskip("jax", reason="JAX is not installed")
    template = {"w": jax.ShapeDtypeStruct((5, 3), np.float32)}
    with pytest.raises(ac.InvalidInputError, match="keys= and into= cannot be combined"):
        ac.load_checkpoint(saved, keys=["w"], into=template)
