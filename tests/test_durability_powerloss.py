"""Suite 4: every state a power cut could leave loads a complete checkpoint, or says clearly
that there is none.

A run of saves is recorded (`faults.RecordingFS`), then `crashsim` builds every tree the
POSIX durability model allows at every step: unsynced files empty, cut or whole; entry
changes without a later directory fsync kept or reverted, independently. Each tree must
load a checkpoint at least as new as the last save that returned, and never a mix of
steps. Two deliberately broken savers (no file fsync, no directory fsync) show the
simulation catches what it is meant to catch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import arrayckpt as ac
from arrayckpt import fsops

try:
    from . import crashsim, faults
except ImportError:
    import crashsim
    import faults

LIMIT = faults.scaled(400, 2000)  # states checked per run (sampled when there are more)
STEPS = faults.scaled(3, 10)  # saves per recorded run


def record(
    tmp_path: Path, saver_name: str, fs: faults.RecordingFS, *, empty_dir: bool, steps: int = STEPS
):
    root = tmp_path / "root"
    root.mkdir()
    if empty_dir:
        (root / "ckpt").mkdir()
    log = crashsim.begin(root)
    with faults.saver(saver_name) as s, fsops.use(fs):
        for step in range(1, steps + 1):
            s.save(root / "ckpt", step)
            fs.mark(step)
    return crashsim.translate(log, root, fs.ops)


def violations(tmp_path: Path, log: crashsim.Log, states: list[crashsim.CrashState]):
    """Check each state; return descriptions of the ones that break the promise."""
    bad = []
    for n, state in enumerate(states):
        where = state.materialize(tmp_path / "states" / str(n))
        last = state.marks[-1] if state.marks else None
        allowed = {1} if last is None else {last, last + 1}
        try:
            step = faults.loaded_step(where / "ckpt")
        except ac.CheckpointError as exc:
            message = str(exc)
            if "no complete checkpoint" not in message:
                bad.append(f"state {n} (crash at action {state.at}): unclear error {message}")
            elif last is not None:
                named = [p for p in where.glob(".ckpt.arrayckpt-old-*") if str(p) in message]
                if len(named) != 1:
                    bad.append(f"state {n}: step {last} was saved, now lost: {message}")
                elif faults.loaded_step(named[0]) != last:
                    bad.append(f"state {n}: the aside copy named is not step {last}: {message}")
            continue
        except AssertionError as exc:
            bad.append(f"state {n} (crash at action {state.at}): {exc}")
            continue
        if step not in allowed:
            bad.append(f"state {n}: loaded step {step}, expected one of {sorted(allowed)}")
        elif n % 25 == 0:  # now and then: the next save over the wreck works and tidies up
            ac.save_checkpoint(
                where / "ckpt",
                faults.model_state(9),
                faults.optimizer_state(9),
                faults.training_state(9),
            )
            faults.assert_checkpoint(where / "ckpt", 9)
            assert faults.debris(where) == []
    return bad


@pytest.mark.parametrize("saver_name", faults.SAVERS)
@pytest.mark.parametrize("case", ["exchange", "two renames", "into an empty directory"])
def test_power_cut_at_every_step(tmp_path: Path, saver_name: str, case: str) -> None:
    fs = faults.RecordingFS(keep_data=True, exchange=case != "two renames")
    log = record(tmp_path, saver_name, fs, empty_dir=case == "into an empty directory")
    states, total = crashsim.crash_states(log, LIMIT)
    assert total >= 20, "the simulation produced suspiciously few states"
    bad = violations(tmp_path, log, states)
    faults.report(
        "power-loss",
        runs=1,
        saves=STEPS,
        distinct_states=total,
        states_checked=len(states),
        failures=len(bad),
    )
    assert bad == [], "\n".join(bad[:20])


class NoFileSync(faults.RecordingFS):
    def fsync_file(self, path: Path) -> None:
        """Broken on purpose: file data is never made durable."""


class NoDirSync(faults.RecordingFS):
    def fsync_dir(self, path: Path) -> None:
        """Broken on purpose: no directory entry is ever made durable."""


@pytest.mark.parametrize("broken", [NoFileSync, NoDirSync])
def test_the_simulation_catches_a_missing_fsync(tmp_path: Path, broken: type) -> None:
    log = record(tmp_path, "sync", broken(keep_data=True), empty_dir=False, steps=1)
    states, _ = crashsim.crash_states(log, LIMIT)
    assert violations(tmp_path, log, states), f"{broken.__name__} went unnoticed"
