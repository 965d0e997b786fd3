"""AsyncCheckpointer: snapshot before return, one write in flight, errors raised once,
bounded staging memory."""

from __future__ import annotations

import os
import signal
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from async_helpers import FailingFS, GatedFS, open_gate_later

import arrayckpt as ac
from arrayckpt import fsops


def _state(seed: int = 0, sizes: tuple[int, ...] = (1000, 3000)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}


def _load_model(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in ac.load_checkpoint(path).model.items()}


def test_mutating_numpy_arrays_after_save_keeps_the_saved_values(tmp_path: Path) -> None:
    state = _state()
    expected = {k: v.copy() for k, v in state.items()}
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save(tmp_path / "c", state, {"m": state["t0"]})
        for arr in state.values():  # the write has not started copying to disk yet
            arr += 1.0
        del state
        fs.open_gate()
        assert future.result() == (tmp_path / "c").absolute()
    got = ac.load_checkpoint(tmp_path / "c")
    for k, v in expected.items():
        np.testing.assert_array_equal(got.model[k], v)
    np.testing.assert_array_equal(got.optimizer["m"], expected["t0"])


def test_mutating_torch_tensors_after_save_keeps_the_saved_values(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    state = {
        "w": torch.arange(1000, dtype=torch.float32).reshape(10, 100),
        "b": torch.ones(7, dtype=torch.bfloat16),
        "t": torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),  # not contiguous
    }
    expected = {k: v.clone() for k, v in state.items()}
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save(tmp_path / "c", state)
        with torch.no_grad():
            for t in state.values():
                t.add_(5)
        fs.open_gate()
        future.result()
    got = ac.load_checkpoint(tmp_path / "c", xp=torch).model
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_one_write_in_flight_a_new_save_waits_for_the_previous(tmp_path: Path) -> None:
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        first = ckpt.save(tmp_path / "a", _state(1))
        timer = open_gate_later(fs)
        second = ckpt.save(tmp_path / "b", _state(2))
        assert first.done(), "save returned while the previous write was still in flight"
        second.result()
        timer.join()
    np.testing.assert_array_equal(_load_model(tmp_path / "a")["t1"], _state(1)["t1"])
    np.testing.assert_array_equal(_load_model(tmp_path / "b")["t1"], _state(2)["t1"])


def test_a_new_save_raises_the_previous_failure_once(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer() as ckpt:
        with fsops.use(FailingFS()):
            ckpt.save(tmp_path / "a", _state())
            with pytest.raises(ac.CheckpointWriteError, match="No space left"):
                ckpt.save(tmp_path / "b", _state())
        assert not (tmp_path / "a").exists()
        assert not (tmp_path / "b").exists(), "the save that raised must not have queued"
        ckpt.save(tmp_path / "c", _state()).result()  # the failure is not raised again
    assert set(_load_model(tmp_path / "c")) == {"t0", "t1"}


def test_wait_raises_a_failed_write_once_and_a_second_wait_returns(tmp_path: Path) -> None:
    ckpt = ac.AsyncCheckpointer()
    with fsops.use(FailingFS()):
        ckpt.save(tmp_path / "a", _state())
        with pytest.raises(ac.CheckpointWriteError) as info:
            ckpt.wait()
    assert str(tmp_path / "a") in str(info.value)
    second = threading.Thread(target=ckpt.wait, daemon=True)
    second.start()
    second.join(timeout=30)
    assert not second.is_alive(), "a second wait() hung"
    ckpt.wait()  # neither raises nor hangs
    ckpt.close()  # nor does close


def test_concurrent_waits_raise_the_failure_exactly_once(tmp_path: Path) -> None:
    fs = FailingFS()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            ckpt.wait()
        except ac.CheckpointError as exc:
            errors.append(exc)

    ckpt = ac.AsyncCheckpointer()
    with fsops.use(fs):
        ckpt.save(tmp_path / "a", _state())
        threads = [threading.Thread(target=waiter) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(errors) == 1
    ckpt.close()


def test_close_waits_for_the_write_and_raises_its_failure(tmp_path: Path) -> None:
    fs = GatedFS()
    ckpt = ac.AsyncCheckpointer()
    with fsops.use(fs):
        future = ckpt.save(tmp_path / "a", _state())
        timer = open_gate_later(fs)
        ckpt.close()
        timer.join()
    assert future.done()
    assert (tmp_path / "a" / "model.safetensors").is_file()
    with pytest.raises(ac.InvalidInputError, match="closed"):
        ckpt.save(tmp_path / "b", _state())

    failing = ac.AsyncCheckpointer()
    with fsops.use(FailingFS()):
        failing.save(tmp_path / "c", _state())
        with pytest.raises(ac.CheckpointWriteError):
            failing.close()
    failing.close()  # closing twice is a no-op


def test_context_manager_waits_on_exit_and_keeps_the_body_error(tmp_path: Path) -> None:
    fs = GatedFS()
    with fsops.use(fs):
        with ac.AsyncCheckpointer() as ckpt:
            future = ckpt.save(tmp_path / "a", _state())
            open_gate_later(fs)
        assert future.done()
    assert (tmp_path / "a" / "training_state.json").is_file()

    # An error in the body wins over a write failure found while unwinding.
    with (
        fsops.use(FailingFS()),
        pytest.raises(KeyError, match="body"),
        ac.AsyncCheckpointer() as ckpt,
    ):
        ckpt.save(tmp_path / "b", _state())
        raise KeyError("body")


def test_invalid_input_queues_nothing_and_keeps_the_previous_write(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer() as ckpt:
        first = ckpt.save(tmp_path / "a", _state())
        with pytest.raises(ac.UnsupportedArrayError, match="'bad'"):
            ckpt.save(tmp_path / "b", {"ok": np.zeros(3), "bad": object()})
        assert first.result() == (tmp_path / "a").absolute()
    assert not (tmp_path / "b").exists()


def test_staging_buffers_are_reused_between_saves_of_the_same_sizes(tmp_path: Path) -> None:
    fs = GatedFS()
    fs.open_gate()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        for step in range(3):
            ckpt.save(tmp_path / f"s{step}", _state(step), _state(step + 10))
        ckpt.wait()
    # Two threads write each save's files: tell them apart by name, not by order.
    written = list(zip(fs.names, fs.pointers, strict=True))
    model_pointers = [p for n, p in written if n == "model.safetensors"]
    assert model_pointers[0] == model_pointers[1] == model_pointers[2]
    optimizer_pointers = [p for n, p in written if n != "model.safetensors"]
    assert optimizer_pointers[0] == optimizer_pointers[2]
    state = _state(2)
    assert all(p != state[k].ctypes.data for k, p in model_pointers[2].items())


def test_staging_pool_holds_at_most_one_snapshot_and_close_releases_it(tmp_path: Path) -> None:
    small, large = (1000, 3000), (50_000, 20_000, 7)
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "a", _state(0, small)).result()
        assert ckpt.staging.nbytes == 4 * sum(small)
        ckpt.save(tmp_path / "b", _state(0, large)).result()
        assert ckpt.staging.nbytes == 4 * sum(large)
        ckpt.save(tmp_path / "c", _state(0, (3000, 50_000))).result()
        assert ckpt.staging.nbytes == 4 * (3000 + 50_000)
    assert ckpt.staging.nbytes == 0


def test_many_rapid_saves_apply_backpressure_instead_of_queueing_copies(tmp_path: Path) -> None:
    state = {"w": np.ones(1 << 20, np.float32)}  # 4 MiB
    state_bytes = state["w"].nbytes
    tracemalloc.start()
    try:
        with ac.AsyncCheckpointer() as ckpt:
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            futures = [ckpt.save(tmp_path / f"s{i}", state) for i in range(10)]
            for earlier in futures[:-1]:
                assert earlier.done()
            ckpt.wait()
            peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    # Queued copies would need ten snapshots; backpressure keeps one (plus small change).
    assert peak < 1.5 * state_bytes, f"peak {peak} B for a {state_bytes} B state"
    assert (tmp_path / "s9" / "model.safetensors").is_file()


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_an_interrupted_wait_keeps_the_write_pending(tmp_path: Path) -> None:
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        first = ckpt.save(tmp_path / "a", _state(1))
        fs.writing.wait(timeout=30)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            ckpt.wait()  # Ctrl-C while waiting
        timer = open_gate_later(fs)
        ckpt.save(tmp_path / "b", _state(2))
        # The interrupted wait must not have dropped the write: the new save waited for it
        # before overwriting the staging buffers that write was reading.
        assert first.done()
        timer.join()
    np.testing.assert_array_equal(_load_model(tmp_path / "a")["t1"], _state(1)["t1"])


def test_a_relative_directory_is_resolved_when_save_is_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save("rel", _state())
        os.chdir(tmp_path / "b")  # before the write starts
        fs.open_gate()
        assert future.result() == tmp_path / "a" / "rel"
    assert (tmp_path / "a" / "rel" / "model.safetensors").is_file()
    assert list((tmp_path / "b").iterdir()) == []


def test_the_garbage_collector_is_paused_during_the_stall_and_restored(tmp_path: Path) -> None:
    import gc

    seen: list[bool] = []
    original = ac.async_checkpointer.start_snapshot

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return original(*args, **kwargs)

    assert gc.isenabled()
    with pytest.MonkeyPatch.context() as mp, ac.AsyncCheckpointer() as ckpt:
        mp.setattr(ac.async_checkpointer, "start_snapshot", spy)
        ckpt.save(tmp_path / "a", _state()).result()
        assert gc.isenabled()  # back on after the save returned
        with pytest.raises(ac.CheckpointError):
            ckpt.save(tmp_path / "b", {"bad": object()})
        assert gc.isenabled()  # also after a refused save
        gc.disable()
        try:
            ckpt.save(tmp_path / "c", _state()).result()
            assert not gc.isenabled()  # the caller's choice stays
        finally:
            gc.enable()
    assert seen == [False, False, False]


def test_the_snapshot_is_gone_before_the_collector_is_back_on(tmp_path: Path) -> None:
    """The snapshot's per-tensor temporaries die before the collector is back on: alive,
    the pass their count sets off at its first allocation would scan every one of them."""
    import gc
    import weakref

    pending: list[weakref.ref[Any]] = []
    alive_at_enable: list[bool] = []
    original = ac.async_checkpointer.start_snapshot
    enable = gc.enable

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        pending.append(weakref.ref(result))
        return result

    def watched_enable() -> None:
        alive_at_enable.append(pending[-1]() is not None)
        enable()

    with pytest.MonkeyPatch.context() as mp, ac.AsyncCheckpointer() as ckpt:
        mp.setattr(ac.async_checkpointer, "start_snapshot", spy)
        mp.setattr(gc, "enable", watched_enable)
        state = _state()
        for path in ("a", "b"):  # a new state, then the cached one
            ckpt.save(tmp_path / path, state).result()
    assert alive_at_enable == [False, False]
