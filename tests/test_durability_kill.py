"""Suite 3: kill -9 at a random moment of a save loop never leaves a mix of steps.

A child saves in a loop (every array filled with its step number); the parent SIGKILLs
it at a random moment. The checkpoint must load, every array must equal the step its
training state names, that step must be the last one reported committed or the one in
flight, and the next save must succeed and remove what the killed one left.
"""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

try:
    from . import faults
except ImportError:
    import faults

SCALE = 256  # 128 KiB per large array: most kills land inside a save
TRIALS = {"sync": faults.scaled(30, 300), "async": faults.scaled(10, 100)}


def kill_trial(where: Path, mode: str, rng: random.Random, sig: int = signal.SIGKILL) -> bool:
    """One trial; returns whether the kill left a temporary directory (was mid-save)."""
    target = where / "ckpt"
    child = faults.start_child("save-loop", target, mode, SCALE)
    try:
        first = child.stdout.readline()
        assert first.startswith("committed"), first + child.stderr.read()
        time.sleep(rng.uniform(0, 0.06))
        child.send_signal(sig)
        out, err = faults.rest_of_output(child, 60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -sig, (child.returncode, err)
    last = faults.committed(first + out)
    step = faults.loaded_step(target, SCALE)
    assert step in (last, last + 1), f"loaded step {step}, last committed {last}"
    mid_save = bool(faults.debris(where))
    faults.Saver("sync", SCALE).save(target, 90_000)
    faults.assert_checkpoint(target, 90_000, SCALE)
    assert faults.debris(where) == [], "the next save did not remove the killed save's debris"
    return mid_save


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_save_loop(tmp_path: Path, mode: str) -> None:
    def trial(n: int) -> bool:
        return kill_trial(tmp_path / str(n), mode, random.Random(f"kill-{mode}-{n}"))

    with ThreadPoolExecutor(2) as pool:  # the parent mostly waits: two trials at a time
        mid = sum(pool.map(trial, range(TRIALS[mode])))
    faults.report("kill -9", mode=mode, trials=TRIALS[mode], killed_mid_save=mid, failures=0)
    # Most kills must land inside a save, or the loop tests little.
    assert mid >= TRIALS[mode] // 3, f"only {mid} of {TRIALS[mode]} kills landed mid-save"
