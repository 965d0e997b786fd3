"""The shared writer thread: one thread for everyone, and what happens at interpreter exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import writer

ROOT = Path(__file__).resolve().parent.parent


def _run_script(body: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter that imports arrayckpt from this checkout."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_every_checkpointer_shares_one_writer_thread_in_submission_order(tmp_path: Path) -> None:
    seen: list[tuple[int, str]] = []
    gate = threading.Event()

    def job(name: str) -> str:
        gate.wait(timeout=30)
        seen.append((threading.get_ident(), threading.current_thread().name))
        return name

    a, b = ac.AsyncCheckpointer(), ac.AsyncCheckpointer()
    x = {"x": np.zeros(2)}
    futures = [
        a.save(tmp_path / "a", x, commit=lambda _: job("a1")),
        b.save(tmp_path / "b", x, commit=lambda _: job("b1")),
    ]
    futures.append(writer.submit(lambda: job("w"), "w"))
    gate.set()
    assert [f.result() for f in futures] == ["a1", "b1", "w"]
    assert len({ident for ident, _ in seen}) == 1
    assert seen[0][1] == "arrayckpt-writer"
    assert seen[0][0] != threading.get_ident()
    a.close()
    b.close()


def test_write_future_counts_result_and_exception_as_observed() -> None:
    future = writer.submit(lambda: 1 / 0, "divide")
    assert writer._writer.drain(30)
    assert not future.observed
    assert isinstance(future.exception(), ZeroDivisionError)
    assert future.observed


def test_pending_writes_complete_when_the_interpreter_exits(tmp_path: Path) -> None:
    result = _run_script(
        """
        import sys, time
        import numpy as np
        import arrayckpt as ac
        from arrayckpt import fsops

        class SlowFS(fsops.FileSystem):
            def write_safetensors(self, path, specs, metadata, **kw):
                time.sleep(1.0)  # the script's last line runs long before the write ends
                super().write_safetensors(path, specs, metadata, **kw)

        fsops._current = SlowFS()
        ckpt = ac.AsyncCheckpointer()
        w = np.arange(1 << 20, dtype=np.float32)
        ckpt.save(sys.argv[1] + "/ckpt", {"w": w}, {"m": w * 2}, ac.TrainingState(step=7))
        print("script ends")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    got = ac.load_checkpoint(tmp_path / "ckpt")
    np.testing.assert_array_equal(got.model["w"], np.arange(1 << 20, dtype=np.float32))
    np.testing.assert_array_equal(got.optimizer["m"], 2 * np.arange(1 << 20, dtype=np.float32))
    assert got.training_state.step == 7


_FAILING_SCRIPT = """
import sys
import numpy as np
import arrayckpt as ac
from arrayckpt import fsops

class FullDisk(fsops.FileSystem):
    def write_safetensors(self, path, specs, metadata, **kw):
        raise OSError(28, "No space left on device (injected)")

fsops._current = FullDisk()
ckpt = ac.AsyncCheckpointer()
ckpt.save(sys.argv[1] + "/ckpt", {"w": np.ones(4, np.float32)})
"""


def test_an_unobserved_failure_is_reported_on_stderr_at_exit(tmp_path: Path) -> None:
    result = _run_script(_FAILING_SCRIPT, tmp_path)
    assert "checkpoint write failed and nobody waited for it" in result.stderr
    assert "No space left on device" in result.stderr
    assert str(tmp_path / "ckpt") in result.stderr
    assert result.returncode == 0  # documented: the report does not change the exit status
    assert not (tmp_path / "ckpt").exists()


def test_an_observed_failure_is_not_reported_again_at_exit(tmp_path: Path) -> None:
    result = _run_script(
        _FAILING_SCRIPT
        + """
try:
    ckpt.wait()
except ac.CheckpointWriteError:
    print("caught")
""",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "caught"
    assert "nobody waited" not in result.stderr


def test_exit_gives_up_after_the_timeout_instead_of_hanging(tmp_path: Path) -> None:
    result = _run_script(
        """
        import sys, threading
        import numpy as np
        import arrayckpt as ac
        from arrayckpt import fsops

        class StuckFS(fsops.FileSystem):  # a hung network mount
            def write_safetensors(self, path, specs, metadata, **kw):
                threading.Event().wait()

        fsops._current = StuckFS()
        ac.AsyncCheckpointer().save(sys.argv[1] + "/ckpt", {"w": np.ones(4, np.float32)})
        """,
        tmp_path,
        ARRAYCKPT_EXIT_TIMEOUT="1",
    )
    assert "gave up after 1 s waiting for pending checkpoint writes" in result.stderr
    assert str(tmp_path / "ckpt") in result.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_does_not_wait_for_its_parents_writes(tmp_path: Path) -> None:
    result = _run_script(
        """
        import os, sys, threading
        import numpy as np
        import arrayckpt as ac
        from arrayckpt import fsops, writer

        gate = threading.Event()

        class GatedFS(fsops.FileSystem):
            def write_safetensors(self, path, specs, metadata, **kw):
                gate.wait()
                super().write_safetensors(path, specs, metadata, **kw)

        fsops._current = GatedFS()
        ckpt = ac.AsyncCheckpointer()
        ckpt.save(sys.argv[1] + "/ckpt", {"w": np.ones(4, np.float32)})
        pid = os.fork()
        if pid == 0:
            os._exit(0 if writer._writer.drain(0.5) else 3)
        _, status = os.waitpid(pid, 0)
        gate.set()
        ckpt.close()
        print("child", os.waitstatus_to_exitcode(status))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0"
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
