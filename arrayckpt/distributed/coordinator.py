"""Cross-rank coordination through an engine already running: torch.distributed, mpi4py
or jax.distributed.

Every wait has a deadline and names the ranks that did not arrive. Each coordinator talks
over its own channel (a dedicated gloo group, a duplicated MPI communicator, keys of its
own in jax.distributed's key-value store), never the training loop's collectives, so a
save running on the background writer thread cannot interleave with, deadlock on, or
trip the watchdog of the training collectives.
"""

from __future__ import annotations

import itertools
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


class JaxCoordinator(Coordinator):
    """jax.distributed: messages through the key-value store of its coordination service.

    Every process of a job started with ``jax.distributed.initialize`` holds a client of
    the service process 0 runs; its store takes bytes, and a read can wait for a key
    with a deadline. A gather is each process setting a key rank 0 waits for; a
    broadcast is rank 0 setting one the others wait for. No XLA collective is involved,
    so the writer thread never meets the training step's computations, and no CPU
    collectives (gloo) need configuring. Ranks are jax process ids.

    Keys live under ``arrayckpt/coordinator/<name>/<sequence number>/``; rank 0 deletes
    those of earlier steps once every rank has answered a later gather. ``name``
    defaults to a per-process count of coordinators, so every process must construct
    its coordinators in the same order (arrayckpt builds one per client and reuses it).

    When a process dies, jax's own failure handling comes first: unless the job enabled
    ``jax_enable_recoverability``, the coordination service terminates every process
    once it sees one stop sending heartbeats. Until then (and always with it) the
    others raise `TopologyError` naming the dead process once their wait times out.

    Args:
        client: a ``DistributedRuntimeClient``; default jax.distributed's own.
        timeout: default seconds each wait may take (``ARRAYCKPT_DIST_TIMEOUT``, 300).
        process_id: this process's rank; default jax.distributed's (needed for another
            client).
        num_processes: the number of ranks; as ``process_id``.
        name: the key namespace, equal on every process; default the construction count.

    Raises:
        InvalidInputError: jax.distributed is not initialised (and no client given), or
            another client came without ``process_id`` and ``num_processes``.

    Examples:
        >>> # coordinator = JaxCoordinator()  # after jax.distributed.initialize(...)
    """

    _names = itertools.count()

    def __init__(
        self,
        client: Any = None,
        timeout: float | None = None,
        *,
        process_id: int | None = None,
        num_processes: int | None = None,
        name: str | None = None,
    ) -> None:
        state = _jax_state()
        if client is None:
            client = _jax_client()
        if state is not None and client is state.client:
            process_id = state.process_id if process_id is None else process_id
            num_processes = state.num_processes if num_processes is None else num_processes
        if process_id is None or num_processes is None:
            raise InvalidInputError(
                "a jax DistributedRuntimeClient other than jax.distributed's own needs "
                "process_id= and num_processes="
            )
        self._client = client
        self.rank, self.world_size = int(process_id), int(num_processes)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self._prefix = f"arrayckpt/coordinator/{next(self._names) if name is None else name}"
        self._seq = 0
        self._lock = threading.Lock()
        self._announced: list[int] = []  # rank 0's broadcasts not yet known to be read

    def _next(self) -> str:
        self._seq += 1
        return f"{self._prefix}/{self._seq}"

    def gather(self, payload: bytes, timeout: float | None = None) -> list[bytes] | None:
        with self._lock, _engine_errors(self.rank, "jax.distributed", "gathering manifests"):
            step, deadline = self._next(), time.monotonic() + (timeout or self.timeout)
            if self.rank != 0:
                self._client.key_value_set_bytes(f"{step}/{self.rank}", payload)
                return None
            got = [payload]
            for r in range(1, self.world_size):
                value = self._wait(f"{step}/{r}", deadline)
                if value is None:
                    missing = self._missing(step, range(r, self.world_size))
                    raise TopologyError(
                        f"rank 0: jax processes {missing} did not send their manifests "
                        f"within {timeout or self.timeout:.0f} s; a process crashed, hangs, "
                        "or skipped the save"
                    )
                got.append(value)
            # Every rank has passed every earlier step: their keys are no longer read.
            for seq in self._announced:
                self._client.key_value_delete(f"{self._prefix}/{seq}")
            self._client.key_value_delete(step)
            self._announced.clear()
            return got

    def broadcast(self, payload: bytes | None, timeout: float | None = None) -> bytes:
        with self._lock, _engine_errors(self.rank, "jax.distributed", "broadcasting from rank 0"):
            step, deadline = self._next(), time.monotonic() + (timeout or self.timeout)
            if self.rank == 0:
                self._client.key_value_set_bytes(f"{step}/root", payload or b"")
                self._announced.append(self._seq)
                return payload or b""
            value = self._wait(f"{step}/root", deadline)
            if value is None:
                raise TopologyError(
                    f"rank {self.rank}: jax process 0 did not broadcast its decision within "
                    f"{timeout or self.timeout:.0f} s; it crashed, hangs, or skipped the save"
                )
            return value

    def _wait(self, key: str, deadline: float) -> bytes | None:
        """The value of ``key`` once set, or ``None`` when the deadline passes first."""
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            return bytes(self._client.blocking_key_value_get_bytes(key, left_ms))
        except RuntimeError as exc:  # jax.errors.JaxRuntimeError
            if "DEADLINE_EXCEEDED" in str(exc):
                return None
            raise

    def _missing(self, step: str, ranks: range) -> list[int]:
        present = {key for key, _ in self._client.key_value_dir_get_bytes(f"{step}/")}
        return [r for r in ranks if f"{step}/{r}" not in present]


def _jax_state() -> Any:
    """jax.distributed's process-wide state, or ``None`` when jax was never imported."""
    if sys.modules.get("jax") is None:
        return None
    from jax._src import distributed

    return distributed.global_state


def _jax_client() -> Any:
    """jax.distributed's client in this process.

    Raises:
        InvalidInputError: jax.distributed is not initialised.
    """
    state = _jax_state()
    if state is None or state.client is None:
        raise InvalidInputError(
            "jax.distributed is not initialised; call jax.distributed.initialize first or "
            "pass coordinator=None for caller-coordinated saves"
        )
    return state.client


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
    """The coordinator a save uses.

    ``"auto"`` picks torch.distributed when it is initialised, else jax.distributed when
    it is initialised, else none (caller-coordinated): torch first, because a job running
    both engines (JAX beside a torch data loader, say) is a torch job that already saved
    through torch before jax.distributed existed here. ``None`` means caller-coordinated;
    a torch ``ProcessGroup``, an mpi4py communicator, jax.distributed's client,
    ``"torch"``/``"mpi"``/``"jax"`` or a `Coordinator` are used as given.

    Call on the training thread: building one is a collective the first time.

    Raises:
        TopologyError: ``rank``/``world_size`` disagree with the engine's.
        InvalidInputError: ``coordinator`` is none of the above.
    """
    if coordinator is None:
        return None
    if isinstance(coordinator, str) and coordinator == "auto":
        dist = sys.modules.get("torch.distributed")
        jax_state = _jax_state()
        if dist is not None and dist.is_available() and dist.is_initialized():
            coordinator = "torch"
        elif jax_state is not None and jax_state.client is not None:
            coordinator = "jax"
        else:
            return None
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
        elif kind == "jax":
            base = _jax_client() if engine == "jax" else engine
            key = ("jax", id(base))
            make = lambda: JaxCoordinator(base)  # noqa: E731
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
    if engine in ("torch", "mpi", "jax"):
        return str(engine)
    module = type(engine).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("mpi4py"):
        return "mpi"
    if module.startswith("jax") and type(engine).__name__ == "DistributedRuntimeClient":
        return "jax"
    raise InvalidInputError(
        f"coordinator={engine!r} is not a torch.distributed ProcessGroup, an mpi4py "
        'communicator, jax.distributed\'s client, "torch", "mpi", "jax", "auto", None, or a '
        "Coordinator"
    )
