"""The atomic-commit promises: whole replacement, refusal of foreign dirs, no debris on failure."""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from strategies import assert_same_array

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.commit import commit_directory
from arrayckpt.fsops import FileSystem
from arrayckpt.layout import (
    MODEL_FILE,
    OLD_MARKER,
    OPTIMIZER_FILE,
    TEMP_MARKER,
    TRAINING_STATE_FILE,
)


class RecordingFS(FileSystem):
    """The real file system, logging every step and failing the ``fail_at``-th ``method`` call."""

    def __init__(
        self,
        fail: str | None = None,
        fail_at: int = 1,
        exc: BaseException | None = None,
        no_exchange: bool = False,
    ) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail, self.fail_at, self.no_exchange = fail, fail_at, no_exchange
        self.exc = exc if exc is not None else OSError(errno.EIO, "injected I/O error")
        self.counts: dict[str, int] = {}

    def _step(self, method: str, *paths: Path) -> None:
        self.calls.append((method, " -> ".join(Path(p).name for p in paths)))
        self.counts[method] = self.counts.get(method, 0) + 1
        if method == self.fail and self.counts[method] == self.fail_at:
            raise self.exc

    def makedirs(self, path: Path) -> None:
        self._step("makedirs", path)
        super().makedirs(path)

    def mkdir(self, path: Path) -> None:
        self._step("mkdir", path)
        super().mkdir(path)

    def write_safetensors(
        self, path: Path, specs: Mapping[str, Any], metadata: Mapping[str, str], **kw: Any
    ) -> None:
        self._step("write_safetensors", path)
        super().write_safetensors(path, specs, metadata, **kw)

    def write_bytes(self, path: Path, data: bytes) -> None:
        self._step("write_bytes", path)
        super().write_bytes(path, data)

    def fsync_file(self, path: Path) -> None:
        self._step("fsync_file", path)
        super().fsync_file(path)

    def fsync_dir(self, path: Path) -> None:
        self._step("fsync_dir", path)
        super().fsync_dir(path)

    def rename(self, src: Path, dst: Path) -> None:
        self._step("rename", src, dst)
        super().rename(src, dst)

    def exchange(self, a: Path, b: Path) -> None:
        if self.no_exchange:
            self.calls.append(("exchange", "unsupported"))
            raise NotImplementedError("no renameat2 here")
        self._step("exchange", a, b)
        super().exchange(a, b)

    def remove_tree(self, path: Path) -> None:
        self._step("remove_tree", path)
        super().remove_tree(path)

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


def debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if TEMP_MARKER in p.name or OLD_MARKER in p.name)


OLD: dict[str, np.ndarray] = {"w": np.arange(4, dtype=np.float32)}
OLD_OPT: dict[str, np.ndarray] = {"m": np.ones(2, np.float64)}
NEW: dict[str, np.ndarray] = {"w": np.full(4, 7, np.float32), "b": np.zeros(2, np.int8)}


def save_old(path: Path) -> None:
    ac.save_checkpoint(path, OLD, OLD_OPT, ac.TrainingState(step=1))


def assert_old(path: Path) -> None:
    model, opt, ts = ac.load_checkpoint(path)
    assert set(model) == {"w"} and opt is not None and ts.step == 1
    assert_same_array(model["w"], OLD["w"])
    assert_same_array(opt["m"], OLD_OPT["m"])
    assert sorted(os.listdir(path)) == [MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE]


def assert_new(path: Path) -> None:
    model, opt, ts = ac.load_checkpoint(path)
    assert set(model) == {"w", "b"} and opt is None and ts.step == 2
    assert_same_array(model["w"], NEW["w"])
    assert sorted(os.listdir(path)) == [MODEL_FILE, TRAINING_STATE_FILE]


def save_new(path: Path) -> Path:
    return ac.save_checkpoint(path, NEW, None, ac.TrainingState(step=2))


# ------------------------------------------------------------------------------- success


def test_new_directory(ckpt_dir: Path) -> None:
    assert save_new(ckpt_dir) == ckpt_dir.absolute()
    assert_new(ckpt_dir)
    assert debris(ckpt_dir.parent) == []


def test_missing_parents_are_created(tmp_path: Path) -> None:
    save_new(tmp_path / "a" / "b" / "c")
    assert_new(tmp_path / "a" / "b" / "c")


def test_existing_empty_directory(ckpt_dir: Path) -> None:
    ckpt_dir.mkdir()
    save_new(ckpt_dir)
    assert_new(ckpt_dir)
    assert debris(ckpt_dir.parent) == []


def test_overwrite_replaces_whole_checkpoint(ckpt_dir: Path) -> None:
    save_old(ckpt_dir)
    save_new(ckpt_dir)
    assert_new(ckpt_dir)  # the old optimizer.safetensors is gone, not mixed in
    assert debris(ckpt_dir.parent) == []


def test_overwrite_without_exchange_uses_the_fallback(ckpt_dir: Path) -> None:
    save_old(ckpt_dir)
    fs = RecordingFS(no_exchange=True)
    with fsops.use(fs):
        save_new(ckpt_dir)
    assert_new(ckpt_dir)
    assert debris(ckpt_dir.parent) == []
    assert ("exchange", "unsupported") in fs.calls
    assert fs.methods().count("rename") == 2  # old aside, new into place


@pytest.mark.parametrize("exists", [True, False])
def test_saving_through_a_symlink_replaces_its_target(tmp_path: Path, exists: bool) -> None:
    real = tmp_path / "step_1"
    if exists:
        save_old(real)
    (tmp_path / "latest").symlink_to("step_1", target_is_directory=True)
    assert save_new(tmp_path / "latest") == real
    assert (tmp_path / "latest").is_symlink()
    assert_new(real)
    assert debris(tmp_path) == []


def test_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_old(Path("rel"))
    save_new(Path("rel"))
    assert_new(tmp_path / "rel")


def test_order_of_durable_steps(ckpt_dir: Path) -> None:
    """Each file written then fsynced; the directory fsynced before the swap; parent after."""
    save_old(ckpt_dir)
    fs = RecordingFS()
    with fsops.use(fs):
        ac.save_checkpoint(ckpt_dir, NEW, OLD_OPT, ac.TrainingState(step=2))
    steps = fs.calls
    names = [m for m, _ in steps]
    for f in (MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE):
        writes = [i for i, (m, p) in enumerate(steps) if m.startswith("write") and p == f]
        syncs = [i for i, (m, p) in enumerate(steps) if m == "fsync_file" and p == f]
        assert len(writes) == 1 and len(syncs) == 1 and writes[0] < syncs[0], steps
    swap = names.index("exchange")
    dir_syncs = [i for i, m in enumerate(names) if m == "fsync_dir"]
    assert all(i < swap for i in [j for j, m in enumerate(names) if m == "fsync_file"])
    assert dir_syncs[0] < swap < dir_syncs[1], steps
    assert steps[dir_syncs[0]][1].startswith(f".{ckpt_dir.name}{TEMP_MARKER}")
    assert steps[dir_syncs[1]][1] == ckpt_dir.parent.name
    assert names[-1] == "remove_tree"  # the old checkpoint, after the commit is durable


def test_temporary_names_are_unique_hidden_siblings(ckpt_dir: Path) -> None:
    fs = RecordingFS()
    with fsops.use(fs):
        save_new(ckpt_dir)
        save_new(ckpt_dir)
    made = [p for m, p in fs.calls if m == "mkdir"]
    assert len(made) == 2 and len(set(made)) == 2
    assert all(p.startswith(f".{ckpt_dir.name}{TEMP_MARKER}{os.getpid()}-") for p in made)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("foreign", ["notes.txt", "model.safetensors.bak", "subdir/"])
def test_refuses_to_replace_a_directory_with_foreign_files(ckpt_dir: Path, foreign: str) -> None:
    save_old(ckpt_dir)
    if foreign.endswith("/"):
        (ckpt_dir / foreign).mkdir()
    else:
        (ckpt_dir / foreign).write_text("mine")
    with pytest.raises(ac.InvalidInputError, match="not part of a checkpoint"):
        save_new(ckpt_dir)
    assert (ckpt_dir / foreign.rstrip("/")).exists()
    assert ac.load_checkpoint(ckpt_dir).training_state.step == 1
    assert debris(ckpt_dir.parent) == []


def test_refuses_a_file_at_the_target(ckpt_dir: Path) -> None:
    ckpt_dir.write_text("precious")
    with pytest.raises(ac.InvalidInputError, match="not a directory"):
        save_new(ckpt_dir)
    assert ckpt_dir.read_text() == "precious"


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ac.CheckpointWriteError, match="cannot create"):
        save_new(tmp_path / "file" / "ckpt")


# ------------------------------------------------------------------------------ failures


def test_bad_input_leaves_previous_checkpoint(ckpt_dir: Path) -> None:
    save_old(ckpt_dir)
    with pytest.raises(ac.UnsupportedArrayError):
        ac.save_checkpoint(ckpt_dir, {"w": np.zeros(2), "x": object()})
    with pytest.raises(ac.InvalidInputError):
        ac.save_checkpoint(
            ckpt_dir,
            {"w": np.zeros(2)},
            training_state=ac.TrainingState(1, learning_rate=float("nan")),
        )
    assert_old(ckpt_dir)
    assert debris(ckpt_dir.parent) == []


_FAULTS = [
    ("mkdir", 1),
    ("write_safetensors", 1),
    ("write_safetensors", 2),
    ("write_bytes", 1),
    ("fsync_file", 1),
    ("fsync_file", 2),
    ("fsync_file", 3),
    ("fsync_dir", 1),
    ("exchange", 1),
    ("fsync_dir", 2),
]


@pytest.mark.parametrize("exists", ["old", "empty", "absent"])
@pytest.mark.parametrize(("method", "nth"), _FAULTS, ids=[f"{m}#{n}" for m, n in _FAULTS])
def test_io_failure_leaves_previous_content_and_no_debris(
    ckpt_dir: Path, method: str, nth: int, exists: str
) -> None:
    if exists == "old":
        save_old(ckpt_dir)
    elif exists == "empty":
        ckpt_dir.mkdir()
    if method == "exchange" and exists != "old":
        method = "rename"  # a new or empty target is renamed onto, not exchanged
    fs = RecordingFS(fail=method, fail_at=nth)
    with fsops.use(fs), pytest.raises(ac.CheckpointWriteError, match="injected I/O error"):
        ac.save_checkpoint(ckpt_dir, NEW, OLD_OPT, ac.TrainingState(step=2))
    # The fault was reached and its step never retried. The model and optimizer files are
    # written concurrently, so the other file's step may still run after the fault.
    calls = [c for c in fs.calls if c[0] == method]
    assert len(calls) >= nth, fs.calls
    assert calls.count(calls[nth - 1]) == 1, fs.calls
    if exists == "old":
        assert_old(ckpt_dir)
    elif exists == "empty":
        assert ckpt_dir.is_dir() and list(ckpt_dir.iterdir()) == []
    else:
        assert not ckpt_dir.exists()
    assert debris(ckpt_dir.parent) == []


@pytest.mark.parametrize("method", ["fsync_file", "fsync_dir"])
def test_failed_fsync_aborts_and_is_never_retried(ckpt_dir: Path, method: str) -> None:
    save_old(ckpt_dir)
    fs = RecordingFS(fail=method)
    with fsops.use(fs), pytest.raises(ac.CheckpointWriteError):
        save_new(ckpt_dir)
    failed = next(i for i, (m, _) in enumerate(fs.calls) if m == method)
    after = fs.calls[failed + 1 :]
    assert fs.calls[failed] not in after, fs.calls  # not retried
    # Nothing is committed after the failure (the other file's write may still finish:
    # model and optimizer files are written concurrently).
    assert not {"exchange", "rename"} & {m for m, _ in after}, fs.calls
    assert_old(ckpt_dir)


@pytest.mark.parametrize("nth", [1, 2])
def test_fallback_failure_restores_previous(ckpt_dir: Path, nth: int) -> None:
    """Without exchange: a failure moving the old aside, or the new in, restores the old."""
    save_old(ckpt_dir)
    fs = RecordingFS(fail="rename", fail_at=nth, no_exchange=True)
    with fsops.use(fs), pytest.raises(ac.CheckpointWriteError, match="injected"):
        save_new(ckpt_dir)
    assert_old(ckpt_dir)
    assert debris(ckpt_dir.parent) == []


def test_fallback_parent_fsync_failure_restores_previous(ckpt_dir: Path) -> None:
    save_old(ckpt_dir)
    fs = RecordingFS(fail="fsync_dir", fail_at=2, no_exchange=True)
    with fsops.use(fs), pytest.raises(ac.CheckpointWriteError):
        save_new(ckpt_dir)
    assert_old(ckpt_dir)
    assert debris(ckpt_dir.parent) == []


def test_interrupt_during_write_cleans_up_and_propagates(ckpt_dir: Path) -> None:
    save_old(ckpt_dir)
    fs = RecordingFS(fail="write_bytes", exc=KeyboardInterrupt())
    with fsops.use(fs), pytest.raises(KeyboardInterrupt):
        save_new(ckpt_dir)
    assert_old(ckpt_dir)
    assert debris(ckpt_dir.parent) == []


def test_failure_removing_the_old_copy_is_not_an_error(
    ckpt_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_old(ckpt_dir)
    fs = RecordingFS(fail="remove_tree")
    with fsops.use(fs):
        save_new(ckpt_dir)  # committed: the new checkpoint is in place and durable
    assert_new(ckpt_dir)
    assert "removing temporary directory" in caplog.text


def test_commit_directory_contract(tmp_path: Path) -> None:
    def fill(tmp: Path) -> None:
        assert TEMP_MARKER in tmp.name and tmp.parent == tmp_path
        (tmp / MODEL_FILE).write_bytes(b"x")

    assert commit_directory(tmp_path / "t", fill) == tmp_path / "t"
    assert os.listdir(tmp_path / "t") == [MODEL_FILE]

    def boom(tmp: Path) -> None:
        raise ValueError("bad fill")

    with pytest.raises(ac.CheckpointWriteError, match="bad fill"):
        commit_directory(tmp_path / "t", boom)
    assert os.listdir(tmp_path / "t") == [MODEL_FILE]
    assert debris(tmp_path) == []
