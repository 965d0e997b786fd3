"""CheckpointManager: steps, retention after commit, temporaries, resume after a crash."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.layout import scan, temporary_owner

REPO = Path(__file__).resolve().parents[1]


def state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.full(3, step, np.float32)}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("async_save", [True, False])
def test_save_list_and_restore(tmp_path, async_save):
    with ac.CheckpointManager(tmp_path, async_save=async_save) as mgr:
        assert mgr.restore() is None and mgr.latest_step() is None
        for step in (5, 10, 100):
            future = mgr.save(
                step, state(step), {"m": np.zeros(1)}, ac.TrainingState(step=step, epoch=1)
            )
        assert future.result() == tmp_path / "step_00000100"
        mgr.wait()
        assert mgr.steps() == [5, 10, 100] and mgr.latest_step() == 100
        ckpt = mgr.restore()
        assert ckpt is not None and ckpt.training_state.step == 100
        np.testing.assert_array_equal(ckpt.model["w"], state(100)["w"])
        np.testing.assert_array_equal(mgr.restore(10).model["w"], state(10)["w"])
        with pytest.raises(ac.CheckpointNotFoundError, match="step 7"):
            mgr.restore(7)


def test_async_save_snapshots_before_returning(tmp_path):
    w = np.zeros(4, np.float32)
    with ac.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": w})
        w += 1
    np.testing.assert_array_equal(ac.CheckpointManager(tmp_path).restore().model["w"], 0)


@pytest.mark.parametrize("async_save", [True, False])
def test_keep_last_and_keep_every(tmp_path, async_save):
    with ac.CheckpointManager(tmp_path, keep_last=2, keep_every=300, async_save=async_save) as mgr:
        for step in range(100, 1100, 100):
            mgr.save(step, state(step))
    assert ac.CheckpointManager(tmp_path).steps() == [300, 600, 900, 1000]
    assert not [e for e in scan(tmp_path) if e.status == "temporary"]


class FailingWrites(fsops.FileSystem):
    """Fails every safetensors write into a directory whose name contains ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def write_safetensors(self, path, specs, metadata, **kw):
        if self.marker in str(path):
            raise OSError(28, "No space left on device")
        super().write_safetensors(path, specs, metadata, **kw)


@pytest.mark.parametrize("async_save", [True, False])
def test_retention_never_runs_before_the_new_step_commits(tmp_path, async_save):
    mgr = ac.CheckpointManager(tmp_path, keep_last=1, async_save=async_save)
    mgr.save(1, state(1))
    mgr.wait()
    with fsops.use(FailingWrites("step_00000002")), pytest.raises(ac.CheckpointWriteError):
        mgr.save(2, state(2))
        mgr.wait()
    assert mgr.steps() == [1]
    assert not [e for e in scan(tmp_path) if e.status == "temporary"]
    mgr.close()


def test_incomplete_directories_and_temporaries_are_never_listed_or_restored(tmp_path):
    ac.save_checkpoint(tmp_path / "step_00000001", state(1), training_state=ac.TrainingState(1))
    ac.save_checkpoint(tmp_path / "step_00000002", state(2), training_state=ac.TrainingState(2))
    (tmp_path / "step_00000002" / "training_state.json").unlink()  # e.g. an old-style crash
    tmp = tmp_path / f".step_00000003.arrayckpt-tmp-{os.getpid()}-abc"
    ac.save_checkpoint(tmp, state(3), training_state=ac.TrainingState(3))
    (tmp_path / "step_0000004").mkdir()  # not the 8-digit name: not a step
    (tmp_path / "notes.txt").write_text("the user's")
    mgr = ac.CheckpointManager(tmp_path)
    assert mgr.steps() == [1]
    assert mgr.restore().training_state.step == 1
    statuses = {e.name: e.status for e in scan(tmp_path)}
    assert statuses == {
        "step_00000001": "complete",
        "step_00000002": "incomplete",
        tmp.name: "temporary",
    }
    assert (tmp_path / "notes.txt").exists()


def test_stale_temporaries_are_cleaned_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".step_00000001.arrayckpt-tmp-{dead_pid()}-aaaa"
    live = tmp_path / f".step_00000002.arrayckpt-tmp-{os.getpid()}-bbbb"
    old_live = tmp_path / f".step_00000003.arrayckpt-tmp-{os.getppid()}-cccc"
    inside = tmp_path / "step_00000009"
    ac.save_checkpoint(inside, state(9), training_state=ac.TrainingState(9))
    rank_tmp = inside / f".rank_0.arrayckpt-tmp-{dead_pid()}-dddd"
    for d in (dead, live, old_live, rank_tmp):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old_live, (an_hour_ago, an_hour_ago))
    ac.CheckpointManager(tmp_path, stale_after_s=600)
    assert not dead.exists() and not old_live.exists() and not rank_tmp.exists()
    assert live.exists() and inside.exists()


def test_an_interrupted_replace_is_recovered_not_deleted(tmp_path):
    old = tmp_path / f".step_00000005.arrayckpt-old-{dead_pid()}-eeee"
    ac.save_checkpoint(old, state(5), training_state=ac.TrainingState(5))
    mgr = ac.CheckpointManager(tmp_path)
    assert not old.exists() and mgr.steps() == [5]


def test_temporary_owner_parses_the_pid():
    assert temporary_owner(".step_00000001.arrayckpt-tmp-4242-0123456789ab") == 4242
    assert temporary_owner(".x.arrayckpt-old-17-ff") == 17
    assert temporary_owner(".x.arrayckpt-tmp-notapid") is None


class FailingRemove(fsops.FileSystem):
    def remove_tree(self, path):
        raise OSError(5, "Input/output error")


def test_a_failed_deletion_leaves_no_step_that_looks_complete(tmp_path, caplog):
    mgr = ac.CheckpointManager(tmp_path, keep_last=1, async_save=False)
    mgr.save(1, state(1))
    with fsops.use(FailingRemove()), caplog.at_level(logging.WARNING, "arrayckpt"):
        mgr.save(2, state(2))
    assert "could not delete step 1" in caplog.text
    assert mgr.steps() == [2]
    assert [e.status for e in scan(tmp_path)] == ["complete", "temporary"]
    ac.CheckpointManager(tmp_path)  # our own pid is alive: the next run's cleanup would do it
    assert len(scan(tmp_path)) == 2
    ac.CheckpointManager(tmp_path, stale_after_s=-1)
    assert [e.name for e in scan(tmp_path)] == ["step_00000002"]


def test_a_corrupt_latest_step_falls_back_to_the_previous(tmp_path, caplog):
    mgr = ac.CheckpointManager(tmp_path, async_save=False)
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    path = tmp_path / "step_00000002" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "arrayckpt"):
        assert mgr.restore().training_state.step == 1
    assert "step 2 is corrupt" in caplog.text
    with pytest.raises(ac.CorruptCheckpointError):
        mgr.restore(2)


def test_sharded_steps_are_complete_only_with_every_rank(tmp_path):
    step = tmp_path / "step_00000010"
    step.mkdir()
    (step / "sharding_meta.json").write_text(
        json.dumps({"version": 2, "world_size": 2, "strategy": "Replicated", "split_dims": {}})
    )
    ac.save_checkpoint(step / "rank_0", state(10), training_state=ac.TrainingState(10))
    assert ac.CheckpointManager(tmp_path).steps() == []
    ac.save_checkpoint(step / "rank_1", state(10), training_state=ac.TrainingState(10))
    assert ac.CheckpointManager(tmp_path).steps() == [10]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ac.InvalidInputError, match="keep_last"):
        ac.CheckpointManager(tmp_path, keep_last=0)
    mgr = ac.CheckpointManager(tmp_path)
    with pytest.raises(ac.InvalidInputError, match=r"training_state\.step is 3"):
        mgr.save(4, state(4), training_state=ac.TrainingState(step=3))
    with pytest.raises(ac.InvalidInputError, match="non-negative int"):
        mgr.save(-1, state(1))
    mgr.close()
    with pytest.raises(ac.InvalidInputError, match="closed"):
        mgr.save(1, state(1))


CRASHING_CHILD = """
import os, sys
import numpy as np
import arrayckpt as ac
from arrayckpt import fsops

class DieWhileWritingStep4(fsops.FileSystem):
    def write_bytes(self, path, data):  # training_state.json: the last file of a step
        if "step_00000004" in str(path):
            os._exit(9)
        super().write_bytes(path, data)

with fsops.use(DieWhileWritingStep4()):
    mgr = ac.CheckpointManager(sys.argv[1], keep_last=2)
    for step in range(1, 6):
        mgr.save(step, {"w": np.full(2, step, np.float32)}, training_state=ac.TrainingState(step))
    mgr.close()
"""


def test_resume_after_a_crash_is_one_call(tmp_path):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASHING_CHILD), str(tmp_path)], env=env, timeout=120
    )
    assert proc.returncode == 9
    assert any(e.status == "temporary" for e in scan(tmp_path))  # the crash left debris
    mgr = ac.CheckpointManager(tmp_path)
    ckpt = mgr.restore()
    assert ckpt is not None and ckpt.training_state.step == 3
    assert [e.name for e in scan(tmp_path)] == ["step_00000002", "step_00000003"]


def test_of_several_aside_copies_the_newest_complete_one_is_renamed_back(tmp_path):
    pid = dead_pid()
    for step, tag in ((4, "aaaa"), (5, "bbbb"), (3, "cccc")):
        ac.save_checkpoint(
            tmp_path / f".step_00000005.arrayckpt-old-{pid}-{tag}",
            state(step),
            training_state=ac.TrainingState(step),
        )
    broken = tmp_path / f".step_00000005.arrayckpt-old-{pid}-ffff"
    broken.mkdir()  # incomplete: never renamed back
    mgr = ac.CheckpointManager(tmp_path)
    assert [e.name for e in scan(tmp_path)] == ["step_00000005"]
    assert mgr.restore().model["w"][0] == 5


# Step semantics: steps only move forward, unless a rollback is asked for.


def _run(root, steps, keep_last=3, **save_kw):
    with ac.CheckpointManager(root, keep_last=keep_last) as mgr:
        for step in steps:
            mgr.save(step, state(step), **save_kw)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_step_at_or_below_the_newest_is_refused_naming_the_newer_steps(tmp_path, async_save):
    _run(tmp_path, range(100, 301, 50))
    mgr = ac.CheckpointManager(tmp_path, keep_last=3, async_save=async_save)
    for step, newer in ((150, r"\[200, 250, 300\]"), (300, r"\[300\]")):
        with pytest.raises(ac.InvalidInputError, match=newer + ".*rollback=True"):
            mgr.save(step, state(step))
    assert mgr.steps() == [200, 250, 300]
    assert mgr.restore().model["w"][0] == 300
    mgr.save(301, state(301))
    with pytest.raises(ac.InvalidInputError, match="301"):  # refused while still in flight
        mgr.save(301, state(301))
    mgr.close()
    assert ac.CheckpointManager(tmp_path).steps() == [250, 300, 301]


def test_keep_last_keeps_exactly_n_after_a_rollback_into_an_old_root(tmp_path):
    _run(tmp_path, range(100, 301, 50))  # an earlier run: [200, 250, 300] remain
    with ac.CheckpointManager(tmp_path, keep_last=3) as mgr:
        mgr.save(150, {"w": np.full(3, -150, np.float32)}, rollback=True)
        assert mgr.restore().model["w"][0] == -150  # this run's, not the earlier run's 300
        for step in (200, 250, 300, 350):
            mgr.save(step, {"w": np.full(3, -step, np.float32)})
    mgr = ac.CheckpointManager(tmp_path)
    assert mgr.steps() == [250, 300, 350]
    assert [mgr.restore(s).model["w"][0] for s in mgr.steps()] == [-250, -300, -350]


@pytest.mark.parametrize("async_save", [True, False])
def test_rolling_back_after_a_loss_spike_replaces_the_step_and_deletes_newer(tmp_path, async_save):
    _run(tmp_path, range(100, 501, 100), keep_last=None)
    with ac.CheckpointManager(tmp_path, async_save=async_save) as mgr:
        good = mgr.restore(300)
        mgr.save(300, {"w": good.model["w"] * 2}, rollback=True)
        assert mgr.steps() == [100, 200, 300]
        assert mgr.restore().model["w"][0] == 600


def test_a_failed_save_does_not_block_its_step(tmp_path):
    from async_helpers import FailingFS

    mgr = ac.CheckpointManager(tmp_path)
    with fsops.use(FailingFS()):
        mgr.save(5, state(5))
        with pytest.raises(ac.CheckpointWriteError):
            mgr.wait()
    mgr.save(5, state(5)).result()
    mgr.close()
    assert ac.CheckpointManager(tmp_path).steps() == [5]


def test_a_step_given_as_a_string_is_an_invalid_input_error(tmp_path):
    with ac.CheckpointManager(tmp_path) as mgr:
        mgr.save(100, state(100))
        with pytest.raises(ac.InvalidInputError, match=r"'100'.*pass e\.g\. 100"):
            mgr.restore("100")
        with pytest.raises(ac.InvalidInputError, match="non-negative int"):
            mgr.save("200", state(200))
        with pytest.raises(ac.InvalidInputError, match="non-negative int"):
            mgr.restore(True)


def test_restore_takes_explicit_keywords_and_reads_keys_from_a_generator(tmp_path):
    import inspect

    params = inspect.signature(ac.CheckpointManager.restore).parameters
    assert {"xp", "device", "into", "keys", "verify", "mmap", "optimizer"} <= set(params)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
    with ac.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": np.ones(2, np.float32), "b": np.zeros(1, np.float32)})
        assert list(mgr.restore(keys=(k for k in ["w"])).model) == ["w"]
        assert list(mgr.restore(1, keys=iter(["b"])).model) == ["b"]


def test_the_demo_run_twice_into_the_same_dir_resumes_from_its_own_steps(tmp_path, capsys):
    from arrayckpt import demo

    demo.run(str(tmp_path), steps=200)
    first = capsys.readouterr().out
    demo.run(str(tmp_path), steps=200)
    second = capsys.readouterr().out
    assert "earlier run" not in first and "earlier run" in second
    for out in (first, second):
        assert "resumed from step_00000150" in out
    assert ac.CheckpointManager(tmp_path).steps() == [100, 150, 200]
