"""Deleting steps on an object store: committed steps commit object first, abandoned
uploads only once their writer's lease has expired."""

from __future__ import annotations

import logging
from typing import Any

from .leases import acquire, lease_number
from .objects import COMMIT_OBJECT, _describe
from .steps import StoredStep, list_steps
from .url import StorageURL

log = logging.getLogger("arrayckpt")


def _delete_all(store: Any, keys: list[str]) -> None:
    import obstore

    for key in keys:
        obstore.delete(store, key)  # a key already gone is no error


def delete_committed(store: Any, step: StoredStep) -> None:
    """Delete a committed step: its commit object first, so that from that instant no
    reader sees the step, then its data objects, then any lease left on it."""
    import obstore

    obstore.delete(store, step.url.key(COMMIT_OBJECT))
    names = step.names()
    data = [step.url.key(n) for n in names if n != COMMIT_OBJECT and lease_number(n) is None]
    _delete_all(store, data)
    _delete_all(store, step.lease_keys())


def clear_step(store: Any, step: StorageURL) -> None:
    """Delete the data objects under uncommitted ``step`` (not its leases); the caller
    holds the step's lease. A commit object is never deleted here (only retention does)."""
    import obstore

    names = [m["path"] for m in obstore.list(store, step.prefix).collect()]
    if step.key(COMMIT_OBJECT) in names:  # committed after all: retention's to delete
        return
    _delete_all(store, [k for k in names if lease_number(k.rsplit("/", 1)[-1]) is None])


def clean_abandoned(store: Any, root: StorageURL, ttl_s: float) -> list[str]:
    """Delete the uncommitted steps under ``root`` whose writer is gone (its lease expired,
    or it died on this machine), taking each one's lease first so that no writer can start
    on it meanwhile. Steps a live writer holds are left alone.

    Returns:
        The URLs of the steps removed.
    """
    removed = []
    for step in list_steps(store, root):
        if step.has_commit:
            continue
        try:
            lease, holder = acquire(store, step.url, ttl_s, wait_s=0.0)
            if lease is None:
                if holder is not None:
                    log.debug("%s is being written: %s", step.url, holder.describe())
                continue
            try:
                clear_step(store, step.url)
            finally:
                lease.release()
        except Exception as exc:  # the next manager tries again; saves are unaffected
            log.warning("could not clean up %s: %s", step.url, _describe(exc))
            continue
        removed.append(str(step.url))
        log.info("removed the abandoned upload %s (no commit object, writer gone)", step.url)
    return removed
