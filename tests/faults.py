"""Durability harness: a recording, fault-injecting `FileSystem` and checkpoint checks.

Every file-system step of a save goes through `arrayckpt.fsops`; installing a
`RecordingFS` with `fsops.use` logs those steps (from any thread: the async writer
too), and a `FaultFS` makes the k-th step fail in one chosen way. A `Saver` hides how
one save is made (sync, async; distributed savers slot in beside them), so every suite
runs the same scenario for each kind of save.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.distributed import ShardingMeta
from arrayckpt.layout import SHARDING_META_FILE, is_temporary_name

#: `nox -s stress` sets ARRAYCKPT_STRESS=1: the suites run their full counts.
STRESS = os.environ.get("ARRAYCKPT_STRESS") == "1"


def scaled(ci: int, full: int) -> int:
    """``full`` under ``nox -s stress``, else the CI-bounded ``ci``."""
    return full if STRESS else ci


def report(suite: str, **figures: int) -> None:
    """Append measured figures to $ARRAYCKPT_DURABILITY_REPORT (JSON lines), if set.

    docs/durability.md quotes the figures of a `nox -s stress` run.
    """
    out = os.environ.get("ARRAYCKPT_DURABILITY_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"suite": suite, **figures}) + "\n")


WRITES = frozenset({"write_safetensors", "write_bytes"})
FSYNCS = frozenset({"fsync_file", "fsync_dir"})


@dataclass(frozen=True)
class Op:
    """One file-system step as the library asked for it."""

    kind: str
    paths: tuple[Path, ...]
    data: bytes | None = None  # what a write left in the file (RecordingFS(keep_data=True))
    marker: object = None  # for kind "mark": a note the test put in the log

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(p.name for p in self.paths)})"


class RecordingFS(fsops.FileSystem):
    """The real file system, logging every step in the order it was asked for.

    Args:
        keep_data: keep the bytes each write produced (for the power-loss simulation).
        exchange: ``False`` makes `exchange` unsupported, as on file systems without
            ``renameat2(RENAME_EXCHANGE)``, so the commit takes its two-rename path.
    """

    def __init__(self, *, keep_data: bool = False, exchange: bool = True) -> None:
        self.ops: list[Op] = []
        self.keep_data = keep_data
        self.exchange_supported = exchange
        self._lock = threading.Lock()

    def step(self, kind: str, *paths: Path) -> int:
        """Log a step about to run; returns its index. Subclasses inject faults here."""
        with self._lock:
            self.ops.append(Op(kind, tuple(Path(p) for p in paths)))
            return len(self.ops) - 1

    def mark(self, marker: object) -> None:
        """Note in the log that something happened (e.g. "save of step 3 returned")."""
        with self._lock:
            self.ops.append(Op("mark", (), marker=marker))

    def _written(self, index: int, path: Path) -> None:
        if self.keep_data:
            with self._lock:
                self.ops[index] = replace(self.ops[index], data=Path(path).read_bytes())

    def makedirs(self, path: Path) -> None:
        self.step("makedirs", path)
        super().makedirs(path)

    def mkdir(self, path: Path) -> None:
        self.step("mkdir", path)
        super().mkdir(path)

    def write_safetensors(self, path: Path, specs: Any, metadata: Any, **kw: Any) -> None:
        i = self.step("write_safetensors", path)
        super().write_safetensors(path, specs, metadata, **kw)
        self._written(i, path)

    def write_bytes(self, path: Path, data: bytes) -> None:
        i = self.step("write_bytes", path)
        super().write_bytes(path, data)
        self._written(i, path)

    def fsync_file(self, path: Path) -> None:
        self.step("fsync_file", path)
        super().fsync_file(path)

    def fsync_dir(self, path: Path) -> None:
        self.step("fsync_dir", path)
        super().fsync_dir(path)

    def rename(self, src: Path, dst: Path) -> None:
        self.step("rename", src, dst)
        super().rename(src, dst)

    def exchange(self, a: Path, b: Path) -> None:
        if not self.exchange_supported:
            raise NotImplementedError("exchange disabled by the test")
        self.step("exchange", a, b)
        super().exchange(a, b)

    def remove_tree(self, path: Path) -> None:
        self.step("remove_tree", path)
        super().remove_tree(path)

    def read_bytes(self, path: Path, limit: int) -> bytes:
        self.step("read_bytes", path)
        return super().read_bytes(path, limit)


def _record_every_step(cls: type[RecordingFS]) -> type[RecordingFS]:
    """Record any `FileSystem` method not overridden above, so that a step added to
    `arrayckpt.fsops` later (a distributed save's ``remove_file``, say) is logged and can
    fail too instead of slipping past the suites."""
    for name, method in vars(fsops.FileSystem).items():
        if name.startswith("_") or not callable(method) or name in vars(cls):
            continue

        def recorded(
            self: RecordingFS, *args: Any, _name: str = name, _method: Any = method, **kwargs: Any
        ) -> Any:
            self.step(_name, *[Path(a) for a in args if isinstance(a, (str, os.PathLike))])
            return _method(self, *args, **kwargs)

        setattr(cls, name, recorded)
    return cls


_record_every_step(RecordingFS)


# ---------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One way a step can fail. ``kinds`` limits it to some steps (None: every step)."""

    name: str
    raise_: Callable[[Path], BaseException]
    kinds: frozenset[str] | None = None
    short_write: bool = False  # the write runs, its file is cut in half, then it fails

    def applies(self, kind: str) -> bool:
        return kind != "read_bytes" and (self.kinds is None or kind in self.kinds)

    def __str__(self) -> str:
        return self.name


def _oserror(code: int, what: str = "") -> Callable[[Path], BaseException]:
    def make(path: Path) -> BaseException:
        return OSError(code, what or os.strerror(code), str(path))

    return make


FAULTS = (
    Fault("ENOSPC", _oserror(errno.ENOSPC)),
    Fault("EIO", _oserror(errno.EIO)),
    Fault("EDQUOT", _oserror(errno.EDQUOT)),
    Fault("EFBIG", _oserror(errno.EFBIG)),
    Fault("short-write", _oserror(errno.ENOSPC, "short write"), WRITES, short_write=True),
    Fault("fsync-EIO", _oserror(errno.EIO, "fsync failed"), FSYNCS),
    Fault("KeyboardInterrupt", lambda path: KeyboardInterrupt(f"injected at {path}")),
)


StepKey = tuple[str, tuple[str, ...], int]


def step_key(ops: list[Op], index: int) -> StepKey:
    """Names step ``index`` of a log independently of how threads interleaved: its kind,
    its paths' names, and how many such steps came before it.

    The model and optimizer files are written on two threads, so a step's global index
    varies from run to run; each file's own steps keep their order, so this key does not.
    """

    def names(o: Op) -> tuple[str, ...]:
        # Files keep their names from run to run; directories (temporary ones, the test's
        # own) do not, and their steps run on one thread in a fixed order anyway.
        return tuple(p.name if p.suffix in (".safetensors", ".json") else "<dir>" for p in o.paths)

    op = ops[index]
    own = names(op)
    before = sum(1 for o in ops[:index] if o.kind == op.kind and names(o) == own)
    return op.kind, own, before


class FaultFS(RecordingFS):
    """Fails the step ``fail_at`` (a `step_key`) with ``fault``, once; logs every step.

    ``injected`` is the exception raised, so a test can check it reached the caller
    exactly as itself or as the ``__cause__`` of a `CheckpointWriteError`.
    """

    def __init__(
        self,
        fail_at: StepKey,
        fault: Fault,
        *,
        also: tuple[StepKey, Fault] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fail_at = fail_at
        self.fault = fault
        self.also = also  # a second fault, e.g. in the rollback of the first
        self.injected: BaseException | None = None

    def step(self, kind: str, *paths: Path) -> int:
        i = super().step(kind, *paths)
        with self._lock:
            key = step_key(self.ops, i)
        if key == self.fail_at and self.fault.applies(kind) and not self.fault.short_write:
            self.injected = self.fault.raise_(paths[-1])
            raise self.injected
        if self.also is not None and key == self.also[0] and self.also[1].applies(kind):
            raise self.also[1].raise_(paths[-1])
        return i

    def _written(self, index: int, path: Path) -> None:
        with self._lock:
            key = step_key(self.ops, index)
        if key == self.fail_at and self.fault.short_write:
            size = path.stat().st_size
            os.truncate(path, size // 2)
            self.injected = self.fault.raise_(path)
            raise self.injected
        super()._written(index, path)


class SlowFS(fsops.FileSystem):
    """Storage that takes ``delay`` seconds per file fsync: a save stays pending a while."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def fsync_file(self, path: Path) -> None:
        time.sleep(self.delay)
        super().fsync_file(path)


class StuckFS(fsops.FileSystem):
    """A storage call that never returns: `fsync_file` blocks until `release`."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()

    def fsync_file(self, path: Path) -> None:
        self.entered.set()
        self._release.wait()
        super().fsync_file(path)

    def release(self) -> None:
        self._release.set()


# ---------------------------------------------------------------- checkpoints


def model_state(step: int, scale: int = 1) -> dict[str, np.ndarray]:
    """A small model whose every element equals ``step`` (mod its dtype's range)."""
    return {
        "embed.weight": np.full((8 * scale, 16), step, np.float32),
        "layers.0.bias": np.full((16,), step, np.float64),
        "layers.0.count": np.full((3, 2), step, np.int64),
        "mask": np.full((5,), step % 256, np.uint8),
        "scalar": np.full((), step, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def optimizer_state(step: int, scale: int = 1) -> dict[str, np.ndarray]:
    return {
        "embed.weight.m": np.full((8 * scale, 16), -step, np.float32),
        "embed.weight.v": np.full((8 * scale, 16), step / 2, np.float16),
    }


def training_state(step: int) -> ac.TrainingState:
    return ac.TrainingState(
        step=step, epoch=step // 10, learning_rate=1e-3, metadata={"step": str(step)}
    )


def assert_checkpoint(path: Path, step: int, scale: int = 1) -> None:
    """``path`` holds exactly the checkpoint of ``step``: every array bit-exact."""
    assert loaded_step(path, scale) == step


def loaded_step(path: Path, scale: int = 1) -> int:
    """Load ``path`` and return its step, checking every array belongs to that step.

    A distributed checkpoint (``sharding_meta.json``) is loaded for each of its ranks,
    and every rank must hold the same step: a mix of ranks from two saves fails here.
    """
    if (path / SHARDING_META_FILE).exists() or (path / "rank_0").is_dir():
        steps = loaded_rank_steps(path, scale)
        assert len(set(steps)) == 1, f"{path}: ranks hold steps {steps} (a mix of saves)"
        return steps[0]
    return _check_loaded(path, ac.load_checkpoint(path), scale)


def loaded_rank_steps(path: Path, scale: int = 1) -> list[int]:
    """Each rank's step of the distributed checkpoint at ``path``, every array checked."""
    world = ShardingMeta.read(path / SHARDING_META_FILE).world_size
    return [
        _check_loaded(path / f"rank_{r}", ac.load_distributed_checkpoint(path, r), scale)
        for r in range(world)
    ]


def _check_loaded(path: Path, loaded: ac.Checkpoint, scale: int) -> int:
    model, optimizer, state = loaded
    step = state.step
    assert state.metadata == {"step": str(step)}, f"{path}: training state {state} is torn"
    for name, expected in [
        *model_state(step, scale).items(),
        *optimizer_state(step, scale).items(),
    ]:
        got = model.get(name, optimizer.get(name) if optimizer else None)
        assert got is not None, f"{path}: {name} missing"
        assert got.dtype == expected.dtype and got.shape == expected.shape, (path, name)
        assert got.tobytes() == expected.tobytes(), (
            f"{path}: {name} does not belong to step {step} (a mix of steps)"
        )
    return step


def debris(parent: Path) -> list[str]:
    """Temporary siblings a save created and did not remove."""
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if is_temporary_name(p.name))


# ---------------------------------------------------------------- child processes

CHILD = Path(__file__).resolve().parent / "durability_child.py"
REPO = CHILD.parent.parent


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start_child(
    *args: object, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """Run ``durability_child.py`` with this checkout of arrayckpt importable."""
    return subprocess.Popen(
        [sys.executable, str(CHILD), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or child_env(),
        **popen,
    )


def rest_of_output(child: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for ``child`` and read what is left of its output.

    Not `communicate`: it reads the raw pipes and would miss lines that an earlier
    ``child.stdout.readline()`` already pulled into the text buffer.
    """
    child.wait(timeout)
    return child.stdout.read(), child.stderr.read()  # type: ignore[union-attr]


def committed(lines: str) -> int | None:
    """The last ``committed N`` a child printed."""
    steps = [int(line.split()[1]) for line in lines.splitlines() if line.startswith("committed")]
    return steps[-1] if steps else None


# ---------------------------------------------------------------- savers


@dataclass
class Saver:
    """One way of saving a checkpoint; ``save`` raises what the caller would see.

    ``after_failure`` checks the error is not raised a second time (async: by `wait`
    and `close`).

    ``dist2`` is a coordinated distributed save by two ranks, run as two threads talking
    through an in-process `Coordinator`; the caller sees the error of the rank the fault
    hit (the other rank's says that rank failed). ``dist2-caller`` saves both ranks
    caller-coordinated, rank 0 then rank 1, as two processes would without a barrier
    between them: it stops at the first rank that fails.
    """

    name: str
    scale: int = 1
    _ckpt: ac.AsyncCheckpointer | None = field(default=None, repr=False)

    def save(self, target: Path, step: int) -> None:
        args = (
            target,
            model_state(step, self.scale),
            optimizer_state(step, self.scale),
            training_state(step),
        )
        if self.name == "sync":
            ac.save_checkpoint(*args)
        elif self.name == "async":
            if self._ckpt is None:
                self._ckpt = ac.AsyncCheckpointer()
            self._ckpt.save(*args).result()
        elif self.name == "dist2":
            self._save_coordinated(target, step)
        elif self.name == "dist2-caller":
            for rank in range(2):
                ac.save_distributed_checkpoint(target, rank, 2, *args[1:], coordinator=None)
        else:
            raise ValueError(self.name)

    def _save_coordinated(self, target: Path, step: int) -> None:
        from dist_threads import run_ranks  # tests/ is on sys.path for the suites

        def rank(r: int, coord: Any) -> Any:
            return ac.save_distributed_checkpoint(
                target,
                r,
                2,
                model_state(step, self.scale),
                optimizer_state(step, self.scale),
                training_state(step),
                coordinator=coord,
            )

        out = run_ranks(2, rank, timeout=DIST_TIMEOUT)
        errors = [e for e in out if isinstance(e, BaseException)]
        if errors:
            # The rank the fault hit raises it as itself or as its cause; the others say
            # which rank failed. Every rank must fail when one does.
            assert len(errors) == 2, f"one rank failed, the other returned: {out}"
            own = [e for e in errors if isinstance(e, KeyboardInterrupt) or e.__cause__ is not None]
            raise (own or errors)[0]

    def after_failure(self) -> None:
        if self._ckpt is not None:
            self._ckpt.wait()  # the caller saw the error through the future: not again

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None


#: Seconds a thread rank waits for the other: short, since both run in this process; a
#: save that reaches it is a bug (a rank that did not tell the other it failed).
DIST_TIMEOUT = 5.0

SINGLE_SAVERS = ("sync", "async")
#: Savers for which the whole checkpoint is old or new at every instant.
SAVERS = (*SINGLE_SAVERS, "dist2")


@contextmanager
def saver(name: str, scale: int = 1) -> Iterator[Saver]:
    s = Saver(name, scale)
    try:
        yield s
    finally:
        s.close()
