"""Object-store transfers on a real S3 server (SeaweedFS), seen through a fault-injecting
TCP proxy: loads read only the ranges they need, straight into memory; cut responses,
throttling and a lost commit answer are retried; lasting failures name the URL only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3proxy import Fault, FaultProxy
from s3server import S3Server

import arrayckpt as ac
from arrayckpt.errors import CheckpointReadError, CorruptCheckpointError
from arrayckpt.storage import objects, parse_url, transfer

SECRET = "arrayckpt-test-secret"


def _options(endpoint: str, retries: int = 5) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "access_key_id": "arrayckpt-test",
        "secret_access_key": SECRET,
        "region": "us-east-1",
        "retry_config": {"max_retries": retries},
    }


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "big": rng.standard_normal(2 << 20).astype(np.float32),  # 8 MiB, first in the file
        "mid": rng.standard_normal((300, 7)).astype(np.float16),
        "small": np.arange(16, dtype=np.int32),
    }


def _assert_equal(got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype


def test_keys_reads_only_their_ranges(s3_server: S3Server, proxy: FaultProxy) -> None:
    url = s3_server.url("io-keys/step_1")
    state = _state()
    ac.save_checkpoint(url, state, storage_options=_options(s3_server.endpoint))
    got = ac.load_checkpoint(url, keys=["small"], storage_options=_options(proxy.endpoint))
    _assert_equal(got.model, {"small": state["small"]})
    partial = proxy.bytes_down
    # the header's get (transfer.HEAD_BYTES) and the tensor's own range, not the 8 MiB
    assert partial < transfer.HEAD_BYTES + (256 << 10), partial
    full = ac.load_checkpoint(url, storage_options=_options(proxy.endpoint))
    _assert_equal(full.model, state)
    assert proxy.bytes_down - partial > state["big"].nbytes


def test_a_load_makes_no_local_copy(s3_env: S3Server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    url = s3_env.url("io-nocopy/step_1")
    ac.save_checkpoint(url, _state())
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    got = ac.load_checkpoint(url)
    _assert_equal(got.model, _state())
    assert got.model["big"].flags.writeable  # arrays of their own, as a local load gives
    assert list(tmp_path.iterdir()) == []
    if os.path.isdir("/dev/shm"):
        assert not {n for n in set(os.listdir("/dev/shm")) - shm if n.startswith("arrayckpt")}


def test_headers_larger_than_the_first_get(s3_env: S3Server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(transfer, "HEAD_BYTES", 64)  # every header needs its second get
    url = s3_env.url("io-header/step_1")
    state = _state()
    opt = {"m": np.ones(5, np.float64)}
    ac.save_checkpoint(url, state, opt, ac.TrainingState(step=4), extra={"note": "x"})
    got = ac.load_checkpoint(url)
    _assert_equal(got.model, state)
    _assert_equal(got.optimizer, opt)
    assert got.extra == {"note": "x"} and got.training_state.step == 4
    _assert_equal(ac.load_checkpoint(url, keys=["mid"]).model, {"mid": state["mid"]})


def test_ranges_smaller_than_tensors_and_into(s3_env: S3Server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Tensors spanning several ranges are checksummed once all their ranges landed;
    ``into=`` fills the caller's arrays in place."""
    monkeypatch.setattr(transfer, "RANGE_BYTES", 1 << 20)
    url = s3_env.url("io-into/step_1")
    state = _state()
    opt = {"m": np.full(3, 2.0)}
    ac.save_checkpoint(url, state, opt)
    into = {k: np.zeros_like(v) for k, v in state.items()}
    opt_into = {"m": np.zeros(3)}
    got = ac.load_checkpoint(url, into=into, optimizer_into=opt_into)
    assert got.model is into
    _assert_equal(into, state)
    np.testing.assert_array_equal(opt_into["m"], opt["m"])


def test_a_changed_tensor_fails_its_checksum(s3_env: S3Server) -> None:
    """An object replaced after the commit by one of the same size: the tensor's CRC32C,
    taken as its bytes arrive, names it."""
    import obstore

    url = s3_env.url("io-flip/step_1")
    ac.save_checkpoint(url, _state())
    store = objects.open_store(parse_url(url))
    key = "io-flip/step_1/model.safetensors"
    data = bytearray(obstore.get(store, key).bytes())
    data[-3] ^= 0x40  # in "mid", the last tensor (larger items go first)
    obstore.put(store, key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="tensor 'mid' fails its CRC32C"):
        ac.load_checkpoint(url)
    assert ac.load_checkpoint(url, keys=["big"]).model["big"].shape == (2 << 20,)


def test_an_object_replaced_during_a_load_fails_it(s3_env: S3Server) -> None:
    """Later ranges are read with the first get's ETag: never a mix of two objects."""
    import obstore

    url = s3_env.url("io-etag/step_1")
    ac.save_checkpoint(url, _state())
    parsed = parse_url(url)
    store = objects.open_store(parsed)
    fetch = transfer.Fetch(store, parsed)
    size = objects.read_commit(store, parsed)["model.safetensors"]["size"]
    remote = fetch.open("model.safetensors", size, safetensors=True)
    key = "io-etag/step_1/model.safetensors"
    obstore.put(store, key, bytes(obstore.get(store, key).bytes()))  # same bytes, new object
    fetch.plan(remote, None, verify=True)
    with pytest.raises(CorruptCheckpointError, match="was replaced while it was read"):
        fetch.run({"model.safetensors": remote})


@pytest.mark.parametrize("action", ["cut", "503"])
def test_a_failed_ranged_read_is_retried(
    s3_server: S3Server, proxy: FaultProxy, action: str
) -> None:
    """With obstore's own retries off, the load's retry recovers a response cut off
    mid-body and a throttled (503) request."""
    url = s3_server.url(f"io-retry-{action}/step_1")
    state = _state()
    ac.save_checkpoint(url, state, storage_options=_options(s3_server.endpoint))
    proxy.fault = Fault(b"GET", b"model.safetensors", action, times=2, after=100_000)
    got = ac.load_checkpoint(url, storage_options=_options(proxy.endpoint, retries=0))
    _assert_equal(got.model, state)
    assert proxy.fired == 2


def test_a_lasting_read_failure_names_the_url_not_the_secret(
    s3_server: S3Server, proxy: FaultProxy
) -> None:
    url = s3_server.url("io-down/step_1")
    ac.save_checkpoint(url, _state(), storage_options=_options(s3_server.endpoint))
    proxy.fault = Fault(b"GET", b"model.safetensors", "cut", times=1000, after=1000)
    with pytest.raises(CheckpointReadError) as info:
        ac.load_checkpoint(url, storage_options=_options(proxy.endpoint, retries=1))
    text = str(info.value)
    assert f"{url}/model.safetensors" in text and SECRET not in text
    assert proxy.fired >= transfer.READ_ATTEMPTS


def test_a_lost_commit_answer_is_the_save_s_own(s3_server: S3Server, proxy: FaultProxy) -> None:
    """The commit put reaches the server but its answer is lost: the retry finds the
    commit object already there, and its save id says it is this save's."""
    url = s3_server.url("io-commit/step_1")
    proxy.fault = Fault(b"PUT", objects.COMMIT_OBJECT.encode(), "drop")
    state = _state()
    assert ac.save_checkpoint(url, state, storage_options=_options(proxy.endpoint)) == url
    assert proxy.fired == 1
    _assert_equal(
        ac.load_checkpoint(url, storage_options=_options(s3_server.endpoint)).model, state
    )


def test_a_cut_upload_part_is_retried(s3_server: S3Server, proxy: FaultProxy) -> None:
    url = s3_server.url("io-part/step_1")
    proxy.fault = Fault(b"PUT", b"model.safetensors", "drop")
    state = _state()
    ac.save_checkpoint(url, state, storage_options=_options(proxy.endpoint))
    assert proxy.fired == 1
    _assert_equal(
        ac.load_checkpoint(url, storage_options=_options(s3_server.endpoint)).model, state
    )


_MEMORY_CHILD = """
import sys
import numpy as np
import arrayckpt as ac

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

state = {f"w{i}": np.full(32 << 20, i, np.float32) for i in range(4)}  # 512 MiB, touched
reset_peak()
base = status("VmRSS")
ac.save_checkpoint(sys.argv[1], state)
saved = status("VmHWM") - base
del state
got = ac.load_checkpoint(sys.argv[1])
assert all(float(got.model[f"w{i}"][-1]) == i for i in range(4))
reset_peak()
base = status("VmRSS")
got = ac.load_checkpoint(sys.argv[1])
loaded = status("VmHWM") - base
print(saved, loaded)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_upload_and_load_memory_is_bounded(s3_env: S3Server) -> None:
    """A save streams its parts from the arrays (no full copy of the state), and a load
    holds its arrays and the reads in flight, nothing more."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, s3_env.url("memory/step_1")],
        env={**os.environ, **s3_env.env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    saved, loaded = (int(x) for x in done.stdout.split())
    state = 512 << 20
    in_flight = transfer.PART_BYTES * transfer.PARTS_IN_FLIGHT  # 128 MiB
    # A full extra copy of the state would be 512 MiB over the baseline.
    assert saved < in_flight + (64 << 20), f"the upload held {saved >> 20} MiB extra"
    assert loaded < state + in_flight + (64 << 20), f"the load held {loaded >> 20} MiB"
