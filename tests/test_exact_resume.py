"""Exact resume: a run SIGKILLed twice and resumed each time from its latest checkpoint
logs the same losses and learning rates, bit for bit, and ends with the same weights as a
run never interrupted (AdamW with weight-decay groups, warmup + cosine schedule, shuffled
data, dropout drawing from the global generators)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac

CHILD = Path(__file__).with_name("resume_child.py")
STEPS = 40
ROOT = Path(__file__).resolve().parent.parent


def _start(kind: str, root: Path, pause: int | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(CHILD), kind, str(root), str(STEPS)]
    return subprocess.Popen(args + ([str(pause)] if pause else []), env=env)


def _kill_when_paused(proc: subprocess.Popen[bytes], root: Path) -> None:
    """SIGKILL the child once it pauses after its step (it may be mid-save)."""
    deadline = time.monotonic() + 300
    while not (root / "paused").exists():
        assert proc.poll() is None, f"the run exited with {proc.returncode} before pausing"
        assert time.monotonic() < deadline, "the run never reached its pause step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (root / "paused").unlink()


def _log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_killed_twice_resumes_bit_identically(kind: str, tmp_path: Path) -> None:
    if kind == "torch":
        pytest.importorskip("torch", reason="torch is not installed")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    assert _start(kind, whole).wait(timeout=600) == 0
    for pause in (14, 27):
        _kill_when_paused(_start(kind, killed, pause), killed)
    assert _start(kind, killed).wait(timeout=600) == 0

    reference = {r["step"]: r for r in _log(whole)}
    assert sorted(reference) == list(range(1, STEPS + 1))
    records = _log(killed)
    resumes = [r["resumed_from"] for r in records if "resumed_from" in r]
    assert len(resumes) == 2 and 0 < resumes[0] <= 14 and 14 < resumes[1] <= 27, resumes
    steps = [r for r in records if "step" in r]
    assert len(steps) > STEPS  # steps after each resumed checkpoint ran twice
    for r in steps:
        assert (r["loss"], r["lr"]) == (reference[r["step"]]["loss"], reference[r["step"]]["lr"]), r
    assert {r["step"] for r in steps} == set(reference)

    a, b = ac.load_checkpoint(whole / "final").model, ac.load_checkpoint(killed / "final").model
    assert a.keys() == b.keys()
    for name in a:
        assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name
