"""Resident memory of this process, for the tests that bound it (Linux ``/proc``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
