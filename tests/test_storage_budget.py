"""Saves within a staging budget (``max_staging_bytes``) to a real S3 server (SeaweedFS):
a state several times the budget round-trips bit-exact through `AsyncCheckpointer` and
`CheckpointManager` (with retention), its checksums verified; the save's peak RSS stays
within the budget, a tensor and the client's allowance; a refused part or the store going
away mid-upload commits nothing, names the object and leaves the previous step loadable;
and `close` gives the staging back.

The memory cases run in a fresh process each (`memory_child.py save`), as the load bounds
do (`test_memory_bounds.py`). No timing is asserted; every child and save has a timeout.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from memory import needs_proc, run_memory_child
from s3proxy import Fault, FaultProxy
from s3server import S3Server

import arrayckpt as ac
from arrayckpt import format
from arrayckpt.errors import CheckpointNotFoundError, CheckpointWriteError
from arrayckpt.storage import objects, parse_url

MIB = 1 << 20
BUDGET = 4 * MIB
TENSOR = 4 * MIB
#: What the object-store client may hold beyond the staging during a save. obstore streams
#: the header and tensor views it is given without copying them (measured: 1.1-1.4 MiB
#: beyond the staging for 32-128 MiB states), so its multipart parts in flight (at most
#: `transfer.PART_BYTES` x `PARTS_IN_FLIGHT`) cost no memory of their own; the rest is
#: its request buffers and allocator change. A client that copied each part would exceed
#: this by a part (16 MiB).
CLIENT_ALLOWANCE = 8 * MIB
#: Bounds every wait: a save that hangs fails the test instead.
SAVE_TIMEOUT_S = 120
CHILD_TIMEOUT_S = 180


def _url(server: S3Server, name: str) -> str:
    return server.url(f"budget-{name}-{uuid.uuid4().hex[:6]}")


def _state(seed: int, count: int = 6) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A model and optimizer state of ``count`` + 2 tensors of 4 MiB (8x the budget for
    the default count) and a small one, random so that a misplaced byte shows."""
    rng = np.random.default_rng(seed)
    model = {f"layer{i}": rng.standard_normal(TENSOR // 4).astype(np.float32) for i in range(count)}
    model["bias"] = np.arange(37, dtype=np.int64) + seed
    optimizer = {f"m{i}": rng.standard_normal(TENSOR // 2).astype(np.float16) for i in range(2)}
    return model, optimizer


def _copy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}


def _scribble(*states: dict[str, np.ndarray]) -> None:
    """Change every array once `save` returned: the checkpoint must not see it."""
    for state in states:
        for a in state.values():
            a[...] = 0


def _assert_same(got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert np.asarray(got[k]).tobytes() == v.tobytes(), k  # bit-exact


def _assert_objects_match_commit(url: str) -> None:
    """Every object the commit object lists has its listed size and CRC32C."""
    import obstore

    parsed = parse_url(url)
    store = objects.open_store(parsed)
    listing = objects.read_commit(store, parsed)
    assert {"model.safetensors", "optimizer.safetensors"} <= listing.keys(), listing
    for name, entry in listing.items():
        data = bytes(obstore.get(store, parsed.key(name)).bytes())
        assert len(data) == entry["size"], name
        assert f"{format.checksum(data):08x}" == entry["crc32c"], name


def _result(future: Future[Any]) -> Any:
    return future.result(timeout=SAVE_TIMEOUT_S)


def _load(url: str, **kwargs: Any) -> ac.Checkpoint:
    return ac.load_checkpoint(url, verify=True, **kwargs)  # every tensor's CRC32C checked


# ------------------------------------------------------------------------ round trips


def test_checkpointer_saves_a_state_eight_times_the_budget_bit_exact(s3_env: S3Server) -> None:
    url = _url(s3_env, "async")
    model, optimizer = _state(1)
    want_model, want_opt = _copy(model), _copy(optimizer)
    state_bytes = sum(a.nbytes for s in (model, optimizer) for a in s.values())
    assert state_bytes >= 8 * BUDGET
    with ac.AsyncCheckpointer(max_staging_bytes=BUDGET) as ckpt:
        future = ckpt.save(url, model, optimizer, ac.TrainingState(step=5))
        # the client reads the in-place arrays until their parts are sent, and nothing
        # tells when that is: save returned once the whole upload had committed
        assert future.done()
        staged = ckpt.staging.nbytes
        _scribble(model, optimizer)  # save returned: the arrays are the caller's again
        assert _result(future) == url
    # the budget was used, and only it: the rest was uploaded from the caller's arrays
    assert 0 < staged <= BUDGET
    assert ckpt.staging.nbytes == 0  # close gave the staging back
    _assert_objects_match_commit(url)
    got = _load(url)
    _assert_same(got.model, want_model)
    _assert_same(got.optimizer, want_opt)
    assert got.training_state.step == 5
    _assert_same(
        _load(url, keys=["layer3", "bias"]).model, {k: want_model[k] for k in ("layer3", "bias")}
    )


def test_manager_with_retention_saves_within_the_budget(s3_env: S3Server) -> None:
    url = _url(s3_env, "mgr")
    wanted = {}
    with ac.CheckpointManager(url, keep_last=2, max_staging_bytes=BUDGET) as mgr:
        for step in (1, 2, 3):
            model, optimizer = _state(step)
            wanted[step] = (_copy(model), _copy(optimizer))
            future = mgr.save(step, model, optimizer)
            assert mgr._checkpointer is not None and mgr._checkpointer.staging.nbytes <= BUDGET
            _scribble(model, optimizer)
            assert _result(future) == f"{url}/step_{step:08d}"
        assert mgr.steps() == [2, 3]
    for step in (2, 3):
        _assert_objects_match_commit(f"{url}/step_{step:08d}")
        got = ac.CheckpointManager(url).restore(step)
        _assert_same(got.model, wanted[step][0])
        _assert_same(got.optimizer, wanted[step][1])
    with pytest.raises(CheckpointNotFoundError):
        _load(f"{url}/step_00000001")  # retention deleted it


# ---------------------------------------------------------------------------- memory


def _child_save(server: S3Server, how: str, budget: str) -> dict[str, Any]:
    args = ["save", how, _url(server, f"rss-{how}"), "8", str(TENSOR // MIB), budget]
    out = run_memory_child(*args, env=server.env, timeout_s=CHILD_TIMEOUT_S)
    return dict(json.loads(out.strip().splitlines()[-1]))


@needs_proc
@pytest.mark.parametrize("how", ["checkpointer", "manager"])
def test_a_budgeted_upload_holds_the_budget_a_tensor_and_the_client_allowance(
    s3_server: S3Server, how: str
) -> None:
    state = 8 * TENSOR  # 32 MiB
    bound = BUDGET + TENSOR + CLIENT_ALLOWANCE  # 16 MiB: half the state
    got = _child_save(s3_server, how, str(BUDGET // MIB))
    assert got["extra"] <= bound, (
        f"{how}: a {state >> 20} MiB save within a {BUDGET >> 20} MiB budget added "
        f"{got['extra'] / MIB:.1f} MiB of RSS, over the {bound >> 20} MiB bound"
    )
    staged, after_close = got["staged"]
    assert 0 < staged <= BUDGET and after_close == 0
    assert got["left"] < staged, f"close left {got['left'] / MIB:.1f} MiB resident"
    # the measurement sees staging: without a budget the same save holds the whole state
    unbounded = _child_save(s3_server, how, "none")
    assert unbounded["extra"] >= state > bound, unbounded


# --------------------------------------------------------------------------- failures


def _options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "access_key_id": "arrayckpt-test",
        "secret_access_key": "arrayckpt-test-secret",
        "region": "us-east-1",
        "retry_config": {"max_retries": 1, "retry_timeout": timedelta(seconds=3)},
    }


def _assert_names_object_and_fix(exc: BaseException, url: str) -> None:
    text = str(exc)
    assert f"{url}/model.safetensors" in text, text  # the object, not just the step
    assert "intact" in text and "save" in text.split(";")[-1], text  # and what to do
    assert "arrayckpt-test-secret" not in text


def test_a_refused_part_mid_upload_commits_nothing(s3_server: S3Server, proxy: FaultProxy) -> None:
    """The model object's second part is refused (after obstore's retry): the budgeted
    save fails naming the object, the step stays invisible, the previous one loads, and
    saving the step again (what the error says to do) succeeds."""
    base = _url(s3_server, "refused")
    options = _options(proxy.endpoint)
    first, first_opt = _state(1)
    model, optimizer = _state(2)
    want, want_opt = _copy(model), _copy(optimizer)
    with ac.AsyncCheckpointer(max_staging_bytes=BUDGET) as ckpt:
        _result(ckpt.save(f"{base}/step_1", first, first_opt, storage_options=options))
        proxy.fault = Fault(b"PUT", b"partNumber=2", "503", times=10**6)
        future = ckpt.save(f"{base}/step_2", model, optimizer, storage_options=options)
        with pytest.raises(CheckpointWriteError) as info:
            _result(future)
        assert proxy.fired >= 1
        _assert_names_object_and_fix(info.value, f"{base}/step_2")
        with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
            _load(f"{base}/step_2", storage_options=options)
        _assert_same(_load(f"{base}/step_1", storage_options=options).model, _copy(first))
        proxy.fault = None
        _result(ckpt.save(f"{base}/step_2", model, optimizer, storage_options=options))
    got = _load(f"{base}/step_2", storage_options=options)
    _assert_same(got.model, want)
    _assert_same(got.optimizer, want_opt)


def test_store_gone_mid_upload_of_a_manager_save(s3_server: S3Server, proxy: FaultProxy) -> None:
    """The store goes away (`FaultProxy.outage`: connections cut and refused) as the model
    object's second part goes out: the manager's save fails naming the object; once it is
    back, the previous step is the newest, and the failed step saves again."""
    url = _url(s3_server, "gone")
    options = _options(proxy.endpoint)
    first, _ = _state(1)
    model, optimizer = _state(2)
    want, want_opt = _copy(model), _copy(optimizer)
    mgr = ac.CheckpointManager(url, storage_options=options, max_staging_bytes=BUDGET)
    try:
        _result(mgr.save(1, first))
        proxy.fault = Fault(b"PUT", b"partNumber=2", "pass", hook=proxy.outage)
        future = mgr.save(2, model, optimizer)
        with pytest.raises(CheckpointWriteError) as info:
            _result(future)
        assert proxy.fired == 1 and proxy.down, "the save finished before the store went"
        _assert_names_object_and_fix(info.value, f"{url}/step_00000002")
        proxy.back()
        assert mgr.steps() == [1]
        _assert_same(mgr.restore().model, _copy(first))
        _result(mgr.save(2, model, optimizer))
    finally:
        mgr.close()
    got = ac.CheckpointManager(url, storage_options=options).restore()
    assert got.training_state.step == 2
    _assert_same(got.model, want)
    _assert_same(got.optimizer, want_opt)
