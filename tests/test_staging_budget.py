"""`max_staging_bytes`: saves larger than the staging budget, written partly in place."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import strategies
from async_helpers import FailingFS, GatedFS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.errors import InvalidInputError

MIB = 1 << 20


def _state(n: int = 8, size: int = MIB) -> dict[str, np.ndarray]:
    """``n`` float32 arrays of ``size`` bytes, each with distinct values."""
    return {f"w{i}": np.arange(size // 4, dtype=np.float32) + i for i in range(n)}


def _expected(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}


def _check(directory: Path, model: Mapping[str, np.ndarray], optimizer: Any = None) -> None:
    out = ac.load_checkpoint(directory)
    assert out.model.keys() == model.keys()
    for k, v in model.items():
        np.testing.assert_array_equal(out.model[k], v, err_msg=k)
    for k, v in (optimizer or {}).items():
        np.testing.assert_array_equal(out.optimizer[k], v, err_msg=k)


class _FsyncGate(fsops.FileSystem):
    """Holds every file's fsync (the data is written, not yet durable) until released."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def fsync_file(self, path: Path) -> None:
        if not self.gate.wait(timeout=60):
            raise OSError("test gate never opened")
        super().fsync_file(path)


def test_a_state_larger_than_the_budget_saves_the_values_at_save_time(tmp_path: Path) -> None:
    model, optimizer = _state(8), {f"m{i}": np.full(MIB // 4, i, np.float32) for i in range(8)}
    want_model, want_optimizer = _expected(model), _expected(optimizer)
    with ac.AsyncCheckpointer(max_staging_bytes=3 * MIB) as ckpt:
        future = ckpt.save(tmp_path / "s", model, optimizer)
        assert ckpt.staging.nbytes <= 3 * MIB
        for a in (*model.values(), *optimizer.values()):
            a += 100  # after save returns: neither the staged nor the in-place arrays count
        future.result()
    _check(tmp_path / "s", want_model, want_optimizer)
    # standard files: safetensors itself opens them
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(
        load_file(tmp_path / "s" / "model.safetensors")["w3"], want_model["w3"]
    )


def test_the_pool_stays_within_the_budget_across_saves(tmp_path: Path) -> None:
    state = _state(16)
    with ac.AsyncCheckpointer(max_staging_bytes=5 * MIB) as ckpt:
        for step in range(3):
            ckpt.save(tmp_path / f"s{step}", state).result()
            assert 0 < ckpt.staging.nbytes <= 5 * MIB
    without = ac.AsyncCheckpointer()
    without.save(tmp_path / "whole", state).result()
    assert without.staging.nbytes == 16 * MIB  # what the budget saves
    without.close()


def test_save_returns_once_the_in_place_arrays_are_written_before_the_fsync(
    tmp_path: Path,
) -> None:
    """The caller is released as the writer passes the last array it borrowed, not at the
    end of the write: here every fsync is held, and `save` still returns."""
    state = _state(8)
    want = _expected(state)
    fs = _FsyncGate()
    with fsops.use(fs), ac.AsyncCheckpointer(max_staging_bytes=2 * MIB) as ckpt:
        returned = threading.Event()
        saver = threading.Thread(target=lambda: (ckpt.save(tmp_path / "s", state), returned.set()))
        saver.start()
        released = returned.wait(timeout=30)
        fs.gate.set()
        saver.join(30)
        assert released, "save waited for the fsync: the in-place arrays were never reported"
        for a in state.values():
            a += 1
        ckpt.wait()
    _check(tmp_path / "s", want)


def test_save_waits_while_the_in_place_arrays_are_not_written(tmp_path: Path) -> None:
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer(max_staging_bytes=2 * MIB) as ckpt:
        returned = threading.Event()
        saver = threading.Thread(
            target=lambda: (ckpt.save(tmp_path / "s", _state(8)), returned.set())
        )
        saver.start()
        assert fs.writing.wait(30)
        early = returned.wait(timeout=0.5)
        fs.open_gate()
        saver.join(30)
        assert not early, "save returned while the writer had not read the caller's arrays"
        assert returned.is_set()
        ckpt.wait()


def test_a_failed_write_releases_the_caller(tmp_path: Path) -> None:
    with fsops.use(FailingFS()), ac.AsyncCheckpointer(max_staging_bytes=MIB) as ckpt:
        future = ckpt.save(tmp_path / "s", _state(4))  # returns: does not hang
        with pytest.raises(ac.CheckpointError, match="No space left"):
            future.result(timeout=30)
    assert not (tmp_path / "s").exists()


def test_a_state_within_the_budget_is_staged_whole(tmp_path: Path) -> None:
    state = _state(4)
    with ac.AsyncCheckpointer(max_staging_bytes=64 * MIB) as ckpt:
        ckpt.save(tmp_path / "s", state).result()
        assert ckpt.staging.nbytes == 4 * MIB


def test_arrays_without_a_host_view_are_staged_and_must_fit(tmp_path: Path) -> None:
    strided = {"t": np.arange(4 * MIB // 4, dtype=np.float32)[::2]}  # 2 MiB, no view
    with ac.AsyncCheckpointer(max_staging_bytes=MIB) as ckpt:
        with pytest.raises(InvalidInputError, match=r"max_staging_bytes=1048576.*'t'"):
            ckpt.save(tmp_path / "s", strided)
        assert not (tmp_path / "s").exists()
    state = {**_state(4), **strided, "big_endian": np.arange(1000, dtype=">f4")}
    want = {k: np.ascontiguousarray(v) for k, v in state.items()}
    with ac.AsyncCheckpointer(max_staging_bytes=3 * MIB) as ckpt:
        future = ckpt.save(tmp_path / "mixed", state)
        strided["t"] += 1  # a view of the caller's array, staged: the copy counts
        future.result()
        assert ckpt.staging.nbytes <= 3 * MIB
    _check(tmp_path / "mixed", want)


def test_torch_cpu_tensors_are_written_in_place(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = {f"w{i}": torch.arange(MIB // 2, dtype=torch.bfloat16) + i for i in range(6)}
    want = {k: v.clone() for k, v in state.items()}
    with ac.AsyncCheckpointer(max_staging_bytes=2 * MIB) as ckpt:
        future = ckpt.save(tmp_path / "s", state)
        assert ckpt.staging.nbytes <= 2 * MIB
        for t in state.values():
            t.add_(1)
        future.result()
    out = ac.load_checkpoint(tmp_path / "s", xp="torch")
    for k, v in want.items():
        assert torch.equal(out.model[k], v), k


def test_background_staging_resolves_staged_after_the_in_place_arrays(tmp_path: Path) -> None:
    state = _state(8)
    want = _expected(state)
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer(max_staging_bytes=2 * MIB) as ckpt:
        future = ckpt.save(tmp_path / "s", state, background_staging=True)
        assert not future.staged.done()  # the writer has not read the in-place arrays yet
        fs.open_gate()
        future.staged.result(timeout=30)
        for a in state.values():
            a += 1
        future.result(timeout=30)
    _check(tmp_path / "s", want)


def test_prepare_warms_only_what_a_save_within_the_budget_stages(tmp_path: Path) -> None:
    state = _state(8)
    with ac.AsyncCheckpointer(max_staging_bytes=3 * MIB) as ckpt:
        ckpt.prepare(state).result()
        warmed = ckpt.staging.nbytes
        assert 0 < warmed <= 3 * MIB
        ckpt.save(tmp_path / "s", state).result()
        assert ckpt.staging.nbytes == warmed  # the save reused exactly the warmed buffers


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1GiB"])
def test_a_bad_budget_is_refused(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="max_staging_bytes"):
        ac.AsyncCheckpointer(max_staging_bytes=bad)
    with pytest.raises(InvalidInputError, match="max_staging_bytes"):
        ac.CheckpointManager(tmp_path / "root", max_staging_bytes=bad)
    assert not (tmp_path / "root").exists()  # refused before anything is created


def test_save_distributed_refuses_a_budget(tmp_path: Path) -> None:
    with (
        ac.AsyncCheckpointer(max_staging_bytes=MIB) as ckpt,
        pytest.raises(InvalidInputError, match="save_distributed"),
    ):
        ckpt.save_distributed(tmp_path / "d", 0, 1, _state(2))


def test_a_manager_with_a_budget_saves_and_restores(tmp_path: Path) -> None:
    state = _state(8)
    with ac.CheckpointManager(tmp_path, keep_last=2, max_staging_bytes=2 * MIB) as mgr:
        for step in (1, 2, 3):
            for a in state.values():
                a += 1
            mgr.save(step, state, {"m": state["w0"] * 2})
        mgr.wait()
    restored = ac.CheckpointManager(tmp_path).restore()
    assert restored.training_state.step == 3
    for k, v in state.items():
        np.testing.assert_array_equal(restored.model[k], v)


_RSS_CHILD = textwrap.dedent(
    """
    import gc, resource, sys, tempfile
    import numpy as np
    import arrayckpt as ac

    budget = int(sys.argv[1]) if sys.argv[1] != "none" else None
    root = sys.argv[2]
    with ac.AsyncCheckpointer() as warm:  # imports and first-use costs, outside the measure
        warm.save(root + "/warm", {"x": np.ones(1024, np.float32)}).result()
    state = {f"w{i}": np.ones(32 << 20, np.float32) for i in range(16)}  # 2 GiB, touched
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    with ac.AsyncCheckpointer(max_staging_bytes=budget) as ckpt:
        ckpt.save(root + "/s", state).result()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    print(after - before)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_extra_peak_rss_stays_within_the_budget_plus_the_largest_tensor(tmp_path: Path) -> None:
    """2 GiB of state saved with a 256 MiB budget: the process's peak grows by at most the
    budget plus one tensor (128 MiB) plus 64 MiB of slack, where a whole staging copy
    would add 2 GiB."""
    budget, largest = 256 * MIB, 128 * MIB
    run = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(budget), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert run.returncode == 0, run.stderr
    extra = int(run.stdout.split()[-1])
    assert extra <= budget + largest + 64 * MIB, f"peak grew by {extra / MIB:.0f} MiB"


@pytest.mark.usefixtures("jax_x64")  # backend_arrays draws 64-bit dtypes for JAX too
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), budget=st.integers(1, 4096))
def test_any_backend_and_layout_round_trips_within_any_budget(
    tmp_path: Path, data: st.DataObject, budget: int
) -> None:
    """Every CPU backend, dtype and memory layout, with budgets from below one array to
    above the state: the checkpoint holds the values, or the save is refused because the
    arrays without a host view alone exceed the budget."""
    items = data.draw(st.lists(strategies.backend_arrays(), min_size=1, max_size=6))
    state = {f"t{i}": array for i, (_, array, _, _) in enumerate(items)}
    directory = tmp_path / f"s{budget}-{len(os.listdir(tmp_path))}"
    with ac.AsyncCheckpointer(max_staging_bytes=budget) as ckpt:
        try:
            ckpt.save(directory, state).result()
        except InvalidInputError as exc:
            assert "max_staging_bytes" in str(exc)
            assert not directory.exists()
            return
        assert ckpt.staging.nbytes <= budget
    out = ac.load_checkpoint(directory).model
    for i, (expected, _, backend, layout) in enumerate(items):
        strategies.assert_same_array(out[f"t{i}"], expected, f"{backend}/{layout}")


def test_a_one_element_tensor_with_any_stride_stages(tmp_path: Path) -> None:
    """torch calls a 1-element tensor contiguous whatever its stride; staging it must not
    try to view it as bytes through that stride (found by the property test above)."""
    torch = pytest.importorskip("torch")
    x = torch.arange(2, dtype=torch.bfloat16)[1::2]  # shape (1,), stride (2,)
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "s", {"x": x}).result()
    assert torch.equal(ac.load_checkpoint(tmp_path / "s", xp="torch").model["x"], x)


def test_an_in_place_array_is_reported_only_once_its_bytes_are_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrays larger than the writer's chunk are written in pieces: the caller may be
    released from one only after its last piece, never before its first."""
    from arrayckpt import fsops as fs_module
    from arrayckpt import handoff

    assert 4 * MIB > fs_module.CHUNK_BYTES
    seen: list[tuple[int, int]] = []
    original = handoff.Handoff._written

    def record(self: handoff.Handoff, index: int) -> None:
        model = [p for p in tmp_path.rglob("model.safetensors")]
        seen.append((index, max((p.stat().st_size for p in model), default=0)))
        original(self, index)

    monkeypatch.setattr(handoff.Handoff, "_written", record)
    state = {f"w{i}": np.full(MIB, i, np.float32) for i in range(3)}  # 4 MiB each
    with ac.AsyncCheckpointer(max_staging_bytes=4 * MIB) as ckpt:
        ckpt.save(tmp_path / "s", state).result()
    first = [(i, size) for i, size in seen[:2]]  # w0 and w1 are written in place
    assert sorted(i for i, _ in first) == [0, 1]
    for i, size in first:
        assert size >= (i + 1) * 4 * MIB, f"w{i} reported with {size} bytes in the file"
