"""Suite 2: a fault at every file-system step of a save, of every kind.

After each: the previous checkpoint loads bit-exact (or, for a fault in the cleanup after
the commit, the new one does), the error reached the caller once with its cause chained,
the next save succeeds and no temporary directory is left.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import arrayckpt as ac
from arrayckpt import fsops

try:
    from . import faults
except ImportError:
    import faults

SCENARIOS = {
    # name: (save a previous checkpoint first?, exchange supported?)
    "first save": (False, True),
    "replace (exchange)": (True, True),
    "replace (two renames)": (True, False),
}


def clean_ops(tmp_path: Path, saver_name: str, previous: bool, exchange: bool):
    target = tmp_path / "probe" / "ckpt"
    with faults.saver(saver_name) as s:
        if previous:
            s.save(target, 1)
        recorder = faults.RecordingFS(exchange=exchange)
        with fsops.use(recorder):
            s.save(target, 2)
    return recorder.ops


def run_case(
    root: Path,
    saver_name: str,
    previous: bool,
    exchange: bool,
    k: int,
    fault: faults.Fault,
    commit_at: int,
    key: faults.StepKey,
) -> None:
    target = root / "ckpt"
    with faults.saver(saver_name) as s:
        if previous:
            s.save(target, 1)
        fs = faults.FaultFS(key, fault, exchange=exchange)
        raised: BaseException | None = None
        with fsops.use(fs):
            try:
                s.save(target, 2)
            except BaseException as exc:
                raised = exc
        assert fs.injected is not None, "the fault never fired"
        if raised is None:
            assert k > commit_at, "a save failed before its commit yet reported success"
            faults.assert_checkpoint(target, 2)
        else:
            if isinstance(fs.injected, KeyboardInterrupt):
                assert raised is fs.injected
            else:
                assert isinstance(raised, ac.CheckpointWriteError), repr(raised)
                assert raised.__cause__ is fs.injected, "cause not chained"
                assert str(target) in str(raised), str(raised)
            s.after_failure()  # must not raise the same error again
            if k > commit_at:
                faults.assert_checkpoint(target, 2)
            elif previous:
                faults.assert_checkpoint(target, 1)
            else:
                with pytest.raises(ac.CheckpointNotFoundError):
                    ac.load_checkpoint(target)
        if k <= commit_at:
            assert faults.debris(root) == [], "a failed save left a temporary directory"
        s.save(target, 3)
    faults.assert_checkpoint(target, 3)
    assert faults.debris(root) == [], "the next save left (or did not clean) debris"


@pytest.mark.parametrize("saver_name", faults.SAVERS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fault_at_every_step(tmp_path: Path, saver_name: str, scenario: str) -> None:
    previous, exchange = SCENARIOS[scenario]
    ops = clean_ops(tmp_path, saver_name, previous, exchange)
    # The commit is final once the parent directory is fsynced after the swap.
    commit_at = max(i for i, op in enumerate(ops) if op.kind == "fsync_dir")
    cases = [(k, f) for k, op in enumerate(ops) for f in faults.FAULTS if f.applies(op.kind)]
    assert len(cases) >= 40
    failures = []
    for n, (k, fault) in enumerate(cases):
        try:
            run_case(
                tmp_path / f"case{n}",
                saver_name,
                previous,
                exchange,
                k,
                fault,
                commit_at,
                faults.step_key(ops, k),
            )
        except AssertionError as exc:
            failures.append(f"{fault} at step {k} {ops[k]}: {exc}")
    faults.report(
        "crash points",
        saver=saver_name,
        scenario=scenario,
        steps=len(ops),
        faults_injected=len(cases),
        failures=len(failures),
    )
    assert failures == [], "\n".join(failures)


def test_errors_reach_the_caller_once_async(tmp_path: Path) -> None:
    """A failed background write is raised by `wait` (once), not again by `close`."""
    target = tmp_path / "ckpt"
    ckpt = ac.AsyncCheckpointer()
    ckpt.save(target, faults.model_state(1)).result()
    fs = faults.FaultFS(("write_safetensors", ("model.safetensors",), 0), faults.FAULTS[0])
    with fsops.use(fs):
        future = ckpt.save(target, faults.model_state(2))
        with pytest.raises(ac.CheckpointWriteError) as info:
            ckpt.wait()
    assert info.value.__cause__ is fs.injected
    assert future.exception() is info.value
    ckpt.close()  # already raised: not again
    ac.load_checkpoint(target)


def test_a_timed_out_look_does_not_swallow_the_error(tmp_path: Path) -> None:
    """``future.result(timeout)`` that times out has not seen the error: `wait` raises it."""

    class SlowFailing(faults.SlowFS):
        def fsync_dir(self, path: Path) -> None:
            raise OSError(5, "injected EIO", str(path))

    ckpt = ac.AsyncCheckpointer()
    with fsops.use(SlowFailing(0.2)):
        future = ckpt.save(tmp_path / "ckpt", faults.model_state(1))
        with pytest.raises(TimeoutError):
            future.result(timeout=0.01)
        with pytest.raises(ac.CheckpointWriteError):
            ckpt.wait()
    ckpt.close()
    assert faults.debris(tmp_path) == []


DOUBLE_FIRST = [f for f in faults.FAULTS if f.name in ("EIO", "KeyboardInterrupt")]


@pytest.mark.parametrize("saver_name", faults.SAVERS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_second_fault_during_recovery(tmp_path: Path, saver_name: str, scenario: str) -> None:
    """A fault, then EIO at each later step (the rollback, the cleanup).

    With its undo failing too a save cannot always put the previous checkpoint back at
    the path; it must still never leave a mix or lose the previous one: the path holds
    step 1 or step 2 complete, or says there is no complete checkpoint and names where
    step 1 is. The next save succeeds and removes every leftover.
    """
    previous, exchange = SCENARIOS[scenario]
    ops = clean_ops(tmp_path, saver_name, previous, exchange)
    eio = faults.FAULTS[1]
    failures, tried = [], 0
    # CI: a two-rank save has three times the steps (and square the cases); take every
    # fourth first fault there, all of them under ARRAYCKPT_STRESS=1.
    stride = faults.scaled(4, 1) if saver_name == "dist2" else 1
    for k, op in enumerate(ops):
        if k % stride:
            continue
        for first in DOUBLE_FIRST:
            probe = faults.FaultFS(faults.step_key(ops, k), first, exchange=exchange)
            root = tmp_path / f"probe-{k}-{first}"
            outcome_steps = _failing_save(root, saver_name, previous, probe)
            for k2 in range(k + 1, outcome_steps):
                tried += 1
                where = tmp_path / f"case-{k}-{first}-{k2}"
                fs = faults.FaultFS(
                    faults.step_key(ops, k),
                    first,
                    exchange=exchange,
                    also=(faults.step_key(probe.ops, k2), eio),
                )
                try:
                    _failing_save(where, saver_name, previous, fs)
                    _check_double(where, previous)
                except AssertionError as exc:
                    failures.append(f"{first} at {op}, EIO at step {k2}: {exc}")
    faults.report(
        "double faults", saver=saver_name, scenario=scenario, cases=tried, failures=len(failures)
    )
    assert tried > 0
    assert failures == [], "\n".join(failures)


def _failing_save(root: Path, saver_name: str, previous: bool, fs: faults.FaultFS) -> int:
    """Save step 1 (if ``previous``), then step 2 under ``fs``; return its step count."""
    with faults.saver(saver_name) as s:
        if previous:
            s.save(root / "ckpt", 1)
        with fsops.use(fs):
            try:
                s.save(root / "ckpt", 2)
            except BaseException:
                s.after_failure()
    return len(fs.ops)


def _check_double(root: Path, previous: bool) -> None:
    target = root / "ckpt"
    try:
        step = faults.loaded_step(target)
        assert step in (1, 2) if previous else step == 2
    except ac.CheckpointNotFoundError as exc:
        message = str(exc)
        assert "no complete checkpoint" in message, message
        if previous:
            named = [p for p in root.glob(".ckpt.arrayckpt-*") if str(p) in message]
            assert named and faults.loaded_step(named[0]) == 1, f"step 1 lost: {message}"
    ac.save_checkpoint(
        target, faults.model_state(3), faults.optimizer_state(3), faults.training_state(3)
    )
    faults.assert_checkpoint(target, 3)
    assert faults.debris(root) == [], faults.debris(root)
