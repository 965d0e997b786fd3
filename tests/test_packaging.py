"""Packaging metadata and the sdist, built from a copy of the checkout with the project's
own build backend (setuptools, as `pip install .` uses it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import arrayckpt

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "MANIFEST.in",
    "arrayckpt",
    "tests",
    "docs",
    "bench",
]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str, str]:
    """The sdist's member names, its PKG-INFO and what the build printed."""
    setuptools = pytest.importorskip(
        "setuptools", reason="setuptools (the build backend) is not installed"
    )
    if int(setuptools.__version__.split(".")[0]) < 77:
        # pip builds in an isolated environment with what [build-system] requires; this
        # fixture calls the backend of the test environment itself, so it needs as much
        pytest.skip(f"setuptools {setuptools.__version__} is older than the 77 pyproject requires")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = src / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
            str(out),
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        pkg_info = tar.extractfile(f"arrayckpt-{arrayckpt.__version__}/PKG-INFO")
        assert pkg_info is not None
        return names, pkg_info.read().decode(), proc.stdout + proc.stderr


def test_license_is_an_spdx_expression_with_its_file(sdist: tuple[list[str], str, str]) -> None:
    names, pkg_info, log = sdist
    assert "License-Expression: Apache-2.0" in pkg_info
    assert "License-File: LICENSE" in pkg_info
    assert f"arrayckpt-{arrayckpt.__version__}/LICENSE" in names
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert "deprecat" not in log.lower(), log[-3000:]


def test_classifiers_say_what_it_runs_on(sdist: tuple[list[str], str, str]) -> None:
    _, pkg_info, _ = sdist
    classifiers = [
        line.split(": ", 1)[1] for line in pkg_info.splitlines() if line.startswith("Classifier: ")
    ]
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # the SPDX string says it


def test_the_sdist_ships_no_half_test_suite(sdist: tuple[list[str], str, str]) -> None:
    """The tests need the whole checkout (docs/, bench/): ship all of it or none; none."""
    names, _, _ = sdist
    shipped = [n for n in names if "/tests/" in n or n.endswith("/tests")]
    assert not shipped
    assert f"arrayckpt-{arrayckpt.__version__}/arrayckpt/py.typed" in names


def test_public_names_are_pinned() -> None:
    """A name added or dropped is an API change: update this list, the docs and DESIGN.md."""
    assert sorted(arrayckpt.__all__) == sorted(
        [
            "CHECKPOINT_VERSION",
            "AsyncCheckpointer",
            "Checkpoint",
            "CheckpointError",
            "CheckpointManager",
            "CheckpointNotFoundError",
            "CheckpointWriteError",
            "CorruptCheckpointError",
            "InvalidInputError",
            "LazyCheckpoint",
            "ReadStats",
            "Replicated",
            "ShardingConfig",
            "TensorParallel",
            "TopologyError",
            "TrainingState",
            "UnsupportedArrayError",
            "ZeroPartitioned",
            "consolidate_checkpoint",
            "export_hf",
            "get_rng_state",
            "load_checkpoint",
            "load_distributed_checkpoint",
            "load_file",
            "open_checkpoint",
            "save_checkpoint",
            "save_distributed_checkpoint",
            "set_rng_state",
        ]
    )
    assert all(hasattr(arrayckpt, name) for name in arrayckpt.__all__)
