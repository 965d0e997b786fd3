"""Coordinated saves over jax.distributed: two CPU processes, the service on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dist_launch import base_env, free_port, read_logs, wait_all

import arrayckpt as ac

pytestmark = pytest.mark.distributed

pytest.importorskip("jax", reason="jax is not installed")

WORKER = Path(__file__).resolve().parent / "_jax_worker.py"
WORLD = 2


def start_job(
    mode: str, out: Path, env: dict[str, str] | None = None, processes: int = WORLD
) -> list[Path]:
    """Run the processes of one jax.distributed job to the end; return their logs."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    full = {**base_env(), "JAX_PLATFORMS": "cpu", **(env or {})}
    procs, logs = [], []
    for pid in range(processes):
        logs.append(out / f"log_{pid}.txt")
        with open(logs[-1], "wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), mode, str(pid), port, str(out)],
                    env=full,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # wait_all kills the whole group on timeout
                )
            )
    wait_all(procs, logs)
    return logs


def result(out: Path, pid: int, logs: list[Path]) -> dict[str, Any]:
    path = out / f"result_{pid}.json"
    if not path.exists():
        pytest.fail(f"process {pid} wrote no results; logs:\n" + read_logs(logs))
    return dict(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("jax")
    logs = start_job("main", out, {"TORCH_PORT": str(free_port())})
    return [result(out, pid, logs) for pid in range(WORLD)]


def ok(res: list[dict[str, Any]], name: str) -> None:
    for pid, r in enumerate(res):
        assert r[name]["ok"], (pid, r[name])


def test_auto_picks_jax_distributed_and_reuses_one_coordinator(job: list[dict[str, Any]]) -> None:
    ok(job, "auto")


def test_auto_prefers_torch_distributed_when_both_are_initialised(
    job: list[dict[str, Any]],
) -> None:
    pytest.importorskip("torch", reason="torch is not installed")
    ok(job, "precedence")


def test_auto_is_caller_coordinated_until_jax_distributed_is_initialised() -> None:
    import jax  # imported, but jax.distributed.initialize never called

    from arrayckpt.distributed.coordinator import resolve

    assert resolve("auto", 0, 1) is None
    with pytest.raises(ac.InvalidInputError, match="client"):
        resolve(jax.numpy.zeros(2), 0, 1)  # a jax object, but not the client
    with pytest.raises(ac.InvalidInputError, match="is not initialised"):
        resolve("jax", 0, 1)
    with pytest.raises(ac.InvalidInputError, match="is not initialised"):
        ac.distributed.JaxCoordinator()


def test_coordinated_save_commits_once_and_reshards(job: list[dict[str, Any]]) -> None:
    ok(job, "sync")
    for r in job:
        assert r["sync"]["committed"] == ["rank_0", "rank_1", "sharding_meta.json"]


def test_save_through_the_client_or_by_name(job: list[dict[str, Any]]) -> None:
    ok(job, "given")
    assert {"given_client", "given_named"} <= set(job[0]["listing"])


def test_async_save_commits_while_the_training_thread_computes(
    job: list[dict[str, Any]],
) -> None:
    ok(job, "async")


def test_manager_on_every_process_lists_and_resumes_the_steps(job: list[dict[str, Any]]) -> None:
    ok(job, "manager")
    for r in job:
        assert r["manager"]["steps"] == [4, 5, 6]


@pytest.mark.parametrize("name", ["fault", "fault_async"])
def test_one_process_failing_fails_all_and_commits_nothing(
    job: list[dict[str, Any]], name: str
) -> None:
    for pid, r in enumerate(job):
        got = r[name]
        assert not got["ok"] and got["type"] == "CheckpointWriteError", got
        assert "nothing was committed" in got["error"]
        assert "No space left on device (injected)" in got["error"]
        if pid != 1:
            assert "rank 1 failed" in got["error"]
        assert got["elapsed"] < 15  # failed fast, not by timing out
    listing = job[0]["listing"]
    assert name not in listing
    assert not [n for n in listing if ".arrayckpt-" in n], listing


def test_the_key_value_store_keeps_only_the_last_decision(job: list[dict[str, Any]]) -> None:
    ok(job, "leftover_keys")
    for r in job:
        keys = r["leftover_keys"]["keys"]
        assert len(keys) == 1 and keys[0].endswith("/root"), keys


def test_absent_process_is_named_within_the_timeout(job: list[dict[str, Any]]) -> None:
    got = job[0]["absent1"]
    assert got["type"] == "TopologyError" and "jax processes [1]" in got["error"], got
    assert got["elapsed"] < 15
    got = job[1]["absent0"]
    assert got["type"] == "TopologyError" and "jax process 0 did not" in got["error"], got
    assert got["elapsed"] < 15
    listing = job[0]["listing"]
    assert "absent0" not in listing and "absent1" not in listing
    assert not [n for n in listing if ".arrayckpt-" in n], listing


@pytest.mark.parametrize(
    ("killed", "recoverable"),
    [(1, False), (1, True), (0, False)],
    ids=["peer-default", "peer-recoverable", "service-host-default"],
)
def test_process_killed_mid_save_commits_nothing_and_the_previous_step_restores(
    tmp_path: Path, killed: int, recoverable: bool
) -> None:
    logs = start_job(
        "kill", tmp_path, {"KILLED": str(killed), "RECOVERABLE": "1" if recoverable else "0"}
    )
    survivor = 1 - killed
    res = result(tmp_path, survivor, logs)
    assert res["first"]["ok"], res["first"]
    if recoverable:
        # jax lets the survivor live on: it names the dead process and cleans up.
        got = res["second"]
        assert got["type"] == "TopologyError" and f"jax processes [{killed}]" in got["error"]
        assert res["steps"] == [1] and res["restored_step"] == 1
    root = tmp_path / "ckpts"
    # Without recoverability the survivor either times out the same way or is ended by
    # jax's service (its peer's heartbeats stopped, or the service itself is gone).
    # Either way a manager opened afterwards lists step 1 only, removes the dead
    # processes' temporaries and restores step 1 exactly.
    mgr = ac.CheckpointManager(root)
    assert mgr.steps() == [1], read_logs(logs)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    got = ac.load_distributed_checkpoint(mgr.directory(1), 0, world_size=1).model["w"]
    expect = np.concatenate([np.full((2, 8), r + 10, np.float32) for r in range(WORLD)])
    np.testing.assert_array_equal(got, expect)
    assert "second" not in result(tmp_path, killed, logs)  # it died inside the save


def test_docs_example_saves_resumes_and_reshards(tmp_path: Path) -> None:
    """docs/examples/distributed_jax.py, as docs/distributed.md says to run it."""
    script = Path(__file__).resolve().parent.parent / "docs" / "examples" / "distributed_jax.py"
    env = base_env()
    outputs = []
    for steps in (2, 3):
        log = tmp_path / f"run_{steps}.txt"
        with open(log, "wb") as f:  # its own session: a timeout kills it and its processes
            proc = subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / "run"), "--steps", str(steps)],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_all([proc], [log])
        outputs.append(log.read_text())
        assert proc.returncode == 0, outputs[-1][-4000:]
    assert "step 2 for one process: w (8, 8), matches: True" in outputs[0]
    assert "process 0: resumed from step 2" in outputs[1]
    assert "process 1: resumed from step 2" in outputs[1]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]


def test_sharded_arrays_saved_by_two_processes_restore_on_one_with_8_devices(
    tmp_path: Path,
) -> None:
    """2 processes x 4 CPU devices, NamedSharding arrays over the global 8-device mesh:
    each process writes its own shards; one process with 8 devices reads them back."""
    devices = "--xla_force_host_platform_device_count={}"
    logs = start_job("sharded", tmp_path, {"XLA_FLAGS": devices.format(4)})
    res = [result(tmp_path, pid, logs) for pid in range(WORLD)]
    ok(res, "save")
    ok(res, "load_here")
    # Each process wrote only what it owns: its halves of w, e and flat; cols (replicated
    # over "data") and rep (everywhere) once, by process 0.
    first, second = (r["save"]["manifest"] for r in res)
    assert sorted(first["model"]) == ["cols", "e", "rep", "w"]
    assert sorted(second["model"]) == ["e", "w"]
    assert first["model"]["w"]["global_offset"] == [0, 0]
    assert second["model"]["w"]["global_offset"] == [4, 0]
    assert second["model"]["e"]["global_offset"] == [0, 4, 0]
    assert second["optimizer"]["flat"]["global_offset"] == [8]
    logs += start_job("load_sharded", tmp_path, {"XLA_FLAGS": devices.format(8)}, processes=1)
    one = result(tmp_path, 0, logs)
    for name in ("sharded", "sharded_async"):
        assert one[name] == dict.fromkeys(["w", "e", "cols", "rep", "flat"], True), one[name]
    assert one["numpy"] == dict.fromkeys(["w", "e", "cols", "rep"], True) and one["step"] == 7
