"""Ranks as threads of one process: an in-process `Coordinator` for the protocol and
durability suites (fast, deterministic, no engine to start)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from arrayckpt.distributed import Coordinator
from arrayckpt.errors import TopologyError


class Hub:
    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.slots: dict[tuple[Any, ...], bytes] = {}


class ThreadCoordinator(Coordinator):
    """Ranks are threads; messages are slots keyed by call sequence number."""

    def __init__(self, hub: Hub, rank: int, world_size: int, timeout: float = 5.0) -> None:
        self.hub, self.rank, self.world_size, self.timeout = hub, rank, world_size, timeout
        self.seq = 0

    def _wait(self, keys: list[tuple[Any, ...]], timeout: float | None, who: list[int]) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        with self.hub.cv:
            while not all(k in self.hub.slots for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r, k in zip(who, keys, strict=True) if k not in self.hub.slots]
                    raise TopologyError(f"rank {self.rank}: ranks {missing} did not arrive")
                self.hub.cv.wait(left)

    def gather(self, payload: bytes, timeout: float | None = None) -> list[bytes] | None:
        self.seq += 1
        with self.hub.cv:
            self.hub.slots[(self.seq, "g", self.rank)] = payload
            self.hub.cv.notify_all()
        if self.rank:
            return None
        keys = [(self.seq, "g", r) for r in range(self.world_size)]
        self._wait(keys, timeout, list(range(self.world_size)))
        return [self.hub.slots[k] for k in keys]

    def broadcast(self, payload: bytes | None, timeout: float | None = None) -> bytes:
        self.seq += 1
        key = (self.seq, "b")
        if self.rank == 0:
            with self.hub.cv:
                self.hub.slots[key] = payload or b""
                self.hub.cv.notify_all()
        else:
            self._wait([key], timeout, [0])
        return self.hub.slots[key]


def run_ranks(n: int, body: Callable[[int, Coordinator], Any], timeout: float = 5.0) -> list[Any]:
    """Run ``body(rank, coordinator)`` on ``n`` threads; each result or raised exception."""
    hub = Hub()
    out: list[Any] = [None] * n

    def main(r: int) -> None:
        try:
            out[r] = body(r, ThreadCoordinator(hub, r, n, timeout))
        except BaseException as exc:
            out[r] = exc

    threads = [threading.Thread(target=main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a rank hung"
    return out
