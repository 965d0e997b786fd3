"""Starting the multi-process tests' ranks (tests/_dist_worker.py) with hard time limits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
#: A rank that outlives this is killed (its own faulthandler fires first, at WORKER_TIMEOUT).
LIMIT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["WORKER_TIMEOUT"] = "90"
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    env["MASTER_ADDR"] = "127.0.0.1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def wait_all(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + LIMIT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # each rank leads its own session
        pytest.fail(f"ranks still running after {LIMIT_S} s; logs:\n" + read_logs(logs))


def read_logs(logs: list[Path]) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in logs if p.exists()
    )


def results(out: Path, world: int, logs: list[Path]) -> list[dict[str, Any]]:
    found = [out / f"result_{r}.json" for r in range(world)]
    if not all(f.exists() for f in found):
        pytest.fail("a rank wrote no results; logs:\n" + read_logs(logs))
    return [json.loads(f.read_text()) for f in found]


def run_torch(out: Path, world: int) -> list[dict[str, Any]]:
    env = base_env()
    env["MASTER_PORT"] = str(free_port())
    env["WORLD_SIZE"] = str(world)
    procs, logs = [], []
    for r in range(world):
        log = out / f"log_{r}.txt"
        logs.append(log)
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "torch", str(out)],
                    env={**env, "RANK": str(r)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    wait_all(procs, logs)
    return results(out, world, logs)


def run_scenario(
    worker: Path, scenario: str, ckpt: Path | str, out: Path, world: int
) -> list[dict[str, Any]]:
    """Start ``world`` gloo ranks of ``worker`` on one scenario; every rank must succeed."""
    out.mkdir()
    env = {**base_env(), "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs, logs = [], []
    for r in range(world):
        logs.append(out / f"log_{r}.txt")
        with open(logs[-1], "wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(worker), scenario, str(ckpt), str(out)],
                    env={**env, "RANK": str(r)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    wait_all(procs, logs)
    res = results(out, world, logs)
    for r in res:
        assert r["ok"], r.get("error", "") + read_logs(logs)
    return res


def mpirun_command(n: int) -> list[str]:
    cmd = ["mpirun", "-n", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")  # CI containers run as root
    return cmd


def run_mpi(out: Path, world: int) -> list[dict[str, Any]]:
    log = out / "mpirun.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [*mpirun_command(world), sys.executable, str(WORKER), "mpi", str(out)],
            env=base_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_all([proc], [log])
    return results(out, world, [log])


# Checks shared by the torch and MPI runs: each takes every rank's results.


def check_sync(res: list[dict[str, Any]]) -> None:
    world = len(res)
    for r in res:
        assert r["sync"]["ok"], r["sync"]
        assert r["sync"]["committed"] == [f"rank_{i}" for i in range(world)] + [
            "sharding_meta.json"
        ]


def check_given(res: list[dict[str, Any]]) -> None:
    for r in res:
        assert r["given"]["ok"], r["given"]
    assert "given" in res[0]["listing"]


def check_async(res: list[dict[str, Any]]) -> None:
    for r in res:
        assert r["async"]["ok"], r["async"]
        assert r["async"]["allreduces_during"] >= 50  # training collectives kept running


def check_fault(res: list[dict[str, Any]], name: str) -> None:
    for rank, r in enumerate(res):
        got = r[name]
        assert not got["ok"] and got["type"] == "CheckpointWriteError", got
        assert "nothing was committed" in got["error"]
        if rank != 1:
            assert "rank 1 failed" in got["error"]
        assert "No space left on device (injected)" in got["error"]
        assert got["elapsed"] < 15  # failed fast, not by timing out
    listing = res[0]["listing"]
    assert name not in listing
    assert not [n for n in listing if ".arrayckpt-" in n], listing
