"""Leases on an object store: which writer owns a step that is not committed yet.

A writer creates ``step_X/arrayckpt-lease-<n>.json`` (put only if absent) before its first
data object and renews it while it writes; the highest-numbered lease of a step is its
owner. Taking over an expired lease means creating lease ``n + 1`` (again only if absent),
so of two writers or cleaners that both find a dead owner, exactly one wins.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointWriteError
from ..layout import process_alive
from .objects import COMMIT_OBJECT, _describe
from .url import StorageURL

log = logging.getLogger("arrayckpt")

LEASE_VERSION = 1
_LEASE_OBJECT = re.compile(r"arrayckpt-lease-([0-9]{8})\.json")
#: Largest lease object read back (a few hundred bytes are written).
_MAX_LEASE_BYTES = 64 * 1024


def lease_name(number: int) -> str:
    return f"arrayckpt-lease-{number:08d}.json"


def lease_number(name: str) -> int | None:
    """The number of a lease object's name, or ``None`` for any other name."""
    m = _LEASE_OBJECT.fullmatch(name)
    return int(m[1]) if m else None


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot), so a reused pid is not the owner."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _this_machine() -> dict[str, str]:
    """What makes a pid meaningful: the host, its boot and the pid namespace."""
    return {
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
    }


def owner_identity() -> dict[str, Any]:
    """This process as a lease records it."""
    pid = os.getpid()
    return {**_this_machine(), "pid": pid, "pid_start": _pid_start(pid)}


def owner_dead(doc: dict[str, Any]) -> bool:
    """True when the lease's owner provably ran here (same host, boot, pid namespace) and
    its process is gone: then its lease need not be waited out."""
    here = _this_machine()
    if not here["boot_id"] or any(doc.get(k) != v for k, v in here.items()):
        return False
    pid = doc.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    if pid == os.getpid():
        return doc.get("owner") not in _LIVE_OWNERS
    return not process_alive(pid) or _pid_start(pid) != doc.get("pid_start")


#: Owner ids of the leases this process holds now (a dead manager of this very process
#: leaves leases whose pid is alive: they are judged by this set instead).
_LIVE_OWNERS: set[str] = set()


@dataclass(frozen=True)
class LeaseInfo:
    """One lease object as read back."""

    key: str
    number: int
    doc: dict[str, Any] | None  # None: unreadable or malformed
    age_s: float  # since the server last wrote it

    def expired(self, ttl_s: float, now: float | None = None) -> bool:
        """Whether its owner no longer holds it: past its expiry, or provably dead."""
        now = time.time() if now is None else now
        if self.doc is None:  # tampered with: judged by the object's age alone
            return self.age_s > ttl_s
        expires = self.doc.get("expires_at")
        if not isinstance(expires, (int, float)) or now > expires:
            return True
        return owner_dead(self.doc)

    def describe(self) -> str:
        doc = self.doc or {}
        expires = doc.get("expires_at")
        left = f"{expires - time.time():.0f} s" if isinstance(expires, (int, float)) else "?"
        who = f"host {doc.get('host', '?')}, pid {doc.get('pid', '?')}"
        return f"{self.key} ({who}, expires in {left})"


def read_lease(store: Any, key: str) -> LeaseInfo | None:
    """The lease at ``key``; ``None`` when it is gone. One too large to be ours, or not
    a JSON object, is read as malformed (``doc`` ``None``) without fetching its body."""
    import obstore

    try:
        result = obstore.get(store, key)
        modified = result.meta["last_modified"]
        raw = bytes(result.bytes()) if result.meta["size"] <= _MAX_LEASE_BYTES else b""
    except FileNotFoundError:
        return None
    doc: dict[str, Any] | None = None
    try:
        parsed = json.loads(raw)
        doc = parsed if isinstance(parsed, dict) else None
    except ValueError:
        doc = None
    age = time.time() - modified.timestamp()
    return LeaseInfo(key, lease_number(key.rsplit("/", 1)[-1]) or 0, doc, age)


def step_leases(store: Any, step: StorageURL) -> tuple[bool, list[str]]:
    """Whether ``step`` has a commit object, and its lease keys by number (a fresh listing)."""
    import obstore

    committed, leases = False, []
    for meta in obstore.list(store, step.prefix).collect():
        name = meta["path"][len(step.prefix) + 1 :]
        if name == COMMIT_OBJECT:
            committed = True
        elif lease_number(name) is not None:
            leases.append(meta["path"])
    return committed, sorted(leases)


class LeaseLost(CheckpointWriteError):
    """The lease was taken over or could not be renewed: the step must not be committed."""


class Lease:
    """A lease held on one step; renewed by a daemon thread until `release`."""

    def __init__(self, store: Any, step: StorageURL, number: int, ttl_s: float) -> None:
        self.store, self.step, self.number, self.ttl_s = store, step, number, ttl_s
        self.key = step.key(lease_name(number))
        self.owner = uuid.uuid4().hex
        self.expires_at = self.pending_expiry = 0.0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        self.pending_expiry = time.time() + self.ttl_s
        doc = {
            "version": LEASE_VERSION,
            "owner": self.owner,
            **owner_identity(),
            "ttl_s": self.ttl_s,
            "expires_at": self.pending_expiry,
        }
        return json.dumps(doc, sort_keys=True).encode()

    def create(self) -> bool:
        """Put the lease only if absent; ``False`` when another writer made it first."""
        import obstore

        # live before it is visible: a reader in this process must never judge it dead
        _LIVE_OWNERS.add(self.owner)
        try:
            obstore.put(self.store, self.key, self._doc(), mode="create")
        except Exception as exc:
            _LIVE_OWNERS.discard(self.owner)
            if type(exc).__name__ == "AlreadyExistsError":
                return False
            raise
        self.expires_at = self.pending_expiry
        self._thread = threading.Thread(target=self._renew, name="arrayckpt-lease", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        import obstore

        while not self._stop.wait(self.ttl_s / 4):
            try:
                obstore.put(self.store, self.key, self._doc())
                self.expires_at = self.pending_expiry
            except Exception as exc:  # checked before the commit; a later renewal may succeed
                log.warning("renewing lease %s failed: %s", self.key, _describe(exc))
                if time.time() > self.expires_at:
                    self._error = exc

    def check(self) -> None:
        """Raise `LeaseLost` unless this lease is still the step's newest and unexpired."""
        if self._error is not None or time.time() > self.expires_at:
            raise LeaseLost(
                f"saving {self.step} failed: its lease {self.key} expired before the commit "
                f"(renewal failed: {_describe(self._error) if self._error else 'too slow'}); "
                "the step is left uncommitted; raise lease_ttl_s if saves stall this long"
            )
        _, leases = step_leases(self.store, self.step)
        newest = max((lease_number(k.rsplit("/", 1)[-1]) or 0 for k in leases), default=0)
        if newest != self.number:
            raise LeaseLost(
                f"saving {self.step} failed: another writer took over the step (lease "
                f"{newest} after ours, {self.number}); the step is left to it"
            )

    def release(self, delete: bool = True) -> None:
        """Stop renewing; delete this lease and the older ones (their owners are gone)."""
        import obstore

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _LIVE_OWNERS.discard(self.owner)
        if not delete:
            return
        try:
            _, leases = step_leases(self.store, self.step)
            for key in leases:
                if (lease_number(key.rsplit("/", 1)[-1]) or 0) <= self.number:
                    obstore.delete(self.store, key)
        except Exception as exc:  # an expired lease is harmless: the next cleanup removes it
            log.warning("could not delete lease %s: %s", self.key, _describe(exc))


def acquire(
    store: Any, step: StorageURL, ttl_s: float, wait_s: float
) -> tuple[Lease | None, LeaseInfo | None]:
    """Take the lease of uncommitted ``step``: create lease 1, or take over the newest one
    once it has expired (waiting up to ``wait_s`` for that).

    Returns:
        ``(lease, None)`` when taken; ``(None, holder)`` when a live writer still holds it
        after ``wait_s``; ``(None, None)`` when the step is committed.
    """
    deadline = time.monotonic() + wait_s
    while True:
        committed, leases = step_leases(store, step)
        if committed:
            return None, None
        holder = read_lease(store, leases[-1]) if leases else None
        if leases and holder is None:
            continue  # deleted since the listing (its owner released it): list again
        if holder is not None and not holder.expired(ttl_s):
            if time.monotonic() >= deadline:
                return None, holder
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            continue
        lease = Lease(store, step, holder.number + 1 if holder else 1, ttl_s)
        try:
            created = lease.create()
        except Exception as exc:
            raise CheckpointWriteError(
                f"cannot take the lease of {step}: {_describe(exc)}"
            ) from exc
        if created:
            if holder is not None:
                log.info("took over %s: %s had expired", step, holder.describe())
            return lease, None
