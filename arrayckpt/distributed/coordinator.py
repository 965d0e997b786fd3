"""Cross-rank coordination through an engine already running: torch.distributed or mpi4py.

Every wait has a deadline and names the ranks that did not arrive. Each coordinator talks
over its own channel (a dedicated gloo group, a duplicated MPI communicator), never the
training loop's, so a save running on the background writer thread cannot interleave
with, deadlock on, or trip the watchdog of the training collectives.
"""

from __future__ import annotations

import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .. import env
from ..errors import InvalidInputError, TopologyError

#: Seconds a rank waits for the others at each step unless ARRAYCKPT_DIST_TIMEOUT says otherwise.
DEFAULT_TIMEOUT_S = 300.0
_TIMEOUT_ENV = "ARRAYCKPT_DIST_TIMEOUT"
_POLL_S = 0.002


def default_timeout() -> float:
    """``ARRAYCKPT_DIST_TIMEOUT`` (seconds) or `DEFAULT_TIMEOUT_S`, read when a coordinator
    is built: a bad value then fails that save clearly instead of ``import arrayckpt``.

    Raises:
        InvalidInputError: the variable is not a positive finite number of seconds.
    """
    return env.positive_seconds(_TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


class Coordinator(ABC):
    """What a coordinated save needs from an engine: gather to rank 0, broadcast from it.

    Attributes:
        rank: this process's rank in the group.
        world_size: the group's size.
        timeout: default seconds to wait for the other ranks at each step.
        thread_safe: whether calls may come from the writer thread while the training
            loop uses the engine on its own thread.
    """

    rank: int
    world_size: int
    timeout: float
    thread_safe: bool = True

    @abstractmethod
    def gather(self, payload: bytes, timeout: float | None = None) -> list[bytes] | None:
        """Every rank's payload on rank 0 (in rank order); ``None`` on the others.

        Raises:
            TopologyError: a rank did not arrive in time (names which).
        """

    @abstractmethod
    def broadcast(self, payload: bytes | None, timeout: float | None = None) -> bytes:
        """Rank 0's payload on every rank.

        Raises:
            TopologyError: rank 0, or a rank it sends to, did not arrive in time.
        """


class SoloCoordinator(Coordinator):
    """A world of one process: nothing to wait for. A coordinated save needs no engine
    then: one process holding every shard of sharded arrays (driving several JAX devices)
    records their global offsets, and a single process commits an object-store step."""

    rank, world_size, timeout = 0, 1, 0.0

    def gather(self, payload: bytes, timeout: float | None = None) -> list[bytes] | None:
        return [payload]

    def broadcast(self, payload: bytes | None, timeout: float | None = None) -> bytes:
        return payload or b""


class TorchCoordinator(Coordinator):
    """torch.distributed: a dedicated gloo group beside ``group`` (default: the world).

    Creating it is a collective (``new_group``): every rank of ``group`` must construct it
    at the same point of its program, on the training thread. arrayckpt makes one per
    group and reuses it.

    Examples:
        >>> # coordinator = TorchCoordinator()  # after dist.init_process_group(...)
    """

    def __init__(self, group: Any = None, timeout: float | None = None) -> None:
        import datetime

        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidInputError(
                "torch.distributed is not initialised; call init_process_group first "
                "or pass coordinator=None for caller-coordinated saves"
            )
        self._dist = dist
        self.timeout = default_timeout() if timeout is None else float(timeout)
        ranks = None if group is None else dist.get_process_group_ranks(group)
        # Local synchronization: only the members of ``group`` take part in building it.
        self._group = dist.new_group(
            ranks=ranks,
            backend="gloo",
            timeout=datetime.timedelta(seconds=self.timeout),
            use_local_synchronization=ranks is not None,
        )
        self.rank = dist.get_rank(self._group)
        self.world_size = dist.get_world_size(self._group)
        self._root = dist.get_global_rank(self._group, 0)

    def _barrier(self, timeout: float | None) -> None:
        import datetime

        try:
            self._dist.monitored_barrier(
                group=self._group,
                timeout=datetime.timedelta(seconds=timeout or self.timeout),
                wait_all_ranks=True,
            )
        except RuntimeError as exc:
            raise TopologyError(
                f"rank {self.rank}: ranks did not all reach the checkpoint barrier within "
                f"{timeout or self.timeout:.0f} s ({exc}); a rank crashed, hangs, or skipped "
                "the save"
            ) from exc

    def gather(self, payload: bytes, timeout: float | None = None) -> list[bytes] | None:
        with _engine_errors(self.rank, "torch.distributed", "gathering manifests"):
            return self._gather(payload, timeout)

    def broadcast(self, payload: bytes | None, timeout: float | None = None) -> bytes:
        with _engine_errors(self.rank, "torch.distributed", "broadcasting from rank 0"):
            return self._broadcast(payload, timeout)

    def _gather(self, payload: bytes, timeout: float | None) -> list[bytes] | None:
        import torch

        self._barrier(timeout)
        dist = self._dist
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.int64), group=self._group)
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if payload:
            mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        bufs = (
            [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            if self.rank == 0
            else None
        )
        dist.gather(mine, bufs, dst=self._root, group=self._group)
        if bufs is None:
            return None
        return [bytes(b[: int(s)].numpy()) for b, s in zip(bufs, sizes, strict=True)]

    def _broadcast(self, payload: bytes | None, timeout: float | None) -> bytes:
        import torch

        self._barrier(timeout)
        dist = self._dist
        size = torch.tensor([len(payload or b"")], dtype=torch.int64)
        dist.broadcast(size, src=self._root, group=self._group)
        buf = torch.zeros(int(size), dtype=torch.uint8)
        if self.rank == 0 and payload:
            buf[:] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        dist.broadcast(buf, src=self._root, group=self._group)
        return bytes(buf.numpy())


class MPICoordinator(Coordinator):
    """mpi4py: a duplicate of ``comm`` (default ``COMM_WORLD``), point-to-point messages
    polled against a deadline (MPI collectives cannot time out).

    Duplicating is collective: every rank of ``comm`` constructs it at the same point.
    Buffers are raw bytes (mpi4py's upper-case API): nothing is pickled.
    """

    _TAG = 0x0AC0

    def __init__(self, comm: Any = None, timeout: float | None = None) -> None:
        from mpi4py import MPI

        self.timeout = default_timeout() if timeout is None else float(timeout)
        self._MPI = MPI
        self._comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        self.thread_safe = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self._seq = 0
        self._lock = threading.Lock()

    def _tag(self) -> int:
        self._seq += 1
        return self._TAG + self._seq % 1024

    def _receive(
        self, sources: list[int], tag: int, deadline: float, what: str
    ) -> dict[int, bytes]:
        MPI = self._MPI
        got: dict[int, bytes] = {}
        status = MPI.Status()
        while len(got) < len(sources):
            for src in sources:
                if src not in got and self._comm.Iprobe(source=src, tag=tag, status=status):
                    buf = bytearray(status.Get_count(MPI.BYTE))
                    self._comm.Recv([buf, MPI.BYTE], source=src, tag=tag)
                    got[src] = bytes(buf)
            if len(got) < len(sources):
                if time.monotonic() > deadline:
                    missing = [s for s in sources if s not in got]
                    raise TopologyError(
                        f"rank {self.rank}: ranks {missing} did not send their {what} within "
                        f"the timeout; a rank crashed, hangs, or skipped the save"
                    )
                time.sleep(_POLL_S)
        return got

    def _send(self, payload: bytes, dests: list[int], tag: int, deadline: float, what: str) -> None:
        MPI = self._MPI
        buf = bytearray(payload)
        reqs = {d: self._comm.Isend([buf, MPI.BYTE], dest=d, tag=tag) for d in dests}
        while reqs:
            reqs = {d: r for d, r in reqs.items() if not r.Test()}
            if reqs and time.monotonic() > deadline:
                for r in reqs.values():
                    r.Cancel()
                raise TopologyError(
                    f"rank {self.rank}: ranks {sorted(reqs)} did not receive the {what} "
                    "within the timeout"
                )
            if reqs:
                time.sleep(_POLL_S)

    def gather(self, payload: bytes, timeout: float | None = None) -> list[bytes] | None:
        with self._lock, _engine_errors(self.rank, "MPI", "gathering manifests", self._MPI):
            tag, deadline = self._tag(), time.monotonic() + (timeout or self.timeout)
            if self.rank != 0:
                self._send(payload, [0], tag, deadline, "manifest")
                return None
            got = self._receive(list(range(1, self.world_size)), tag, deadline, "manifests")
            return [payload] + [got[r] for r in range(1, self.world_size)]

    def broadcast(self, payload: bytes | None, timeout: float | None = None) -> bytes:
        with self._lock, _engine_errors(self.rank, "MPI", "broadcasting from rank 0", self._MPI):
            tag, deadline = self._tag(), time.monotonic() + (timeout or self.timeout)
            if self.rank == 0:
                others = list(range(1, self.world_size))
                self._send(payload or b"", others, tag, deadline, "decision")
                return payload or b""
            return self._receive([0], tag, deadline, "decision from rank 0")[0]


@contextmanager
def _engine_errors(rank: int, engine: str, what: str, mpi: Any = None) -> Iterator[None]:
    """Report the engine's own failures (a peer's connection closed, ...) as TopologyError."""
    caught: tuple[type[BaseException], ...] = (RuntimeError,)
    if mpi is not None:
        caught = (mpi.Exception,)
    try:
        yield
    except caught as exc:
        raise TopologyError(
            f"rank {rank}: {engine} failed while {what} ({exc}); a rank crashed, hangs, "
            "or the connection broke"
        ) from exc


_cache: dict[tuple[str, int], tuple[Any, Coordinator]] = {}
_cache_lock = threading.Lock()


def resolve(coordinator: Any, rank: int, world_size: int) -> Coordinator | None:
    """The coordinator a save uses: ``"auto"`` picks torch.distributed when it is
    initialised; ``None`` means caller-coordinated; a torch ``ProcessGroup``, an mpi4py
    communicator, ``"torch"``/``"mpi"`` or a `Coordinator` are used as given.

    Call on the training thread: building one is a collective the first time.

    Raises:
        TopologyError: ``rank``/``world_size`` disagree with the engine's.
        InvalidInputError: ``coordinator`` is none of the above.
    """
    if coordinator is None:
        return None
    if isinstance(coordinator, str) and coordinator == "auto":
        dist = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return None
        coordinator = "torch"
    found = coordinator if isinstance(coordinator, Coordinator) else _cached(coordinator)
    if (found.rank, found.world_size) != (rank, world_size):
        raise TopologyError(
            f"save_distributed was called as rank {rank} of {world_size}, but the coordinator "
            f"says rank {found.rank} of {found.world_size}; pass the engine's rank and size"
        )
    return found


def _cached(engine: Any) -> Coordinator:
    kind = _kind(engine)
    with _cache_lock:
        if kind == "torch":
            import torch.distributed as dist

            base = dist.group.WORLD if engine == "torch" else engine
            key = ("torch", id(base))
            make: Any = lambda: TorchCoordinator(None if engine == "torch" else engine)  # noqa: E731
        else:
            from mpi4py import MPI

            base = MPI.COMM_WORLD if engine == "mpi" else engine
            key = ("mpi", id(base))
            make = lambda: MPICoordinator(base)  # noqa: E731
        hit = _cache.get(key)
        if hit is None or hit[0] is not base:
            hit = (base, make())
            _cache[key] = hit
        return hit[1]


def _kind(engine: Any) -> str:
    if engine in ("torch", "mpi"):
        return str(engine)
    module = type(engine).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("mpi4py"):
        return "mpi"
    raise InvalidInputError(
        f"coordinator={engine!r} is not a torch.distributed ProcessGroup, an mpi4py "
        'communicator, "torch", "mpi", "auto", None, or a Coordinator'
    )
