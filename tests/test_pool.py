"""The helper threads: results and errors come back, and they keep working at exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arrayckpt import pool


def _idle(background: bool) -> list[object]:
    """The threads of the idle spares of one kind."""
    return [spare.thread for spare in pool._spares.get(background, [])]


def test_submit_returns_results_and_errors() -> None:
    ok = pool.executor().submit(lambda a, b: a + b, 2, 3)
    bad = pool.executor().submit(lambda: 1 / 0)
    assert ok.result(timeout=30) == 5
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=30)


def test_in_own_thread_runs_on_its_own_named_thread() -> None:
    import threading

    future = pool.in_own_thread(lambda: threading.current_thread().name, "arrayckpt-test")
    assert future.result(timeout=30) == "arrayckpt-test"


def test_spare_threads_are_reused_not_dropped() -> None:
    """A dropped Thread object runs a weakref callback that can swallow a Ctrl-C
    (`pool.on_spare_thread`): one job after another runs on the same thread object."""
    import threading
    import time

    first = pool.in_own_thread(threading.current_thread, "a").result(timeout=30)
    deadline = time.monotonic() + 30
    while first not in _idle(False) and time.monotonic() < deadline:
        time.sleep(0.001)  # the thread lists itself as idle right after its job
    second = pool.in_own_thread(threading.current_thread, "b").result(timeout=30)
    assert second is first and second.is_alive()
    both = [pool.in_own_thread(lambda: time.sleep(0.2) or threading.current_thread(), "c")]
    both.append(pool.in_own_thread(threading.current_thread, "d"))
    assert both[0].result(timeout=30) is not both[1].result(timeout=30)  # one job per thread


def test_a_spare_made_a_background_thread_serves_background_jobs_only() -> None:
    """A job that lowered its spare thread (a save's background work) leaves it listed
    with the background ones: a caller's own jobs never run on a lowered thread."""
    import threading
    import time

    from arrayckpt import priority

    thread = pool.in_own_thread(priority.background(threading.current_thread), "bg").result(
        timeout=30
    )
    deadline = time.monotonic() + 30
    while thread not in _idle(True) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert thread in _idle(True)
    assert thread not in _idle(False)
    mine = pool.in_own_thread(lambda: priority.in_background(), "fg").result(timeout=30)
    assert mine is False


def test_the_pool_still_runs_jobs_while_the_interpreter_exits(tmp_path: Path) -> None:
    # concurrent.futures refuses new work at exit; checkpoint writes still run then.
    script = tmp_path / "s.py"
    script.write_text(
        "import atexit\n"
        "from arrayckpt import pool\n"
        "atexit.register(lambda: print(pool.executor().submit(lambda: 42).result(30)))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"


def test_without_new_threads_jobs_run_on_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    # Python 3.12 refuses to start threads while the interpreter exits.
    import threading

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    helpers = pool.HelperPool(2)
    assert helpers.size == 0
    me = threading.current_thread().name
    assert helpers.submit(lambda: threading.current_thread().name).result(0) == me
    monkeypatch.setattr(pool, "_spares", {})
    assert pool.on_spare_thread(lambda: 1, "x") is None
    assert pool.in_own_thread(lambda: threading.current_thread().name, "x").result(0) == me
