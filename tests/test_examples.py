"""The scripts in docs/examples/ run, crash, resume, and end where an uninterrupted run ends."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def start(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], expect: int = 0) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == expect, out + err
    return out


def run(script: str, *args: object, expect: int = 0) -> str:
    return finish(start(script, *args), expect)


def needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.mark.parametrize(
    ("script", "module"),
    [("numpy_train.py", "numpy"), ("torch_train.py", "torch"), ("jax_train.py", "jax")],
)
def test_crash_and_resume_ends_like_an_uninterrupted_run(tmp_path, script, module):
    needs(module)
    straight = start(script, tmp_path / "straight")  # both at once: two cores
    finish(start(script, tmp_path / "crashy", "--crash-at", 60), expect=3)
    straight_end = finish(straight).splitlines()[-1]
    resumed = run(script, tmp_path / "crashy")
    assert "resumed from step" in resumed
    assert resumed.splitlines()[-1] == straight_end  # same final loss, to the printed digit
    assert not any(p.name.startswith(".") for p in (tmp_path / "crashy").iterdir())


@pytest.mark.distributed
def test_two_process_torch_distributed_example(tmp_path):
    needs("torch")
    first = run("torch_distributed.py", tmp_path, "--steps", 40)
    assert "done at step 40: ranks agree: True" in first
    second = run("torch_distributed.py", tmp_path, "--steps", 60)
    assert "rank 0: resumed from step 40" in second and "rank 1: resumed from step 40" in second
    assert "done at step 60: ranks agree: True" in second
