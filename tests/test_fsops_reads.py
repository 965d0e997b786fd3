"""Reading only regular files, with every OS error a CheckpointError (issue 10, defects 4-6).

Each entry point runs in a child process with a timeout: before the fix a FIFO made
them wait forever for a writer, which a test in this process could not survive.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import fsops, limits
from arrayckpt.format import SafetensorsReader
from arrayckpt.layout import MODEL_FILE, SHARDING_META_FILE, TRAINING_STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 120  # generous: the shared CI machine is slow; a hang never ends


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {CHILD_TIMEOUT_S} s (a FIFO opened for reading blocks)")


def _fifo_in(directory: Path, name: str) -> Path:
    path = directory / name
    path.unlink()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", [MODEL_FILE, TRAINING_STATE_FILE, "optimizer.safetensors"])
@pytest.mark.parametrize(
    "call",
    [
        "ac.load_checkpoint(step)",
        "ac.load_checkpoint(step, mmap=False)",
        "ac.load_checkpoint(step, keys=['w'], mmap=False)",
        "ac.open_checkpoint(step)",
        "ac.CheckpointManager(root).restore()",
        "SafetensorsReader(step / 'model.safetensors')",
    ],
)
def test_fifo_in_a_checkpoint_fails_at_once(tmp_path: Path, name: str, call: str) -> None:
    root = tmp_path / "root"
    with ac.CheckpointManager(root) as manager:
        manager.save(1, {"w": np.ones(2)}, {"m": np.zeros(2)}).result()
    (step,) = [p for p in root.iterdir() if p.name.startswith("step_")]
    fifo = _fifo_in(step, name)
    done = run_child(f"""
        from pathlib import Path
        import arrayckpt as ac
        from arrayckpt.format import SafetensorsReader
        root = Path({str(root)!r}); step = Path({str(step)!r})
        try:
            {call}
        except ac.CheckpointError as exc:
            print("CheckpointError:", exc)
        else:
            print("loaded")
    """)
    out = done.stdout + done.stderr
    if call.startswith("ac.CheckpointManager") and name != "optimizer.safetensors":
        assert "loaded" in out, out  # the step is incomplete: restore() finds no step
        return
    if call.startswith("SafetensorsReader") and name != MODEL_FILE:
        assert "loaded" in out, out  # the FIFO is another file of the directory
        return
    assert "CheckpointError:" in out and "a FIFO, not a regular file" in out, out
    assert str(fifo) in out, out


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("name", [MODEL_FILE, TRAINING_STATE_FILE])
def test_fifo_in_a_checkpoint_fails_the_cli_at_once(
    tmp_path: Path, command: str, name: str
) -> None:
    step = ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)})
    fifo = _fifo_in(step, name)
    done = run_child(f"""
        import sys
        from arrayckpt.cli import main
        sys.exit(main([{command!r}, {str(step)!r}]))
    """)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert str(fifo) in out and "FIFO" in out, out
    assert "Traceback" not in out, out


def test_fifo_sharding_meta_fails_distributed_load_and_verify(tmp_path: Path) -> None:
    for rank in range(2):
        ac.save_distributed_checkpoint(tmp_path / "d", rank, 2, {"w": np.ones(2)})
    _fifo_in(tmp_path / "d", SHARDING_META_FILE)
    done = run_child(f"""
        import arrayckpt as ac
        from arrayckpt.cli import main
        try:
            ac.load_distributed_checkpoint({str(tmp_path / "d")!r}, 0)
        except ac.CheckpointError as exc:
            print("CheckpointError:", exc)
        print("verify exit", main(["verify", {str(tmp_path / "d")!r}]))
    """)
    out = done.stdout + done.stderr
    assert "CheckpointError:" in out and "FIFO" in out, out
    assert "verify exit 0" not in out and "verify exit" in out, out


def test_socket_and_symlink_loop_are_checkpoint_errors(tmp_path: Path) -> None:
    """Before: bare OSError (ENXIO, ELOOP)."""
    step = ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)})
    (step / MODEL_FILE).unlink()
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(step / MODEL_FILE))
        with pytest.raises(ac.CorruptCheckpointError, match="not a regular file"):
            ac.load_checkpoint(step)
    finally:
        server.close()
    (step / MODEL_FILE).unlink()
    (step / MODEL_FILE).symlink_to(step / MODEL_FILE)
    with pytest.raises(ac.CorruptCheckpointError, match="symbolic link loop") as info:
        ac.load_checkpoint(step)
    assert str(step / MODEL_FILE) in str(info.value)


def test_device_file_is_refused_not_read(tmp_path: Path) -> None:
    """/dev/zero would be read forever by a reader that trusts st_size 0 never."""
    with pytest.raises(ac.CorruptCheckpointError, match="character device"):
        SafetensorsReader("/dev/zero")
    with pytest.raises(ac.CorruptCheckpointError, match="character device"):
        fsops.fs().read_bytes(Path("/dev/zero"), 100)


def test_too_many_open_files_is_a_checkpoint_error(tmp_path: Path) -> None:
    """Before: a bare `OSError: [Errno 24] Too many open files`."""
    step = ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)})
    done = run_child(f"""
        import os, resource
        import arrayckpt as ac
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            ac.load_checkpoint({str(step)!r})
        except ac.CheckpointError as exc:
            print(type(exc).__name__, isinstance(exc, OSError), exc.errno, exc)
    """)
    out = done.stdout + done.stderr
    assert f"CheckpointReadError True {errno.EMFILE}" in out, out
    assert "ulimit -n" in out, out


def test_read_bytes_checks_the_size_before_reading(tmp_path: Path) -> None:
    """A 2 GiB sparse JSON file is refused from its size: nothing of it is read."""
    path = tmp_path / SHARDING_META_FILE
    with open(path, "wb") as f:
        f.truncate(2 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="larger than the"):
        fsops.fs().read_bytes(path, limits.MAX_SHARDING_META_BYTES)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
    small = tmp_path / "small.json"
    small.write_bytes(b'{"a": 1}')
    assert fsops.fs().read_bytes(small, 8) == b'{"a": 1}'
    with pytest.raises(ValueError, match="larger than the 7-byte"):
        fsops.fs().read_bytes(small, 7)
