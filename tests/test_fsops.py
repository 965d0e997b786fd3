"""File modes: everything a save creates follows the process umask, as np.save and
torch.save do (safetensors alone leaves its files 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
    }


def expected(root: Path, mask: int) -> dict[str, int]:
    return {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in modes(root)}


def test_save_checkpoint_follows_the_umask(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "ckpt"
    ac.save_checkpoint(
        target,
        {"w": np.ones(3, np.float32)},
        {"m": np.zeros(3, np.float32)},
        ac.TrainingState(step=1),
    )
    got = modes(target)
    assert "model.safetensors" in got and "optimizer.safetensors" in got
    assert got == expected(target, umask)


def test_manager_steps_follow_the_umask(tmp_path: Path, umask: int) -> None:
    with ac.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": np.ones(3, np.float32)})
        mgr.wait()
        step = mgr.directory(1)
    assert step.is_dir()
    assert modes(step) == expected(step, umask)
