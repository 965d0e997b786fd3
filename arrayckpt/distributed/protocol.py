"""The coordinated commit of a distributed save: one protocol for every medium.

1. Rank 0 opens the step (a temporary directory on a file system; on an object store, a
   check that the step is not committed yet) and broadcasts the go-ahead, with what the
   ranks need to write (the temporary's path), or the reason it refused.
2. Every rank writes its part and reports to rank 0 (its manifest, its objects), also after
   its own failure, so that all ranks raise at once instead of waiting for one that gave up.
3. Rank 0 checks the reports and commits (``sharding_meta.json`` and the rename, or the
   commit object), then broadcasts the decision.

What differs between media is a `Medium`; the exchanges, their order and the errors every
rank raises are here only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, CheckpointWriteError
from .coordinator import Coordinator

log = logging.getLogger("arrayckpt")

Start = dict[str, Any]
Report = dict[str, Any]


@dataclass(frozen=True)
class Medium:
    """What a coordinated save does on one medium."""

    #: The step, as messages name it (a path or a URL).
    where: str
    #: What a rank does to its part, for messages ("writing", "uploading").
    verb: str
    #: On rank 0: run ``body(start)`` inside the step's frame (e.g. `commit_directory`'s
    #: temporary directory); the step is committed once it returns, and not if it raises.
    open_step: Callable[[Callable[[Start], None]], object]
    #: On every rank: write this rank's part; the report's fields (its manifest, ...).
    write_part: Callable[[Start], Report]
    #: On rank 0, inside the frame: check every rank's report and write the commit record.
    commit: Callable[[Start, list[Report]], None]


def run(coord: Coordinator, medium: Medium, sharding: Any, timeout: float | None) -> None:
    """Take part in one coordinated save as ``coord.rank``; return once it is committed.

    Args:
        sharding: this rank's view of the save's sharding (a JSON value), which every rank
            reports so rank 0 can check that all passed the same.

    Raises:
        CheckpointError: the save failed on some rank, or a rank vanished (the coordinator's
            own error, naming the ranks, with the step added); nothing was committed.
    """
    if coord.rank == 0:
        _as_root(coord, medium, sharding, timeout)
    else:
        _as_peer(coord, medium, sharding, timeout)


def _as_root(coord: Coordinator, m: Medium, sharding: Any, timeout: float | None) -> None:
    reason = ""  # what the other ranks are told when the save fails

    def body(start: Start) -> None:
        nonlocal reason
        _exchange(coord, m, coord.broadcast, json.dumps({"ok": True, **start}).encode(), timeout)
        own, report = _write(m, start, sharding)
        reports = _exchange(coord, m, coord.gather, json.dumps(report).encode(), timeout)
        assert reports is not None  # rank 0 receives every rank's report
        if own is not None:
            reason = f"rank 0 failed: {_describe(own)}"
            _raise_own(coord.rank, m, own)
        try:
            m.commit(start, [json.loads(r) for r in reports])
        except CheckpointError as exc:
            reason = str(exc)
            told = "nothing was committed" in reason  # the cause says so already
            tail = "" if told else "; nothing was committed"
            raise type(exc)(f"saving {m.where} failed: {exc}{tail}") from None

    try:
        m.open_step(body)
    except BaseException as exc:
        # Before the go-ahead the others wait for it; afterwards for the decision. Either
        # way, tell them rather than let them time out.
        decision = {"ok": False, "error": reason or f"rank 0 failed: {_describe(exc)}"}
        try:
            coord.broadcast(json.dumps(decision).encode(), timeout)
        except CheckpointError as lost:
            log.error("could not tell every rank that saving %s failed: %s", m.where, lost)
        raise
    try:
        coord.broadcast(json.dumps({"ok": True}).encode(), timeout)
    except CheckpointError as exc:  # committed: the step is complete whatever a rank heard
        log.error("%s is committed, but not every rank could be told: %s", m.where, exc)


def _as_peer(coord: Coordinator, m: Medium, sharding: Any, timeout: float | None) -> None:
    rank = coord.rank
    start = json.loads(_exchange(coord, m, coord.broadcast, None, timeout))
    if not start["ok"]:
        raise CheckpointWriteError(
            f"rank {rank}: saving {m.where} failed before any rank wrote: {start['error']}; "
            "nothing was committed"
        )
    own, report = _write(m, start, sharding)
    _exchange(coord, m, coord.gather, json.dumps(report).encode(), timeout)
    decision = json.loads(_exchange(coord, m, coord.broadcast, None, timeout, last=True))
    if own is not None:
        _raise_own(rank, m, own)
    if not decision["ok"]:
        raise CheckpointWriteError(
            f"rank {rank}: saving {m.where} failed: {decision['error']}; nothing was committed"
        )


def _write(m: Medium, start: Start, sharding: Any) -> tuple[BaseException | None, Report]:
    try:
        return None, {"ok": True, "sharding": sharding, **m.write_part(start)}
    except BaseException as exc:  # even Ctrl-C: tell rank 0 rather than leave it waiting
        return exc, {"ok": False, "error": _describe(exc)}


def _raise_own(rank: int, m: Medium, own: BaseException) -> None:
    if isinstance(own, CheckpointError) or not isinstance(own, Exception):
        raise own
    raise CheckpointWriteError(
        f"rank {rank}: {m.verb} its part of {m.where} failed: {own}; nothing was committed"
    ) from own


def _exchange(
    coord: Coordinator,
    m: Medium,
    call: Callable[[Any, float | None], Any],
    payload: bytes | None,
    timeout: float | None,
    *,
    last: bool = False,
) -> Any:
    """One exchange with the other ranks; a rank that crashed, hangs or lost its connection
    fails it with the coordinator's error (naming the ranks), the step added."""
    try:
        return call(payload, timeout)
    except CheckpointError as exc:
        outcome = (
            "rank 0 may have committed the step before the decision was lost: load it to find out"
            if last
            else "nothing was committed (the previous steps are intact)"
        )
        raise type(exc)(f"rank {coord.rank}: saving {m.where} failed: {exc}; {outcome}") from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
