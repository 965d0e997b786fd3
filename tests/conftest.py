"""Test setup: import path, Hypothesis profiles, backend fixtures.

Profiles: ``ci`` (default; the whole suite in well under a minute) and ``stress``
(``ARRAYCKPT_STRESS=1``; many more examples). Shared strategies live in
``tests/strategies.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

#: the SeaweedFS S3 server fixtures (s3_server, s3_env) and its fault proxy (proxy)
pytest_plugins = ["s3server", "s3proxy"]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the package is imported from the worktree, not installed
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # `from strategies import ...` under any rootdir

import strategies  # noqa: E402

# No deadline: file I/O and first framework imports make timings noisy. tmp_path is
# shared by a test's examples on purpose (each example makes its own subdirectory).
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("stress", max_examples=500, deadline=None, suppress_health_check=_QUIET)
settings.load_profile("stress" if os.environ.get("ARRAYCKPT_STRESS") == "1" else "ci")


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so a run from another rootdir knows them.
    for marker in (
        "gpu: needs a CUDA GPU (skipped without one)",
        "distributed: starts several real processes",
        "slow: long-running; full counts run under `nox -s stress`",
    ):
        config.addinivalue_line("markers", marker)


@pytest.fixture(params=strategies.available_backends())
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend available on this machine, in turn."""
    return str(request.param)


@pytest.fixture(params=strategies.cpu_backends())
def cpu_backend_name(request: pytest.FixtureRequest) -> str:
    """Each host-memory backend available on this machine, in turn."""
    return str(request.param)


@pytest.fixture
def torch_module() -> object:
    """The torch module, or a skip saying why it is missing."""
    return pytest.importorskip("torch", reason="PyTorch is not installed")


@pytest.fixture
def jax_x64() -> Iterator[None]:
    """64-bit JAX types for one test, then JAX's default again (32-bit: users run that).

    Only tests that put 64-bit arrays through JAX use it; they say so where they do.
    """
    if not strategies.importable("jax"):
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Iterator[Path]:
    """A path for a checkpoint that does not exist yet, in a fresh parent directory."""
    yield tmp_path / "ckpt"
