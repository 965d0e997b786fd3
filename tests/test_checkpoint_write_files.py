"""`write_files` writes model and optimizer at once; either failing fails the save cleanly."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import fsops


class FailOneFS(fsops.FileSystem):
    """Fails the write of one file name; records the threads that wrote."""

    def __init__(self, failing: str) -> None:
        self.failing = failing
        self.threads: set[str] = set()

    def write_safetensors(self, path: Path, specs: Any, metadata: Any, **kw: Any) -> None:
        self.threads.add(threading.current_thread().name)
        if path.name == self.failing:
            raise OSError(5, f"I/O error writing {path.name} (injected)")
        super().write_safetensors(path, specs, metadata, **kw)


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.safetensors"])
def test_a_failed_file_fails_the_save_and_keeps_the_previous_checkpoint(
    tmp_path: Path, failing: str
) -> None:
    target = tmp_path / "c"
    ac.save_checkpoint(target, {"w": np.zeros(3)}, {"m": np.zeros(3)}, ac.TrainingState(1))
    with fsops.use(FailOneFS(failing)), pytest.raises(ac.CheckpointWriteError, match=failing):
        ac.save_checkpoint(target, {"w": np.ones(3)}, {"m": np.ones(3)}, ac.TrainingState(2))
    assert ac.load_checkpoint(target).training_state.step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_model_and_optimizer_files_are_written_by_two_threads(tmp_path: Path) -> None:
    fs = FailOneFS(failing="")
    with fsops.use(fs):
        ac.save_checkpoint(tmp_path / "c", {"w": np.ones(3)}, {"m": np.full(3, 2.0)})
    assert len(fs.threads) == 2
    got = ac.load_checkpoint(tmp_path / "c")
    np.testing.assert_array_equal(got.optimizer["m"], np.full(3, 2.0))
