"""Checkpoints on a real S3 server (SeaweedFS): round trips, commit object last,
incomplete steps invisible, failures named by URL, no credentials in messages."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from s3server import S3Server

import arrayckpt as ac
from arrayckpt.errors import CheckpointNotFoundError, CheckpointWriteError, InvalidInputError
from arrayckpt.storage import objects, parse_url


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float16),
        "i": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float64),
    }


def test_round_trip_with_env_only(s3_env: S3Server) -> None:
    url = s3_env.url("rt/step_1")
    state = _state()
    opt = {"m": np.ones(9, np.float32)}
    ac.save_checkpoint(url, state, opt, ac.TrainingState(step=1, epoch=2))
    got = ac.load_checkpoint(url)
    assert set(got.model) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(got.model[k], v)
        assert got.model[k].dtype == v.dtype
    np.testing.assert_array_equal(got.optimizer["m"], opt["m"])
    assert got.training_state.step == 1 and got.training_state.epoch == 2


def test_nested_state_and_keys(s3_env: S3Server) -> None:
    url = s3_env.url("nested/step_1")
    ac.save_checkpoint(url, {"layer": {"w": np.ones(3), "b": [np.zeros(2)]}})
    got = ac.load_checkpoint(url)
    np.testing.assert_array_equal(got.model["layer"]["w"], np.ones(3))
    assert ac.load_checkpoint(url, keys=["layer.w"]).model.keys() == {"layer.w"}


def test_storage_options_override_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in s3_server.env:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    options = {
        "endpoint": s3_server.endpoint,
        "access_key_id": "arrayckpt-test",
        "secret_access_key": "arrayckpt-test-secret",
        "region": "us-east-1",
    }
    url = s3_server.url("opts/step_1")
    ac.save_checkpoint(url, {"x": np.arange(4)}, storage_options=options)
    got = ac.load_checkpoint(url, storage_options=options)
    np.testing.assert_array_equal(got.model["x"], np.arange(4))
    async_url = s3_server.url("opts/step_2")
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(async_url, {"x": np.arange(5)}, storage_options=options).result()
    got = ac.load_checkpoint(async_url, storage_options=options)
    np.testing.assert_array_equal(got.model["x"], np.arange(5))


def test_step_without_commit_object_is_incomplete(s3_env: S3Server) -> None:
    import obstore

    url = s3_env.url("partial/step_1")
    ac.save_checkpoint(url, {"x": np.arange(4)})
    store = objects.open_store(parse_url(url))
    obstore.delete(store, "partial/step_1/" + objects.COMMIT_OBJECT)
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint at s3://"):
        ac.load_checkpoint(url)


def test_commit_object_written_last_and_lists_checksums(s3_env: S3Server) -> None:
    import obstore

    url = s3_env.url("order/step_1")
    ac.save_checkpoint(url, _state())
    store = objects.open_store(parse_url(url))
    metas = {m["path"].rsplit("/", 1)[1]: m for m in obstore.list(store, "order/step_1").collect()}
    commit = metas.pop(objects.COMMIT_OBJECT)
    assert all(m["last_modified"] <= commit["last_modified"] for m in metas.values())
    files = objects.read_commit(store, parse_url(url))
    assert set(files) == set(metas) == {"model.safetensors", "training_state.json"}
    assert all(files[n]["size"] == metas[n]["size"] for n in files)


def test_changed_data_object_is_detected(s3_env: S3Server) -> None:
    import obstore

    url = s3_env.url("tamper/step_1")
    ac.save_checkpoint(url, {"x": np.arange(4)})
    store = objects.open_store(parse_url(url))
    obstore.put(store, "tamper/step_1/training_state.json", b'{"step": 7}')
    with pytest.raises(ac.CheckpointError, match="does not match its commit object"):
        ac.load_checkpoint(url)


def test_committed_step_is_not_replaced(s3_env: S3Server) -> None:
    url = s3_env.url("twice/step_1")
    ac.save_checkpoint(url, {"x": np.arange(4)})
    with pytest.raises(InvalidInputError, match="already holds a committed checkpoint"):
        ac.save_checkpoint(url, {"x": np.arange(5)})
    np.testing.assert_array_equal(ac.load_checkpoint(url).model["x"], np.arange(4))


def test_server_down_raises_write_error_naming_url_not_secret(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETSHOULDNOTSHOW")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    options = {"retry_config": {"max_retries": 1}}
    with pytest.raises(CheckpointWriteError) as info:
        ac.save_checkpoint("s3://nobucket/run/step_1", {"x": np.arange(3)}, storage_options=options)
    text = str(info.value)
    assert "s3://nobucket/run/step_1" in text
    assert "very-secret-value" not in text and "AKIDSECRET" not in text


def test_credentials_in_url_are_refused() -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_url("s3://key:secret@bucket/run")
    assert "secret" not in str(info.value)


def test_file_url_is_a_local_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ac.save_checkpoint(f"file://{tmp_path}/step_1", {"x": np.arange(3)})
    assert (tmp_path / "step_1" / "model.safetensors").exists()
    np.testing.assert_array_equal(
        ac.load_checkpoint(f"file://{tmp_path}/step_1").model["x"], np.arange(3)
    )


def test_conditional_commit_refuses_a_second_writer(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit object is put with If-None-Match: even a writer that missed the first
    commit (a race) cannot replace it."""
    url = s3_env.url("race/step_1")
    ac.save_checkpoint(url, {"x": np.arange(4)})
    monkeypatch.setattr(objects, "_committed", lambda store, url: False)
    with pytest.raises(CheckpointWriteError, match="another writer committed it first"):
        ac.save_checkpoint(url, {"x": np.arange(4)})


def test_async_checkpointer_saves_to_s3(s3_env: S3Server) -> None:
    url = s3_env.url("async/step_3")
    x = np.arange(1000, dtype=np.float32)
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(url, {"x": x}, training_state=ac.TrainingState(step=3)).result()
    x[:] = 0  # the snapshot was taken before save returned
    got = ac.load_checkpoint(url)
    np.testing.assert_array_equal(got.model["x"], np.arange(1000, dtype=np.float32))
    assert got.training_state.step == 3


def _listing(url: str) -> set[str]:
    import obstore

    parsed = parse_url(url)
    store = objects.open_store(parsed)
    return {m["path"].rsplit("/", 1)[1] for m in obstore.list(store, parsed.prefix).collect()}


def test_kill_9_during_upload_leaves_nothing_complete(s3_env: S3Server) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    url = s3_env.url("kill/step_2")
    env = {**os.environ, **s3_env.env, "PYTHONPATH": str(Path(__file__).parent.parent)}
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("storage_child.py")), url],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "saving\n"
        deadline = time.monotonic() + 120
        # kill once the model object is complete and the optimizer upload is under way
        while "model.safetensors" not in _listing(url) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    listing = _listing(url)
    assert "model.safetensors" in listing, "the child never got its model object out"
    assert objects.COMMIT_OBJECT not in listing, "killed too late: the save had committed"
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        ac.load_checkpoint(url)


def test_server_killed_mid_save_then_restarted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    from s3server import start_server

    server = start_server(tmp_path)
    options = {
        "endpoint": server.endpoint,
        "access_key_id": "k",
        "secret_access_key": "s",
        "region": "us-east-1",
        "retry_config": {"max_retries": 2, "retry_timeout": timedelta(seconds=3)},
    }
    try:
        ac.save_checkpoint(server.url("run/step_1"), {"x": np.arange(10)}, storage_options=options)
        errors: list[BaseException] = []

        def save() -> None:
            try:
                ac.save_checkpoint(
                    server.url("run/step_2"),
                    {"w": np.ones(16 << 20, np.float32)},
                    {"m": np.ones(64 << 20, np.float32)},
                    storage_options=options,
                )
            except BaseException as exc:
                errors.append(exc)

        saver = threading.Thread(target=save)
        saver.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and saver.is_alive():
            try:
                if "model.safetensors" in _listing_with(server.url("run/step_2"), options):
                    break
            except Exception:
                pass
            time.sleep(0.02)
        server.stop()
        saver.join(timeout=120)
        assert not saver.is_alive()
        server.start()
        assert errors, "the save finished before the server was killed"
        assert isinstance(errors[0], CheckpointWriteError), errors[0]
        assert server.url("run/step_2") in str(errors[0])
        with pytest.raises(CheckpointNotFoundError):
            ac.load_checkpoint(server.url("run/step_2"), storage_options=options)
        got = ac.load_checkpoint(server.url("run/step_1"), storage_options=options)
        np.testing.assert_array_equal(got.model["x"], np.arange(10))
    finally:
        server.stop()


def _listing_with(url: str, options: dict) -> set[str]:  # type: ignore[type-arg]
    import obstore

    parsed = parse_url(url)
    store = objects.open_store(parsed, options)
    return {m["path"].rsplit("/", 1)[1] for m in obstore.list(store, parsed.prefix).collect()}


def test_extra_state_on_an_object_store(s3_env: S3Server) -> None:
    url = s3_env.url("extra/step_1")
    shuffle = np.random.default_rng(3)
    ac.save_checkpoint(
        url, _state(), extra={"shuffle": shuffle.bit_generator.state, "buf": np.ones(2)}
    )
    got = ac.load_checkpoint(url).extra
    assert got["shuffle"] == shuffle.bit_generator.state  # PCG64's 128-bit ints exact
    np.testing.assert_array_equal(got["buf"], np.ones(2))
