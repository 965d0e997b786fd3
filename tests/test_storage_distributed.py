"""Distributed checkpoints on a real S3 server (SeaweedFS) with real gloo ranks: FSDP2
saved at 2 ranks and resumed exactly at 1 and 3, ShardingConfig state resharded and
consolidated, one commit object only after every rank's upload, a killed or failing rank
leaving no step and the previous one intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dist_launch import base_env, free_port, read_logs, run_scenario
from s3server import S3Server

import arrayckpt as ac
from arrayckpt.errors import CheckpointNotFoundError, InvalidInputError
from arrayckpt.storage import objects, parse_url

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).resolve().parent / "_s3dist_worker.py"
#: What each rank's wait for the others may take in these tests (ARRAYCKPT_DIST_TIMEOUT).
DIST_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def s3(s3_server: S3Server) -> Iterator[S3Server]:
    """The server's settings in this process's environment (the ranks inherit them); the
    ranks run FSDP2 on gloo."""
    pytest.importorskip("torch.distributed.tensor", reason="the ranks need torch with DTensor")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**s3_server.env, "ARRAYCKPT_DIST_TIMEOUT": str(DIST_TIMEOUT_S)}.items():
            mp.setenv(key, value)
        yield s3_server


def _listing(url: str) -> set[str]:
    """Every object under the step ``url``, relative to it."""
    import obstore

    parsed = parse_url(url)
    store = objects.open_store(parsed)
    found = obstore.list(store, parsed.prefix + "/").collect()
    return {m["path"][len(parsed.prefix) + 1 :] for m in found}


@pytest.fixture(scope="module")
def trained(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Any]]:
    url = s3.url("fsdp/step_3")
    res = run_scenario(WORKER, "train", url, tmp_path_factory.mktemp("train") / "out", 2)
    return url, res


def test_fsdp2_save_commits_one_step_with_every_rank(trained: tuple[str, list[Any]]) -> None:
    url, res = trained
    assert all(r["saved"] == [url, url + "-async"] for r in res)
    for step in (url, url + "-async"):
        rank_files = ("model.safetensors", "optimizer.safetensors", "training_state.json")
        listing = _listing(step)
        assert listing == {
            objects.COMMIT_OBJECT,
            "sharding_meta.json",
            *(f"rank_{r}/{f}" for r in (0, 1) for f in rank_files),
        }
        store = objects.open_store(parse_url(step))
        files = objects.read_commit(store, parse_url(step), ranks=True)
        assert set(files) == listing - {objects.COMMIT_OBJECT}  # one commit lists every rank


def test_async_distributed_save_talks_to_the_store_from_the_writer_thread_only(
    trained: tuple[str, list[Any]],
) -> None:
    _, res = trained
    for r in res:
        assert r["network_threads"] and "MainThread" not in r["network_threads"], r
        assert r["allreduces_during"] >= 20  # training collectives ran meanwhile


@pytest.mark.parametrize(("world", "suffix"), [(3, ""), (1, ""), (1, "-async")])
def test_fsdp2_resumes_from_s3_at_another_world_size_exactly(
    trained: tuple[str, list[Any]], tmp_path: Path, world: int, suffix: str
) -> None:
    url, saved = trained
    res = run_scenario(WORKER, "resume", url + suffix, tmp_path / "out", world)
    assert res[0]["losses"] == saved[0]["losses"][3:]  # exact floats, not approximately
    assert all(r["step"] == 3 and r["opt_steps"] == [3.0] for r in res)
    # As from a local disk (tests/test_fsdp2_resume.py): the shards are read once, plus
    # each rank's 4 step counters; and the store sent exactly those bytes, no more.
    assert sum(r["bytes_read"] for r in res) == 3 * 66 * 4 + world * 4 * 4
    assert all(r["bytes_fetched"] == r["bytes_read"] for r in res), res


@pytest.fixture(scope="module")
def sharded(
    s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, np.ndarray, np.ndarray]:
    """The URL the ranks saved under, and the global tensors they split between them."""
    url = s3.url("sharded")
    res = run_scenario(WORKER, "sharded", url, tmp_path_factory.mktemp("sharded") / "out", 2)
    return url, np.asarray(res[0]["w"], np.float32), np.asarray(res[0]["v"], np.int64)


def test_tensor_parallel_state_reshards_from_s3(sharded: tuple[str, Any, Any]) -> None:
    base, W, V = sharded
    url = base + "/tp"
    whole = ac.load_distributed_checkpoint(url, 0, world_size=1)
    np.testing.assert_array_equal(whole.model["w"], W)
    np.testing.assert_array_equal(whole.model["v"], V)
    np.testing.assert_array_equal(whole.optimizer["w"], W * 2)
    assert whole.training_state.step == 7
    rows = [ac.load_distributed_checkpoint(url, r, world_size=3).model["w"] for r in range(3)]
    assert [len(r) for r in rows] == [4, 3, 3]  # numpy.array_split's rule over 10 rows
    np.testing.assert_array_equal(np.concatenate(rows), W)
    own = ac.load_distributed_checkpoint(url, 1)  # the saved world size: rank 1's own files
    np.testing.assert_array_equal(own.model["w"], W[6:])


def test_zero_partitioned_state_loads_from_s3(sharded: tuple[str, Any, Any]) -> None:
    got = ac.load_distributed_checkpoint(sharded[0] + "/zero", 0, world_size=1)
    assert sorted(got.model) == ["p0", "p1"]
    np.testing.assert_array_equal(got.model["p1"], np.full(4, 1))


@pytest.mark.parametrize("to_url", [False, True])
def test_consolidate_from_s3(sharded: tuple[str, Any, Any], tmp_path: Path, to_url: bool) -> None:
    base, W, _ = sharded
    out = base + "/merged" if to_url else tmp_path / "merged"
    got = ac.consolidate_checkpoint(base + "/tp", out)
    assert str(got) == str(out)
    merged = ac.load_checkpoint(out)
    np.testing.assert_array_equal(merged.model["w"], W)
    np.testing.assert_array_equal(merged.optimizer["w"], W * 2)
    assert merged.training_state.step == 7


def test_consolidate_refuses_an_output_inside_the_source(sharded: tuple[str, Any, Any]) -> None:
    with pytest.raises(InvalidInputError, match="overlaps"):
        ac.consolidate_checkpoint(sharded[0] + "/tp", sharded[0] + "/tp/merged")


def test_a_failing_rank_fails_every_rank_and_commits_nothing(s3: S3Server, tmp_path: Path) -> None:
    url = s3.url("fail")
    res = run_scenario(WORKER, "fail", url, tmp_path / "out", 2)
    for r in res:
        assert r["type"] == "CheckpointWriteError", r
        assert f"{url}/step_2" in r["error"] and "nothing was committed" in r["error"]
        assert r["elapsed"] < DIST_TIMEOUT_S  # told at once, not left to time out
    assert "rank 1 failed" in res[0]["error"]  # rank 0 says which rank failed
    assert f"uploading {url}/step_2/rank_1/" in res[1]["error"]  # rank 1 says what failed
    assert objects.COMMIT_OBJECT not in _listing(url + "/step_2")
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        ac.load_distributed_checkpoint(url + "/step_2", 0)
    np.testing.assert_array_equal(
        ac.load_distributed_checkpoint(url + "/step_1", 1).model["x"], np.full(3, 1)
    )


def _start(scenario: str, url: str, out: Path, world: int) -> list[subprocess.Popen[bytes]]:
    out.mkdir()
    env = {**base_env(), "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = []
    for r in range(world):
        with open(out / f"log_{r}.txt", "wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), scenario, url, str(out)],
                    env={**env, "RANK": str(r)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


@pytest.mark.parametrize("victim", [1, 0])
def test_rank_killed_mid_upload_leaves_no_step(s3: S3Server, tmp_path: Path, victim: int) -> None:
    url = s3.url(f"kill{victim}")
    out = tmp_path / "out"
    procs = _start(f"kill{victim}", url, out, 2)
    logs = [out / f"log_{r}.txt" for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        started = f"rank_{victim}/model.safetensors"  # its optimizer upload is under way
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            try:
                if started in _listing(url + "/step_2"):
                    break
            except Exception:
                pass  # nothing listed yet
            time.sleep(0.02)
        assert all(p.poll() is None for p in procs), "a rank exited early:\n" + read_logs(logs)
        os.killpg(procs[victim].pid, signal.SIGKILL)
        survivor = procs[1 - victim]
        survivor.wait(timeout=DIST_TIMEOUT_S + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    result = out / f"result_{1 - victim}.json"
    assert result.exists(), "the survivor wrote no result:\n" + read_logs(logs)
    got = json.loads(result.read_text())
    assert got["ok"], got.get("error")
    # the coordinator's own error for a vanished rank, as on a local disk, naming the step
    assert got["type"] == "TopologyError", got
    assert f"{url}/step_2" in got["error"], got["error"]
    assert got["elapsed"] < DIST_TIMEOUT_S + 30  # within the coordination timeout
    assert objects.COMMIT_OBJECT not in _listing(url + "/step_2"), "killed too late"
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        ac.load_distributed_checkpoint(url + "/step_2", 0)
    previous = ac.load_distributed_checkpoint(url + "/step_1", 0, world_size=1)
    assert sorted(previous.model) == ["p0", "p1"] and previous.training_state.step == 1


# One process, no engine: a world of one commits the step itself.


def test_one_rank_saves_and_loads_without_an_engine(s3_env: S3Server) -> None:
    url = s3_env.url("solo/step_1")
    tp = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    got = ac.save_distributed_checkpoint(url, 0, 1, {"w": w}, {"m": -w}, ac.TrainingState(5), tp)
    assert got == url
    assert objects.COMMIT_OBJECT in _listing(url) and "rank_0/model.safetensors" in _listing(url)
    own = ac.load_distributed_checkpoint(url, 0)
    np.testing.assert_array_equal(own.model["w"], w)
    np.testing.assert_array_equal(own.optimizer["m"], -w)
    assert own.training_state.step == 5
    half = ac.load_distributed_checkpoint(url, 1, world_size=2)  # resharded: rows 2 and 3
    np.testing.assert_array_equal(half.model["w"], w[2:])


def test_extra_state_comes_back_from_s3_resharded_and_consolidated(
    s3_env: S3Server, tmp_path: Path
) -> None:
    url = s3_env.url("solo-extra/step_1")
    tp = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    extra = {"sched": {"last_epoch": 3}, "buf": np.arange(4)}
    ac.save_distributed_checkpoint(url, 0, 1, {"w": w}, None, ac.TrainingState(5), tp, extra=extra)
    for got in (
        ac.load_distributed_checkpoint(url, 0).extra,
        ac.load_distributed_checkpoint(url, 1, world_size=2).extra,  # resharded: rank 0's
    ):
        assert got["sched"] == {"last_epoch": 3}
        np.testing.assert_array_equal(got["buf"], np.arange(4))
    ac.consolidate_checkpoint(url, tmp_path / "merged")
    merged = ac.load_checkpoint(tmp_path / "merged").extra
    assert merged["sched"] == {"last_epoch": 3}
    np.testing.assert_array_equal(merged["buf"], np.arange(4))


def test_storage_options_reach_every_distributed_entry_point(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in s3_server.env:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    options = {
        "endpoint": s3_server.endpoint,
        "access_key_id": "arrayckpt-test",
        "secret_access_key": "arrayckpt-test-secret",
        "region": "us-east-1",
    }
    url = s3_server.url("options/step_1")
    with ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save_distributed(url, 0, 1, {"x": np.arange(4)}, storage_options=options)
        assert future.result(timeout=60) == url
    got = ac.load_distributed_checkpoint(url, 0, world_size=2, storage_options=options)
    np.testing.assert_array_equal(got.model["x"], np.arange(4))  # Replicated: rank 0's
    ac.consolidate_checkpoint(url, tmp_path / "merged", storage_options=options)
    np.testing.assert_array_equal(ac.load_checkpoint(tmp_path / "merged").model["x"], np.arange(4))


def test_several_ranks_without_a_coordinator_are_refused(s3_env: S3Server) -> None:
    url = s3_env.url("uncoordinated/step_1")
    with pytest.raises(InvalidInputError, match="needs a coordinated save"):
        ac.save_distributed_checkpoint(url, 0, 2, {"x": np.arange(3)}, coordinator=None)
    assert _listing(url) == set()  # refused before anything was uploaded


def test_a_committed_distributed_step_is_not_replaced(s3_env: S3Server) -> None:
    url = s3_env.url("again/step_1")
    ac.save_distributed_checkpoint(url, 0, 1, {"x": np.arange(3)})
    with pytest.raises(InvalidInputError, match="already holds a committed checkpoint"):
        ac.save_distributed_checkpoint(url, 0, 1, {"x": np.arange(4)})
    np.testing.assert_array_equal(ac.load_distributed_checkpoint(url, 0).model["x"], np.arange(3))


def test_a_plain_checkpoint_is_not_a_distributed_one(s3_env: S3Server) -> None:
    url = s3_env.url("plain/step_1")
    ac.save_checkpoint(url, {"x": np.arange(3)})
    with pytest.raises(CheckpointNotFoundError, match="is not a distributed checkpoint"):
        ac.load_distributed_checkpoint(url, 0)


def test_a_distributed_step_is_not_a_plain_checkpoint(s3_env: S3Server) -> None:
    url = s3_env.url("notplain/step_1")
    ac.save_distributed_checkpoint(url, 0, 1, {"x": np.arange(3)})
    with pytest.raises(InvalidInputError, match="is a distributed checkpoint; use load_distrib"):
        ac.load_checkpoint(url)


def test_changed_sharding_meta_is_detected(s3_env: S3Server) -> None:
    import obstore

    url = s3_env.url("tampered/step_1")
    ac.save_distributed_checkpoint(url, 0, 1, {"x": np.arange(3)})
    store = objects.open_store(parse_url(url))
    key = "tampered/step_1/sharding_meta.json"
    text = bytes(obstore.get(store, key).bytes())
    obstore.put(store, key, text.replace(b'"world_size": 1', b'"world_size": 2'))  # same size
    with pytest.raises(ac.CheckpointError, match="does not match its commit object"):
        ac.load_distributed_checkpoint(url, 0)


@pytest.mark.parametrize("world_size", [None, 2])  # its own files whole, or resharded
def test_a_flipped_bit_in_a_rank_object_is_detected(
    s3_env: S3Server, world_size: int | None
) -> None:
    import obstore

    url = s3_env.url(f"flipped{world_size}/step_1")
    ac.save_distributed_checkpoint(url, 0, 1, {"x": np.arange(64, dtype=np.float32)})
    store = objects.open_store(parse_url(url))
    key = parse_url(url).key("rank_0/model.safetensors")
    data = bytearray(obstore.get(store, key).bytes())
    data[-1] ^= 1  # the last byte of tensor data
    obstore.put(store, key, bytes(data))
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load_distributed_checkpoint(url, 0, world_size=world_size)


def test_file_url_is_a_local_distributed_checkpoint(tmp_path: Path) -> None:
    ac.save_distributed_checkpoint(f"file://{tmp_path}/step_1", 0, 1, {"x": np.arange(3)})
    assert (tmp_path / "step_1" / "rank_0" / "model.safetensors").exists()
    got = ac.load_distributed_checkpoint(f"file://{tmp_path}/step_1", 0)
    np.testing.assert_array_equal(got.model["x"], np.arange(3))


# The protocol's failure paths, ranks as threads (tests/dist_threads.py) on the real server.


@pytest.mark.parametrize("bad", [0, 1])
def test_an_invalid_state_on_one_rank_fails_every_rank(s3_env: S3Server, bad: int) -> None:
    from dist_threads import run_ranks

    url = s3_env.url(f"invalid{bad}/step_1")

    def save(rank: int, coord: Any) -> Any:
        state = {"x": object() if rank == bad else np.arange(3)}  # not an array: refused
        return ac.save_distributed_checkpoint(url, rank, 3, state, coordinator=coord)

    out = run_ranks(3, save, timeout=20)
    assert isinstance(out[bad], ac.UnsupportedArrayError), out
    for rank, got in enumerate(out):
        if rank != bad:
            assert isinstance(got, ac.CheckpointWriteError), got
            assert url in str(got) and "nothing was committed" in str(got)
    assert objects.COMMIT_OBJECT not in _listing(url)


def test_ranks_disagreeing_on_the_sharding_commit_nothing(s3_env: S3Server) -> None:
    from dist_threads import run_ranks

    url = s3_env.url("disagree/step_1")
    configs = [ac.ShardingConfig(ac.Replicated()), ac.ShardingConfig(ac.ZeroPartitioned(3))]

    def save(rank: int, coord: Any) -> Any:
        return ac.save_distributed_checkpoint(
            url, rank, 2, {"x": np.arange(3)}, sharding=configs[rank], coordinator=coord
        )

    out = run_ranks(2, save, timeout=20)
    assert isinstance(out[0], ac.TopologyError) and "ranks [1]" in str(out[0]), out
    assert isinstance(out[1], ac.CheckpointWriteError) and url in str(out[1]), out
    assert objects.COMMIT_OBJECT not in _listing(url)
