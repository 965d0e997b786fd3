"""Resident memory of this process, for the tests that bound it (Linux ``/proc``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
#: Generous: the shared CI machine is slow; a hang never ends.
CHILD_TIMEOUT_S = 300

#: Skips a test on a system without ``/proc/self/clear_refs`` (the peak-RSS reset).
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="measures RSS through Linux /proc (statm, status, clear_refs)",
)


def rss() -> int:
    """Resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start the peak (VmHWM) over from the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """The most bytes resident since the last `reset_peak` (or since the process began)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("/proc/self/status has no VmHWM line")


def run_memory_child(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = CHILD_TIMEOUT_S
) -> str:
    """Run ``memory_child.py ARGS`` in a fresh process (``env`` added to this one's) and
    return what it printed; a failure or a hang (``timeout_s``) fails the test, with the
    child's output."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(TESTS.parent)}
    try:
        done = subprocess.run(
            [sys.executable, str(TESTS / "memory_child.py"), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=full_env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"memory_child.py {' '.join(args)} hung for {timeout_s} s")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
