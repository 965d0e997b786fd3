"""The steps under a manager root on an object store, listed from the store itself.

Step names are `layout`'s (``step_00000100``); a step is complete only when its commit
object exists and parses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError
from ..layout import parse_step_dir_name
from .leases import lease_number
from .objects import COMMIT_OBJECT, read_commit
from .url import StorageURL

log = logging.getLogger("arrayckpt")

#: Listings made at most while a step seen committed vanishes before its commit is read.
_SETTLE_LISTINGS = 20


@dataclass
class StoredStep:
    """One step prefix under a root, as one listing saw it."""

    name: str
    step: int
    url: StorageURL
    #: obstore's metadata of every object under the step (``path``, ``size``, ...).
    objects: list[dict[str, Any]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [m["path"][len(self.url.prefix) + 1 :] for m in self.objects]

    @property
    def has_commit(self) -> bool:
        return COMMIT_OBJECT in self.names()

    def commit_meta(self) -> dict[str, Any] | None:
        return next((m for m in self.objects if m["path"] == self.url.key(COMMIT_OBJECT)), None)

    def lease_keys(self) -> list[str]:
        return sorted(self.url.key(n) for n in self.names() if lease_number(n) is not None)

    @property
    def nbytes(self) -> int:
        return sum(int(m["size"]) for m in self.objects)

    @property
    def modified(self) -> datetime | None:
        return max((m["last_modified"] for m in self.objects), default=None)


def list_steps(store: Any, root: StorageURL) -> list[StoredStep]:
    """Every step prefix under ``root``, committed or not, by step (one listing).

    Objects of other names (the user's own) are not listed.
    """
    import obstore

    found: dict[str, StoredStep] = {}
    start = len(root.prefix) + 1 if root.prefix else 0
    for meta in obstore.list(store, root.prefix or None).collect():
        name, sep, _ = meta["path"][start:].partition("/")
        step = parse_step_dir_name(name) if sep else None
        if step is None:
            continue
        if name not in found:
            found[name] = StoredStep(name, step, root.child(name))
        found[name].objects.append(dict(meta))
    return sorted(found.values(), key=lambda s: s.step)


class CommitCache:
    """Whether commit objects parse, by e-tag: a committed object never changes in place,
    so each is read once however often the steps are listed."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, str], bool] = {}

    def complete(self, store: Any, step: StoredStep) -> bool | None:
        """True when the commit parses, False when it is malformed, None when it is gone."""
        meta = step.commit_meta()
        if meta is None:
            return None
        key = (meta["path"], str(meta.get("e_tag")))
        if key not in self._parsed:
            try:
                read_commit(store, step.url)
                self._parsed[key] = True
            except CheckpointNotFoundError:
                return None
            except CheckpointError as exc:
                log.warning("%s is not a complete step: %s", step.url, exc)
                self._parsed[key] = False
        return self._parsed[key]


def complete_steps(store: Any, root: StorageURL, cache: CommitCache) -> list[StoredStep]:
    """The complete steps under ``root``, oldest first.

    A listing is no snapshot: retention may delete the step it saw committed before its
    commit is read, while the step committed before that deletion was listed too early.
    Whenever a listed commit vanished, list again, so a step complete at every instant
    is never missed.
    """
    steps: list[StoredStep] = []
    for _ in range(_SETTLE_LISTINGS):
        listed = [s for s in list_steps(store, root) if s.has_commit]
        states = [cache.complete(store, s) for s in listed]
        steps = [s for s, ok in zip(listed, states, strict=True) if ok]
        if None not in states:
            break
    return steps
