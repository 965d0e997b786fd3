"""Suite 5: real I/O errors from the operating system, not injected ones.

A full file system (a 1 MiB tmpfs in a private mount namespace), a file-size limit
(RLIMIT_FSIZE) and a read-only parent directory: each save fails with a
`CheckpointWriteError` whose cause is the OS error, the previous checkpoint stays
loadable, no temporary directory is left, and a save after the condition clears works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from . import faults
except ImportError:
    import faults

MODES = faults.SINGLE_SAVERS


def check(proc: subprocess.CompletedProcess[str], cause: str) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    failed, ok = proc.stdout.splitlines()
    assert failed.startswith("failed ") and cause in failed, failed
    assert ok == "ok"


def child_command(*args: object) -> list[str]:
    return [sys.executable, str(faults.CHILD), "fail-cleanly", *map(str, args)]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=faults.child_env()
    )


@pytest.mark.parametrize("mode", MODES)
def test_disk_full(tmp_path: Path, mode: str) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    probe = run(
        [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=1m tmpfs {mount}",
        ]
    )
    if probe.returncode != 0:
        pytest.skip(f"mounting a tmpfs in a user namespace is not permitted: {probe.stderr}")
    script = 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"'
    proc = run(
        [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            str(mount),
            *child_command("disk-full", mount / "ckpt", mode),
        ]
    )
    check(proc, "OSError 28")  # ENOSPC


@pytest.mark.parametrize("mode", MODES)
def test_file_size_limit(tmp_path: Path, mode: str) -> None:
    proc = run(child_command("fsize", tmp_path / "ckpt", mode, 64 * 1024))
    check(proc, "OSError 27")  # EFBIG
    faults.assert_checkpoint(tmp_path / "ckpt", 3, 1024)


@pytest.mark.parametrize("mode", MODES)
def test_read_only_directory(tmp_path: Path, mode: str) -> None:
    command = child_command("readonly", tmp_path / "parent" / "ckpt", mode)
    if os.geteuid() == 0:  # root ignores permission bits: drop that power for the child
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and no setpriv(1) to drop CAP_DAC_OVERRIDE")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    proc = run(command)
    check(proc, "PermissionError 13")
    faults.assert_checkpoint(tmp_path / "parent" / "ckpt", 3, 1024)
