"""CheckpointManager, open_checkpoint, load_file and the CLI on a real S3 server
(SeaweedFS): steps listed from the store, retention commit object first, leases that keep
live uploads from cleanup, SIGKILL and server restarts mid-save, readers racing retention."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faults import STRESS
from s3server import S3Server

import arrayckpt as ac
from arrayckpt import cli
from arrayckpt.storage import leases, objects, parse_url

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 120
#: Kill-and-resume rounds per save mode (`nox -s stress` runs more).
KILL_ROUNDS = 12 if STRESS else 4


def _run(name: str) -> str:
    return f"mgr-{name}-{uuid.uuid4().hex[:6]}"


def _keys(url: str) -> list[str]:
    import obstore

    parsed = parse_url(url)
    store = objects.open_store(parsed)
    return sorted(m["path"] for m in obstore.list(store, parsed.prefix).collect())


def _put(url: str, data: bytes) -> None:
    import obstore

    parsed = parse_url(url)
    obstore.put(objects.open_store(parsed), parsed.prefix, data)


def _state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.full(5, step, np.float32)}


@pytest.mark.parametrize("async_save", [True, False])
def test_save_steps_restore_and_keep_last_with_env_only(s3_env: S3Server, async_save) -> None:
    url = s3_env.url(_run("basic"))
    with ac.CheckpointManager(url, keep_last=2, async_save=async_save) as mgr:
        assert mgr.restore() is None and mgr.latest_step() is None
        for step in (1, 2, 3):
            future = mgr.save(step, _state(step), {"m": np.zeros(2)})
        assert future.result() == f"{url}/step_00000003"
        mgr.wait()
        assert mgr.steps() == [2, 3] and mgr.latest_step() == 3
    again = ac.CheckpointManager(url)
    assert again.steps() == [2, 3]
    np.testing.assert_array_equal(again.restore().model["w"], _state(3)["w"])
    np.testing.assert_array_equal(again.restore(2).model["w"], _state(2)["w"])
    with pytest.raises(ac.CheckpointNotFoundError, match="step 1"):
        again.restore(1)
    keys = _keys(url)
    assert not [k for k in keys if "step_00000001" in k], keys  # retention left nothing
    assert not [k for k in keys if "arrayckpt-lease" in k], keys  # leases released
    with pytest.raises(ac.InvalidInputError, match="steps only move forward"):
        again.save(3, _state(3))


def test_keep_every_and_rollback(s3_env: S3Server) -> None:
    url = s3_env.url(_run("every"))
    with ac.CheckpointManager(url, keep_last=1, keep_every=2, async_save=False) as mgr:
        for step in range(1, 6):
            mgr.save(step, _state(step))
        assert mgr.steps() == [2, 4, 5]
        mgr.save(4, _state(40), training_state=ac.TrainingState(step=4), rollback=True)
        assert mgr.steps() == [2, 4]
        np.testing.assert_array_equal(mgr.restore().model["w"], _state(40)["w"])


def test_storage_options_override_env(s3_server: S3Server, monkeypatch) -> None:
    for key in s3_server.env:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    options = {
        "endpoint": s3_server.endpoint,
        "access_key_id": "k",
        "secret_access_key": "s",
        "region": "us-east-1",
    }
    url = s3_server.url(_run("opts"))
    with ac.CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(7, _state(7))
    mgr = ac.CheckpointManager(url, storage_options=options)
    assert mgr.steps() == [7]
    np.testing.assert_array_equal(mgr.restore().model["w"], _state(7)["w"])


def test_step_is_complete_only_with_a_parsing_commit_object(s3_env: S3Server) -> None:
    url = s3_env.url(_run("commit"))
    with ac.CheckpointManager(url, async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
    _put(f"{url}/step_00000003/{objects.COMMIT_OBJECT}", b"{not json")
    import obstore

    parsed = parse_url(url)
    obstore.delete(
        objects.open_store(parsed), f"{parsed.prefix}/step_00000002/{objects.COMMIT_OBJECT}"
    )
    mgr = ac.CheckpointManager(url)
    assert mgr.steps() == [1]
    np.testing.assert_array_equal(mgr.restore().model["w"], _state(1)["w"])


def test_retention_deletes_the_commit_object_first(s3_env: S3Server, monkeypatch) -> None:
    import obstore

    url = s3_env.url(_run("order"))
    deleted: list[str] = []
    real_delete = obstore.delete

    def recording_delete(store: Any, key: Any) -> None:  # the real call, recorded
        deleted.append(key)
        real_delete(store, key)

    with ac.CheckpointManager(url, keep_last=1, async_save=False) as mgr:
        mgr.save(1, _state(1), {"m": np.ones(3)})
        monkeypatch.setattr(obstore, "delete", recording_delete)
        mgr.save(2, _state(2), {"m": np.ones(3)})
    of_step_1 = [k for k in deleted if "/step_00000001/" in k]
    assert of_step_1[0].endswith(objects.COMMIT_OBJECT), of_step_1
    assert {k.rsplit("/", 1)[1] for k in of_step_1} >= {
        objects.COMMIT_OBJECT,
        "model.safetensors",
        "optimizer.safetensors",
        "training_state.json",
    }
    assert mgr.steps() == [2]


def _lease_doc(**fields: Any) -> bytes:
    doc = {"version": 1, "owner": uuid.uuid4().hex, "ttl_s": 60.0, **fields}
    return json.dumps(doc).encode()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_removes_abandoned_uploads_and_keeps_live_ones(s3_env: S3Server) -> None:
    url = s3_env.url(_run("cleanup"))
    with ac.CheckpointManager(url, async_save=False) as mgr:
        mgr.save(1, _state(1))
    lease = leases.lease_name(1)
    here = leases.owner_identity()
    # a crashed writer on this machine (its pid is gone), its lease not expired yet
    dead = {**here, "pid": _dead_pid(), "expires_at": time.time() + 3600}
    _put(f"{url}/step_00000002/model.safetensors", b"partial")
    _put(f"{url}/step_00000002/{lease}", _lease_doc(**dead))
    # debris without any lease (an interrupted cleanup)
    _put(f"{url}/step_00000003/model.safetensors", b"partial")
    # a live writer on another machine, and one whose lease expired
    other = {"host": "elsewhere", "boot_id": "x", "pid_ns": "y", "pid": 1, "pid_start": "1"}
    _put(f"{url}/step_00000004/model.safetensors", b"uploading")
    _put(f"{url}/step_00000004/{lease}", _lease_doc(**other, expires_at=time.time() + 3600))
    _put(f"{url}/step_00000005/model.safetensors", b"abandoned")
    _put(f"{url}/step_00000005/{lease}", _lease_doc(**other, expires_at=time.time() - 1))
    mgr = ac.CheckpointManager(url)  # cleans up on start
    keys = _keys(url)
    assert not [k for k in keys if re.search("step_0000000[235]/", k)], keys
    assert f"{parse_url(url).prefix}/step_00000004/model.safetensors" in keys
    assert mgr.steps() == [1]
    assert ac.CheckpointManager(url).cleanup() == []  # the live writer's stays


def test_a_live_writer_is_never_cleaned_up_by_another_manager(s3_env: S3Server) -> None:
    """Managers starting (and cleaning up) while another process uploads a large step
    leave its objects alone; the writer commits a step that loads whole."""
    url = s3_env.url(_run("live"))
    env = {**os.environ, **s3_env.env, "PYTHONPATH": str(REPO)}
    code = (
        "import sys, numpy as np, arrayckpt as ac\n"
        "mgr = ac.CheckpointManager(sys.argv[1], async_save=False, lease_ttl_s=30)\n"
        "print('saving', flush=True)\n"
        "big = {'m': np.full(32 << 20, 2.0, np.float32)}\n"
        "mgr.save(1, {'w': np.ones(16 << 20, np.float32)}, big)\n"
        "print('saved', flush=True)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE, text=True
    )
    cleaned: list[str] = []
    try:
        assert child.stdout is not None and child.stdout.readline() == "saving\n"
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        saw_upload = False
        while child.poll() is None and time.monotonic() < deadline:
            saw_upload = saw_upload or any("model.safetensors" in k for k in _keys(url))
            cleaned += ac.CheckpointManager(url, lease_ttl_s=30).cleanup()
            time.sleep(0.05)
        assert child.wait(timeout=CHILD_TIMEOUT_S) == 0
        assert child.stdout.read() == "saved\n"
    finally:
        if child.poll() is None:
            child.kill()
    assert saw_upload, "the managers never ran during the upload"
    assert cleaned == []
    got = ac.CheckpointManager(url).restore()
    assert got.model["w"].shape == (16 << 20,) and float(got.optimizer["m"][-1]) == 2.0


def _checked_steps(url: str) -> list[int]:
    """Every complete step, each loaded whole and checked against what its child saved."""
    mgr = ac.CheckpointManager(url)
    steps = mgr.steps()
    for step in steps:
        ckpt = mgr.restore(step)
        assert ckpt.training_state.step == step
        assert np.all(ckpt.model["w"] == step) and np.all(ckpt.optimizer["m"] == -step)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_random_moments_then_resume(s3_env: S3Server, mode: str) -> None:
    url = s3_env.url(_run(f"kill-{mode}"))
    env = {**os.environ, **s3_env.env, "PYTHONPATH": str(REPO)}
    child_script = str(Path(__file__).with_name("storage_manager_child.py"))
    rng = random.Random(f"kill-{mode}")
    newest_committed, killed_mid_upload = 0, 0
    for _ in range(KILL_ROUNDS):
        expected_resume = max(_checked_steps(url), default=0)
        assert expected_resume >= newest_committed, "a committed step was lost"
        child = subprocess.Popen(
            [sys.executable, child_script, url, mode], env=env, stdout=subprocess.PIPE, text=True
        )
        lines: list[str] = []
        try:
            assert child.stdout is not None
            first = child.stdout.readline()
            assert first == f"resumed {expected_resume}\n", first
            reader = threading.Thread(target=lines.extend, args=(child.stdout,), daemon=True)
            reader.start()
            time.sleep(rng.uniform(0.2, 2.0))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=CHILD_TIMEOUT_S)
            reader.join(timeout=CHILD_TIMEOUT_S)
        finally:
            if child.poll() is None:
                child.kill()
        committed = [int(x.split()[1]) for x in lines if x.startswith("committed")]
        newest_committed = max(committed, default=newest_committed)
        keys = " ".join(_keys(url))  # before the next manager cleans up
        listed = set(re.findall(r"step_([0-9]{8})/", keys))
        committed = set(re.findall(rf"step_([0-9]{{8}})/{objects.COMMIT_OBJECT}", keys))
        killed_mid_upload += bool(listed - committed)
    steps = _checked_steps(url)
    assert steps and steps[-1] >= newest_committed
    # A kill between a step's commit and its retention leaves keep_last + 1 steps, until
    # the resumed run's next save applies retention: resume once more, unkilled, and save.
    assert len(steps) <= 4
    step = steps[-1] + 1
    with ac.CheckpointManager(url, keep_last=3) as mgr:
        mgr.save(
            step,
            {"w": np.full(1 << 20, step, np.float32)},
            {"m": np.full(2 << 20, -step, np.float32)},
        )
    steps = _checked_steps(url)
    assert steps[-1] == step
    assert len(steps) <= 3  # keep_last=3
    assert killed_mid_upload, "no kill landed in an upload: the test proved nothing"


def test_server_killed_mid_save_then_restarted(tmp_path) -> None:
    from s3server import start_server

    server = start_server(tmp_path)
    options = {
        "endpoint": server.endpoint,
        "access_key_id": "k",
        "secret_access_key": "s",
        "region": "us-east-1",
        "retry_config": {"max_retries": 2, "retry_timeout": timedelta(seconds=3)},
    }
    url = server.url("run")
    try:
        mgr = ac.CheckpointManager(url, storage_options=options, lease_ttl_s=5)
        mgr.save(1, {"x": np.arange(10)}).result()
        future = mgr.save(
            2, {"w": np.ones(16 << 20, np.float32)}, {"m": np.ones(64 << 20, np.float32)}
        )
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        import obstore

        store = objects.open_store(parse_url(url), options)
        while time.monotonic() < deadline and not future.done():
            try:
                listed = [m["path"] for m in obstore.list(store, "run/step_00000002").collect()]
                if any(p.endswith("model.safetensors") for p in listed):
                    break
            except Exception:
                pass
            time.sleep(0.02)
        server.stop()
        with pytest.raises(ac.CheckpointWriteError) as info:
            future.result(timeout=CHILD_TIMEOUT_S)
        assert f"{url}/step_00000002" in str(info.value)
        mgr.close()  # the failure was raised once, by result()
    finally:
        server.stop()
    server.start()
    try:
        again = ac.CheckpointManager(url, storage_options=options, lease_ttl_s=5)
        assert again.steps() == [1]
        np.testing.assert_array_equal(again.restore().model["x"], np.arange(10))
        again.save(2, {"x": np.arange(20)}).result()  # the abandoned step is saved anew
        assert again.steps() == [1, 2]
        np.testing.assert_array_equal(again.restore().model["x"], np.arange(20))
    finally:
        server.stop()


def test_readers_racing_retention_never_see_a_partial_step(s3_env: S3Server) -> None:
    url = s3_env.url(_run("race"))
    n = 1 << 18
    errors: list[BaseException] = []
    restored: list[int] = []
    stop = threading.Event()
    with ac.CheckpointManager(url, keep_last=1) as writer:
        writer.save(1, {"w": np.full(n, 1, np.float32)}).result()

        def read() -> None:
            reader = ac.CheckpointManager(url)
            try:
                while not stop.is_set():
                    ckpt = reader.restore()
                    assert ckpt is not None, "no complete step while one existed at every instant"
                    step = ckpt.training_state.step
                    assert np.all(ckpt.model["w"] == step), f"step {step} mixed"
                    restored.append(step)
            except BaseException as exc:
                errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(2)]
        for t in readers:
            t.start()
        for step in range(2, 14):
            writer.save(step, {"w": np.full(n, step, np.float32)})
        writer.wait()
        stop.set()
        for t in readers:
            t.join(timeout=CHILD_TIMEOUT_S)
    assert not errors, errors[0]
    assert len(set(restored)) > 2, restored  # the readers really raced the deletions
    assert writer.steps() == [13]


def test_two_managers_saving_the_same_steps_lose_and_mix_nothing(s3_env: S3Server) -> None:
    """Two writers on one prefix: for every step exactly one commits, its objects are all
    that writer's, and neither deletes the other's upload."""
    url = s3_env.url(_run("two"))
    n = 1 << 20
    outcomes: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def run(writer: int) -> None:
        mgr = ac.CheckpointManager(url, async_save=False, lease_ttl_s=30)
        for step in range(1, 9):
            meta = {"writer": str(writer)}
            try:
                mgr.save(
                    step,
                    {"w": np.full(n, writer * 1000 + step, np.float32)},
                    {"m": np.full(n, -(writer * 1000 + step), np.float32)},
                    ac.TrainingState(step=step, metadata=meta),
                )
                outcomes.setdefault(step, []).append(f"{writer}")
            except ac.CheckpointError as exc:
                outcomes.setdefault(step, []).append(f"{writer} refused: {exc}")
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CHILD_TIMEOUT_S)
    assert not errors, errors
    assert any(len(o) == 2 and any("refused" in x for x in o) for o in outcomes.values())
    mgr = ac.CheckpointManager(url)
    assert mgr.steps() == list(range(1, 9))
    for step in range(1, 9):
        won = [o for o in outcomes[step] if "refused" not in o]
        assert len(won) == 1, outcomes[step]
        ckpt = mgr.restore(step)
        writer = int(ckpt.training_state.metadata["writer"])
        assert str(writer) == won[0]
        assert np.all(ckpt.model["w"] == writer * 1000 + step)
        assert np.all(ckpt.optimizer["m"] == -(writer * 1000 + step))
    assert not [k for k in _keys(url) if "arrayckpt-lease" in k]


def test_open_checkpoint_load_file_and_file_urls(s3_env: S3Server, tmp_path) -> None:
    url = s3_env.url(_run("readers"))
    with ac.CheckpointManager(url, async_save=False) as mgr:
        mgr.save(3, {"a": np.arange(6, dtype=np.float32), "b": np.ones(2)}, {"m": np.zeros(2)})
    step = mgr.directory(3)
    lazy = ac.open_checkpoint(step)
    assert sorted(lazy.model) == ["a", "b"] and lazy.training_state.step == 3
    np.testing.assert_array_equal(lazy.model["a"], np.arange(6, dtype=np.float32))
    assert lazy.optimizer is not None and lazy.model.info("a").shape == (6,)
    got = ac.load_file(f"{step}/model.safetensors", keys=["b"])
    np.testing.assert_array_equal(got["b"], np.ones(2))
    with pytest.raises(ac.CheckpointNotFoundError, match="s3://"):
        ac.open_checkpoint(mgr.directory(4))
    with pytest.raises(ac.CheckpointNotFoundError, match="s3://"):
        ac.load_file(f"{step}/nothing.safetensors")
    local = ac.CheckpointManager(f"file://{tmp_path}/run", async_save=False)
    local.save(1, _state(1))
    assert local.steps() == [1] and (tmp_path / "run" / "step_00000001").is_dir()
    assert ac.open_checkpoint(f"file://{tmp_path}/run/step_00000001").training_state.step == 1
    ac.load_file(f"file://{tmp_path}/run/step_00000001/model.safetensors")


def test_cli_ls_inspect_verify_on_urls(s3_env: S3Server, capsys) -> None:
    url = s3_env.url(_run("cli"))
    with ac.CheckpointManager(url, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
    _put(f"{url}/step_00000003/model.safetensors", b"partial")
    assert cli.main(["ls", "--json", url]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["step"], e["status"]) for e in listed] == [
        (1, "complete"),
        (2, "complete"),
        (3, "incomplete"),
    ]
    assert cli.main(["ls", url]) == 0
    assert "incomplete (writer gone)" in capsys.readouterr().out
    assert cli.main(["inspect", url]) == cli.EXIT_USAGE
    assert "holds steps, not one checkpoint" in capsys.readouterr().err
    assert cli.main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert f"ok       {url}/step_00000002/model.safetensors" in out and "all good" in out
    assert cli.main(["inspect", "--json", f"{url}/step_00000002"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "checkpoint" and doc["training_state"]["step"] == 2
    assert doc["files"][0]["path"] == f"{url}/step_00000002/model.safetensors"
    assert cli.main(["inspect", f"{url}/step_00000001/model.safetensors"]) == 0
    assert "w" in capsys.readouterr().out
    # a changed data object fails verification, naming it
    _put(f"{url}/step_00000001/model.safetensors", b"changed")
    assert cli.main(["verify", url]) == 1
    assert f"{url}/step_00000001/model.safetensors" in capsys.readouterr().out


def test_the_docs_example_runs_with_env_only(s3_env: S3Server, monkeypatch, tmp_path) -> None:
    text = (REPO / "docs" / "storage.md").read_text()
    m = re.search(r"<!-- s3-example -->\n```py\n(?P<code>.*?)^```", text, re.S | re.M)
    assert m is not None, "docs/storage.md lost its object-store manager example"
    url = s3_env.url(_run("docs"))
    code = m["code"].replace("s3://my-bucket/run", url)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # a second run resumes the first
        exec(compile(code, "docs/storage.md", "exec"), {"__name__": "__docs__"})
    mgr = ac.CheckpointManager(url)
    assert mgr.steps() == [5, 6]
    np.testing.assert_array_equal(mgr.restore().model["w"], np.full(4, 6, np.float32))


def test_a_step_held_by_a_live_writer_elsewhere_is_refused_an_expired_one_taken_over(
    s3_env: S3Server,
) -> None:
    url = s3_env.url(_run("held"))
    other = {"host": "elsewhere", "boot_id": "x", "pid_ns": "y", "pid": 1, "pid_start": "1"}
    lease = leases.lease_name(1)
    _put(f"{url}/step_00000001/model.safetensors", b"theirs")
    _put(f"{url}/step_00000001/{lease}", _lease_doc(**other, expires_at=time.time() + 3600))
    mgr = ac.CheckpointManager(url, async_save=False, lease_ttl_s=0.5)
    with pytest.raises(ac.CheckpointWriteError, match="another live writer holds its lease"):
        mgr.save(1, _state(1))
    assert f"{parse_url(url).prefix}/step_00000001/model.safetensors" in _keys(url)
    _put(f"{url}/step_00000001/{lease}", _lease_doc(**other, expires_at=time.time() - 1))
    mgr.save(1, _state(1))  # the holder is gone: its lease is taken over
    np.testing.assert_array_equal(mgr.restore(1).model["w"], _state(1)["w"])
    assert not [k for k in _keys(url) if "arrayckpt-lease" in k]


def test_a_writer_whose_lease_was_taken_over_does_not_commit(s3_env: S3Server) -> None:
    url = parse_url(s3_env.url(_run("fenced")) + "/step_00000001")
    store = objects.open_store(url)
    held, _ = leases.acquire(store, url, ttl_s=60, wait_s=0)
    assert held is not None
    held.check()  # still the newest
    taker = _lease_doc(expires_at=time.time() + 60)
    _put(f"{s3_env.url(url.prefix)}/{leases.lease_name(2)}", taker)
    with pytest.raises(leases.LeaseLost, match="another writer took over"):
        held.check()
    held.release(delete=False)


def test_a_forked_child_gets_an_error_not_a_hang(s3_env: S3Server) -> None:
    """obstore's threads stay in the parent: a child's call would hang, so it is refused."""
    mgr = ac.CheckpointManager(s3_env.url(_run("fork")), async_save=False)
    mgr.save(1, _state(1))
    pid = os.fork()
    if pid == 0:  # the child: exit 7 on the expected error, whatever else otherwise
        signal.alarm(30)  # a hang ends by SIGALRM, failing the test below
        try:
            mgr.steps()
        except ac.CheckpointError as exc:
            os._exit(7 if "forked child" in str(exc) else 2)
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert mgr.steps() == [1]  # the parent is unaffected


def test_owner_dead_only_when_provably_gone_on_this_machine() -> None:
    parent = os.getppid()  # alive, on this machine
    here = {**leases.owner_identity(), "pid": parent, "pid_start": leases._pid_start(parent)}
    assert not leases.owner_dead(here)
    assert leases.owner_dead({**here, "pid_start": "0"})  # the pid was reused
    assert leases.owner_dead({**here, "pid": _dead_pid()})
    assert not leases.owner_dead({**here, "pid": _dead_pid(), "host": "elsewhere"})
    assert not leases.owner_dead({**here, "pid": _dead_pid(), "pid_ns": "pid:[1]"})
