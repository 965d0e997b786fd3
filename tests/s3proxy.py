"""A fault-injecting TCP proxy in front of the SeaweedFS S3 server (`s3server`), for
the object-store tests: cut responses, throttling, lost answers, a stop mid-request."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from s3server import S3Server


@dataclass
class Fault:
    """Make requests whose first line holds ``method`` and ``name`` fail: ``"cut"`` the
    response after ``after`` bytes, answer ``"503"`` (throttling), or ``"drop"`` the
    answer (the request itself reaches the server), or ``"pass"`` it on unchanged.
    ``times``: how many requests. ``hook`` runs first, before the request goes on (e.g. it
    stops the server: the request then meets a dead server)."""

    method: bytes
    name: bytes
    action: str
    times: int = 1
    after: int = 0
    hook: Callable[[], None] | None = None


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server; counts the bytes it passes to
    the client and applies its `Fault` to matching requests."""

    def __init__(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.fault: Fault | None = None
        self.fired = 0
        self.bytes_down = 0
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        #: While set, every connection is cut and new ones are closed at once (`outage`).
        self.down = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=60)
            except OSError:  # the server is stopped: refuse this client, keep accepting
                _close(client)
                continue
            with self.lock:
                self.socks += [client, server]
            state: dict[str, Any] = {"cut": None}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _match(self, data: bytes) -> Fault | None:
        line = data.split(b"\r\n", 1)[0]
        with self.lock:
            f = self.fault
            if f is None or f.times <= 0 or not line.startswith(f.method) or f.name not in line:
                return None
            f.times -= 1
            self.fired += 1
            return f

    def _up(self, client: socket.socket, server: socket.socket, state: dict[str, Any]) -> None:
        try:
            while data := client.recv(1 << 16):
                fault = self._match(data)
                if fault is not None and fault.hook is not None:
                    fault.hook()
                if fault is not None and fault.action == "503":
                    client.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    break
                if fault is not None and fault.action in ("cut", "drop"):
                    state["cut"] = fault.after if fault.action == "cut" else 0
                server.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket, state: dict[str, Any]) -> None:
        try:
            while data := server.recv(1 << 16):
                cut = state["cut"]
                if cut is not None and len(data) >= cut:
                    client.sendall(data[:cut])  # then the connection dies mid-answer
                    break
                if cut is not None:
                    state["cut"] = cut - len(data)
                with self.lock:
                    self.bytes_down += len(data)
                client.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def outage(self) -> None:
        """The store goes away as a stopped server does, seen from the client: every open
        connection is cut and new ones are closed unanswered, until `back`. (Stopping
        SeaweedFS itself takes its restart, 20 s here: `test_storage.py` does that once.)"""
        with self.lock:
            self.down = True
            socks, self.socks = self.socks, []
        for s in socks:
            _close(s)

    def back(self) -> None:
        self.down = False

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for s in self.socks:
                _close(s)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.endpoint)
    try:
        yield p
    finally:
        p.close()
