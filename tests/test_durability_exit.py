"""Suite 6: how a process leaves while a save is pending, each in a subprocess with a timeout.

| scenario                               | outcome (asserted here)                          |
|----------------------------------------|--------------------------------------------------|
| pending async save at interpreter exit | completes before exit; exit status 0             |
| failing save nobody waited for         | reported on stderr at exit; exit status 0        |
| Ctrl-C (KeyboardInterrupt) during save | the pending save completes; killed by SIGINT    |
| SIGTERM during a save loop             | dies at once (-15); checkpoint complete          |
| os._exit during a save                 | dies at once; previous checkpoint intact         |
| storage call that never returns        | exit gives up after ARRAYCKPT_EXIT_TIMEOUT       |
|                                        | (default 600 s) and says so on stderr; status 0  |
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import arrayckpt as ac

try:
    from . import faults
except ImportError:
    import faults

TIMEOUT = 120  # seconds any one child may take before the test fails (never reached)


def run(*args: object, timeout: float = TIMEOUT, **env: str):
    child = faults.start_child(*args, env=faults.child_env(**env))
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return child.returncode, out, err


def test_pending_save_completes_at_exit(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    code, out, err = run("pending-at-exit", target, 4096)  # 2 MiB arrays: still writing
    assert (code, out.strip()) == (0, "queued"), err
    faults.assert_checkpoint(target, 1, 4096)
    assert faults.debris(tmp_path) == []
    assert err == ""


def test_failing_save_nobody_waited_for_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "ckpt"
    code, _out, err = run("failing-unobserved", target)
    assert code == 0, err  # documented: the exit status is not changed
    assert "checkpoint write failed and nobody waited for it" in err
    assert str(target) in err
    assert "CheckpointWriteError" in err


def test_keyboard_interrupt_during_save(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    code, _out, err = run("interrupt-during-save", target, 4096)
    # Python ends on an uncaught KeyboardInterrupt by re-raising SIGINT on itself.
    assert code == -signal.SIGINT and "KeyboardInterrupt" in err, (code, err)
    faults.assert_checkpoint(target, 1, 4096)
    assert faults.debris(tmp_path) == []


def test_sigterm_during_save_loop(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    child = faults.start_child("save-loop", target, "async", 256)
    try:
        first = child.stdout.readline()
        time.sleep(0.03)
        child.send_signal(signal.SIGTERM)
        out, err = faults.rest_of_output(child, TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGTERM, err
    last = faults.committed(first + out)
    assert faults.loaded_step(target, 256) in (last, last + 1)


def test_os_exit_during_save(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    code, _out, err = run("exit-during-save", target, 256)
    assert code == 3, err
    faults.assert_checkpoint(target, 1)
    assert faults.debris(tmp_path) != [], "the save was not in progress at os._exit"
    ac.save_checkpoint(target, faults.model_state(5))  # the next save tidies up
    assert faults.debris(tmp_path) == []


def test_stuck_storage_does_not_hang_exit(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    started = time.monotonic()
    code, out, err = run("stuck-storage", target, timeout=60, ARRAYCKPT_EXIT_TIMEOUT="1")
    assert out.strip() == "stuck"
    assert code == 0, err
    assert "gave up after 1 s waiting for pending checkpoint writes" in err
    assert str(target) in err
    assert time.monotonic() - started < 60
    faults.assert_checkpoint(target, 1)  # the stuck save never committed
