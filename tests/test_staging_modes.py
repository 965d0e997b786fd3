"""Staging beyond the plain copy: warming buffers before the first save (`prepare`), JAX
arrays held without a copy, and background staging with its ``staged`` future."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import strategies
from async_helpers import GatedFS

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.snapshot import PendingSnapshot, take_snapshot
from arrayckpt.staging import StagingPool

needs_jax = pytest.mark.skipif(not strategies.importable("jax"), reason="jax is not installed")
needs_torch = pytest.mark.skipif(
    not strategies.importable("torch"), reason="torch is not installed"
)


def _state(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    state: dict[str, Any] = {
        f"big{i}": rng.standard_normal(1 << 18).astype(np.float32) for i in range(3)
    }
    state.update({f"small{i}": rng.standard_normal(8).astype(np.float32) for i in range(5)})
    return state


def _count_allocations(pool: StagingPool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    allocate = pool._allocate

    def counted(nbytes: int, pinned: bool) -> np.ndarray:
        sizes.append(nbytes)
        return allocate(nbytes, pinned)

    monkeypatch.setattr(pool, "_allocate", counted)
    return sizes


# -- prepare ---------------------------------------------------------------------------


def test_prepared_first_save_allocates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.prepare(state, {"m": state["big0"]}).result(timeout=60)
        warmed = ckpt.staging.nbytes
        allocated = _count_allocations(ckpt.staging, monkeypatch)
        ckpt.save(tmp_path / "step_1", state, {"m": state["big0"]}).result()
        assert allocated == [], "the first save after prepare() allocated staging memory"
        assert ckpt.staging.nbytes == warmed
    got = ac.load_checkpoint(tmp_path / "step_1")
    for k, v in state.items():
        np.testing.assert_array_equal(got.model[k], v)


def test_without_prepare_the_first_save_allocates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counterpart of the test above: the counter does see a cold first save."""
    with ac.AsyncCheckpointer() as ckpt:
        allocated = _count_allocations(ckpt.staging, monkeypatch)
        ckpt.save(tmp_path / "step_1", _state()).result()
    assert len(allocated) == 4  # three large buffers and one slab for the small arrays


def test_prepare_accepts_arrays_of_the_same_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = {k: np.empty_like(v) for k, v in _state().items()}
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.prepare(template).result(timeout=60)
        allocated = _count_allocations(ckpt.staging, monkeypatch)
        ckpt.save(tmp_path / "step_1", _state(seed=3)).result()
    assert allocated == []


def test_prepare_refuses_what_save_refuses_in_the_callers_thread() -> None:
    with ac.AsyncCheckpointer() as ckpt:
        with pytest.raises(ac.CheckpointError, match="'bad'"):
            ckpt.prepare({"ok": np.zeros(2), "bad": object()})
        assert ckpt.staging.nbytes == 0


def test_a_save_of_another_state_after_prepare_still_works(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.prepare(_state())
        other = {"x": np.arange(1 << 16, dtype=np.int64)}
        ckpt.save(tmp_path / "step_1", other).result()
    np.testing.assert_array_equal(ac.load_checkpoint(tmp_path / "step_1").model["x"], other["x"])


def test_close_waits_for_the_warm_up_and_frees_it() -> None:
    ckpt = ac.AsyncCheckpointer()
    done = ckpt.prepare({"x": np.zeros(8 << 20, np.float32)})
    ckpt.close()
    assert done.done() and done.exception() is None
    assert ckpt.staging.nbytes == 0


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_prepare_faults_the_memory_in() -> None:
    """Warm means resident: the pages are touched before any save copies into them."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    gc.collect()
    before = rss()
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.prepare({"x": np.empty(64 << 20, np.uint8)}).result(timeout=60)
        grown = rss() - before
    assert grown > 48 << 20, f"prepare() left {grown >> 20} MiB of 64 MiB resident"


# -- JAX arrays are held, not copied ---------------------------------------------------------


@needs_jax
def test_jax_host_arrays_are_held_without_a_copy() -> None:
    import jax.numpy as jnp

    x = jnp.arange(1 << 16, dtype=jnp.float32)
    b = jnp.ones((4, 4), jnp.bfloat16)
    pool = StagingPool()
    snap = take_snapshot({"x": x, "b": b, "n": np.zeros(3)}, None, None, staging=pool)
    assert list(snap.model) == ["x", "b", "n"]  # the caller's order
    assert np.shares_memory(snap.model["x"].data, np.asarray(x))
    assert np.shares_memory(snap.model["b"].data, np.asarray(b))
    assert pool.nbytes == 3 * 8  # only the NumPy array was staged


@needs_jax
def test_a_jax_array_deleted_or_donated_after_save_is_written_whole(tmp_path: Path) -> None:
    import jax
    import jax.numpy as jnp

    x = jnp.arange(1 << 16, dtype=jnp.float32)
    y = jnp.full((1 << 10,), 7, jnp.int32)
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save(tmp_path / "step_1", {"x": x, "y": y})
        assert ckpt.staging.nbytes == 0
        x.delete()  # the user frees it while the write has not started
        step = jax.jit(lambda v: v + 1, donate_argnums=0)
        y2 = step(y)  # and donates the other one
        fs.open_gate()
        future.result()
    got = ac.load_checkpoint(tmp_path / "step_1").model
    np.testing.assert_array_equal(got["x"], np.arange(1 << 16, dtype=np.float32))
    np.testing.assert_array_equal(got["y"], np.full(1 << 10, 7, np.int32))
    np.testing.assert_array_equal(np.asarray(y2), np.full(1 << 10, 8, np.int32))


# -- background staging -----------------------------------------------------------------------


def test_a_default_save_is_staged_when_it_returns(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save(tmp_path / "step_1", _state())
        assert future.staged.done() and future.staged.exception() is None


def test_background_staging_keeps_the_values_of_save_time(tmp_path: Path) -> None:
    state = _state()
    expected = {k: v.copy() for k, v in state.items()}
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save(tmp_path / "step_1", state, background_staging=True)
        future.staged.result(timeout=60)
        for v in state.values():  # allowed once staged, long before the write
            v += 1
        assert not future.done()
        fs.open_gate()
        future.result()
    got = ac.load_checkpoint(tmp_path / "step_1").model
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v)


def test_a_failed_background_copy_fails_both_futures_and_keeps_the_checkpointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = PendingSnapshot.start_copies

    def broken(self: PendingSnapshot) -> Any:
        raise MemoryError("no staging memory")

    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "step_1", _state()).result()
        monkeypatch.setattr(PendingSnapshot, "start_copies", broken)
        future = ckpt.save(tmp_path / "step_2", _state(1), background_staging=True)
        with pytest.raises(MemoryError):
            future.staged.result(timeout=60)
        with pytest.raises(MemoryError):
            future.result(timeout=60)
        monkeypatch.setattr(PendingSnapshot, "start_copies", start)
        ckpt.save(tmp_path / "step_3", _state(3), background_staging=True).result()
    assert not (tmp_path / "step_2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_3"]


def _big_state() -> dict[str, np.ndarray]:
    """Enough bytes for several copy runs (`snapshot.PIPELINE_BYTES`)."""
    return {f"t{i}": np.full(8 << 20, i, np.float32) for i in range(6)}  # 192 MiB


@pytest.mark.parametrize("background", [False, True])
def test_a_copy_failing_while_the_write_runs_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    """The write starts before the copies end (it waits at each tensor's gate): a copy
    that fails midway must fail the write, not let it write a buffer never filled."""
    from arrayckpt import hostcopy

    run_copies = hostcopy.run_copies
    calls = []

    def fails_on_the_second_run(jobs: Any) -> None:
        if not jobs:  # the empty batch of a snapshot with no device arrays
            return
        calls.append(len(jobs))
        if len(calls) == 2:
            raise MemoryError("copy failed (injected)")
        run_copies(jobs)

    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "step_1", _state()).result()
        monkeypatch.setattr(hostcopy, "run_copies", fails_on_the_second_run)
        if background:
            future = ckpt.save(tmp_path / "step_2", _big_state(), background_staging=True)
            with pytest.raises(MemoryError):
                future.staged.result(timeout=60)
            with pytest.raises(ac.CheckpointError, match="copy failed"):
                future.result(timeout=60)
        else:
            with pytest.raises(MemoryError):
                ckpt.save(tmp_path / "step_2", _big_state())
            ckpt.wait()  # the failed write was raised once, by save
        assert len(calls) == 2
        monkeypatch.setattr(hostcopy, "run_copies", run_copies)
        ckpt.save(tmp_path / "step_3", _big_state()).result()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_3"]
    assert ac.load_checkpoint(tmp_path / "step_3").model["t5"][0] == 5


def test_the_write_starts_while_the_copies_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first file's bytes reach the disk before the snapshot's last copy runs."""
    from arrayckpt import hostcopy

    run_copies = hostcopy.run_copies
    seen_before_last: list[int] = []
    model = tmp_path / "step_1" / "model.safetensors"

    def watch(jobs: Any) -> None:
        if jobs and jobs[0][0].nbytes and len(seen_before_last) < 5:
            partial = [p for p in tmp_path.rglob("model.safetensors")]
            seen_before_last.append(max((p.stat().st_size for p in partial), default=0))
            time.sleep(0.2)  # give the writer time to get ahead of the copy
        run_copies(jobs)

    monkeypatch.setattr(hostcopy, "run_copies", watch)
    state = _big_state()
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "step_1", state).result()
    assert max(seen_before_last) > 0, "no byte was written before the copies ended"
    assert model.stat().st_size > 192 << 20


def test_background_staging_refuses_bad_input_before_returning(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer() as ckpt, pytest.raises(ac.CheckpointError, match="'bad'"):
        ckpt.save(tmp_path / "s", {"bad": object()}, background_staging=True)
    assert not (tmp_path / "s").exists()


@needs_torch
def test_torch_training_with_background_staging_resumes_exactly(tmp_path: Path) -> None:
    """The pattern the docs show: save, run forward and backward while the copy runs,
    wait on ``staged`` right before ``optimizer.step()``; the checkpoint holds the values
    of save time and a resumed run continues with the same losses."""
    import torch

    def make() -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        )
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    data = [(torch.randn(32, 16, generator=torch.Generator().manual_seed(i)),) for i in range(8)]

    def step(model: Any, opt: Any, i: int, before_step: Any = None) -> float:
        (x,) = data[i]
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        return loss.item()

    model, opt = make()
    losses = []
    with ac.AsyncCheckpointer() as ckpt:
        for i in range(8):
            if i == 4:
                future = ckpt.save(
                    tmp_path / "step_4",
                    model.state_dict(),
                    opt.state_dict(),
                    background_staging=True,
                )
                losses.append(step(model, opt, i, before_step=future.staged.result))
            else:
                losses.append(step(model, opt, i))
        future.result()
    model2, opt2 = make()
    got = ac.load_checkpoint(tmp_path / "step_4", xp="torch")
    model2.load_state_dict(got.model)
    opt2.load_state_dict(got.optimizer)
    resumed = [step(model2, opt2, i) for i in range(4, 8)]
    assert resumed == losses[4:]


def test_the_manager_prepares_and_stages_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    expected = {k: v.copy() for k, v in state.items()}
    with ac.CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.prepare(state).result(timeout=60)
        allocated = _count_allocations(mgr._checkpointer.staging, monkeypatch)  # type: ignore[union-attr]
        future = mgr.save(1, state, background_staging=True)
        future.staged.result(timeout=60)
        for v in state.values():
            v += 1
        future.result()
        assert allocated == []
    got = ac.CheckpointManager(tmp_path).restore()
    assert got is not None
    for k, v in expected.items():
        np.testing.assert_array_equal(got.model[k], v)


def test_prepare_resolves_bf16_so_the_first_save_imports_nothing() -> None:
    """ml_dtypes (BF16) takes ~0.45 s to import: `prepare` pays it, not the first stall."""
    code = (
        "import sys, arrayckpt as ac, torch\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        "state = {'w': torch.zeros(8, dtype=torch.bfloat16)}\n"
        "ckpt = ac.AsyncCheckpointer()\n"
        "ckpt.prepare(state).result()\n"
        "print('ml_dtypes' in sys.modules)\n"
    )
    pytest.importorskip("torch")
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "True"


def test_after_prepare_the_first_save_imports_nothing() -> None:
    """Every module a save needs (crc32c's import alone takes 20-60 ms) is imported by
    `prepare`, so none is imported in the first save's stall or write."""
    code = (
        "import sys, numpy as np, arrayckpt as ac\n"
        "state = {'w': np.zeros(1 << 20, np.float32), 'b': np.zeros(3)}\n"
        "ckpt = ac.AsyncCheckpointer()\n"
        "ckpt.prepare(state).result()\n"
        "before = set(sys.modules)\n"
        "ckpt.save(sys.argv[1], state).result()\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [sys.executable, "-c", code, os.path.join(d, "ckpt")],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
