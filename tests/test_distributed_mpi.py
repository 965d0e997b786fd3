"""Coordinated saves over mpi4py, ranks started by ``mpirun -n 2``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _dist_launch import (
    base_env,
    check_async,
    check_fault,
    check_given,
    check_sync,
    mpirun_command,
    run_mpi,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found: install an MPI runtime (apt-get install openmpi-bin)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py)")
    probe = subprocess.run(
        [*mpirun_command(1), sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD"],
        env=base_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"mpirun cannot start a process here: {probe.stderr.decode()[-500:]}")
    out: Path = tmp_path_factory.mktemp("mpi")
    return run_mpi(out, 2)


def test_coordinated_save_commits_once_and_reshards(ranks: list[dict[str, Any]]) -> None:
    check_sync(ranks)


def test_save_through_a_given_communicator(ranks: list[dict[str, Any]]) -> None:
    check_given(ranks)


def test_async_save_runs_beside_training_collectives(ranks: list[dict[str, Any]]) -> None:
    check_async(ranks)


@pytest.mark.parametrize("name", ["fault", "fault_async"])
def test_one_rank_failing_fails_all_and_commits_nothing(
    ranks: list[dict[str, Any]], name: str
) -> None:
    check_fault(ranks, name)


def test_absent_rank_is_named_within_the_timeout(ranks: list[dict[str, Any]]) -> None:
    got = ranks[0]["absent"]
    assert got["type"] == "TopologyError" and "ranks [1]" in got["error"], got
    assert got["elapsed"] < 15
    assert "absent" not in ranks[0]["listing"]
