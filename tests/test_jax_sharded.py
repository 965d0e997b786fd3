"""Sharded jax.Arrays: saved shard by shard, restored into any sharding box by box, and
across frameworks with FSDP2 (real gloo ranks, real JAX on 8 CPU devices).

JAX takes its device count when it is first imported, and this test process may already
have imported it with one device, so the JAX side runs in a child process
(tests/_jax_sharded_child.py) that reports what it saw as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dist_launch import LIMIT_S, base_env, free_port, run_scenario

import arrayckpt as ac

pytest.importorskip("jax", reason="sharded jax.Arrays need jax (nox -s tests installs it)")
HERE = Path(__file__).resolve().parent
CHILD = HERE / "_jax_sharded_child.py"
FSDP2_WORKER = HERE / "_jax_fsdp2_worker.py"


def jax_child(*args: object) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(CHILD), *map(str, args)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return jax_child("formats", tmp_path_factory.mktemp("jax_formats"))


def all_true(found: dict[str, bool]) -> None:
    assert found and all(found.values()), found


def test_save_checkpoint_assembles_the_shards_on_the_host(formats: dict[str, Any]) -> None:
    all_true(formats["plain_whole"])


def test_distributed_save_records_the_global_boxes(formats: dict[str, Any]) -> None:
    manifest = formats["manifest"]
    assert manifest["params.w"]["global_shape"] == [8, 12]
    assert manifest["params.e"]["global_offset"] == [0, 0, 0]
    assert manifest["params.h"]["dtype"] == "BF16"
    assert manifest["step"]["global_shape"] == []  # a one-device array beside them


@pytest.mark.parametrize("source", ["plain", "dist", "async_plain", "async_dist"])
def test_restores_into_other_shardings(formats: dict[str, Any], source: str) -> None:
    # the template's exact shardings, values and dtypes; every device holds its own slice
    all_true(formats[f"{source}_restored"])


def test_each_distinct_box_is_read_once(formats: dict[str, Any]) -> None:
    all_true(formats["dist_restored_verify_True"])
    all_true(formats["dist_restored_verify_False"])
    nbytes = formats["nbytes"]
    # One process needs every byte: with checksums on it reads each saved tensor whole
    # (one range each) and checks it; without, each device's box by its rows. Replicas
    # ("h" over "data", the one-device "step" everywhere) are not read again.
    assert formats["stats_verify_True"] == [nbytes, 5]
    read, ranges = formats["stats_verify_False"]
    assert read == nbytes and ranges > 5


@pytest.mark.parametrize("source", ["plain", "dist"])
def test_mismatched_templates_name_the_tensor(formats: dict[str, Any], source: str) -> None:
    larger, changed, dtype = (
        formats[f"{source}_error_{k}"] for k in ("larger", "changed", "dtype")
    )
    assert larger.startswith("InvalidInputError") and "['params']['w']" in larger
    assert "the template [16, 12] (larger than the saved tensor 'params.w')" in larger
    assert "the template [8, 11] (the saved tensor 'params.w')" in changed
    assert "dtype float32, the template float16 (the saved tensor 'params.w')" in dtype


def test_a_damaged_box_fails_its_checksum(formats: dict[str, Any]) -> None:
    assert formats["damaged"].startswith("CorruptCheckpointError")
    assert "'params.h' fails its CRC32C checksum" in formats["damaged"]


@pytest.mark.distributed
def test_fsdp2_to_jax_and_back(tmp_path: Path) -> None:
    """FSDP2 + AdamW saved on 2 gloo ranks restores as sharded jax.Arrays on 8 devices;
    saved from those, it restores as DTensors on 3 ranks, which train on exactly as the
    uninterrupted 2-rank run did."""
    pytest.importorskip("torch.distributed.tensor", reason="needs torch with DTensor")
    trained = run_scenario(FSDP2_WORKER, "train", tmp_path / "torch", tmp_path / "train", 2)
    jax_side = jax_child("from_torch", tmp_path / "torch", tmp_path / "jax")
    assert jax_side["step"] == 3
    for part in ("model", "optimizer", "via_dist", "round_trip"):
        all_true(jax_side[part])
    assert jax_side["param_groups"]
    assert jax_side["whole_optimizer"] and jax_side["no_optimizer"] is None
    assert jax_side["bytes_read"] == jax_side["nbytes"]  # each saved byte once
    resumed = run_scenario(FSDP2_WORKER, "resume", tmp_path / "jax", tmp_path / "resume", 3)
    for r in resumed:
        assert r["step"] == 3
        all_true(r["equal"])
    assert resumed[0]["losses"] == trained[0]["losses"][3:]  # exact floats


@pytest.mark.distributed
def test_the_docs_fsdp2_to_jax_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.tensor", reason="needs torch with DTensor")
    script = HERE.parent / "docs" / "examples" / "fsdp2_to_jax.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=2 * LIMIT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "JAX: 0.weight (16, 8) over 8 devices, shard (4, 4) on each; step 3" in proc.stdout
    assert "3 torch ranks: weights and AdamW state equal what 2 ranks saved" in proc.stdout


@pytest.mark.distributed
def test_two_processes_save_their_shards_and_read_only_their_boxes(tmp_path: Path) -> None:
    """jax.distributed with 2 processes of 4 CPU devices (gloo coordinates the commit):
    each process writes its own rows; loaded back in another sharding, each reads only
    the byte ranges of its devices' boxes (half of each tensor). A mesh whose devices
    interleave the processes is refused at save, naming the tensor."""
    pytest.importorskip("torch.distributed", reason="the commit is coordinated over gloo")
    worker = HERE / "_jax_multiproc_worker.py"
    res = run_scenario(worker, str(free_port()), tmp_path / "ckpt", tmp_path / "out", 2)
    for r in res:
        assert r["shards_equal"] and r["shardings"]
        assert r["bytes_read"] == (16 * 8 * 4 + 8 * 4) // 2  # w's columns, b's elements
        assert r["interleaved"].startswith("InvalidInputError: model_state['w']: ")
        assert "do not form one box" in r["interleaved"]
    assert not (tmp_path / "interleaved").exists()
    meta = json.loads((tmp_path / "ckpt" / "sharding_meta.json").read_text())
    boxes = [m["model"] for m in meta["arrayckpt"]["ranks"]]
    assert boxes[0]["w"]["global_offset"] == [0, 0] and boxes[0]["w"]["shape"] == [8, 8]
    assert boxes[1]["w"]["global_offset"] == [8, 0] and "b" not in boxes[1]  # b: once
    whole = ac.load_distributed_checkpoint(tmp_path / "ckpt", 0, world_size=1).model
    assert np.array_equal(whole["w"], np.arange(128, dtype=np.float32).reshape(16, 8) / 3)
