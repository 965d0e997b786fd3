"""A `CheckpointManager` root on an object store: steps listed from the store, each saved
under its writer's lease, retention commit object first, abandoned uploads cleaned."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError, CheckpointWriteError, InvalidInputError
from ..layout import step_dir_name
from ..snapshot import Snapshot
from . import objects
from .leases import Lease, LeaseLost, acquire
from .objects import _describe
from .retention import clean_abandoned, clear_step, delete_committed
from .steps import CommitCache, StoredStep, complete_steps, list_steps
from .url import StorageURL, parse_url

log = logging.getLogger("arrayckpt")


class ObjectRoot:
    """The steps under ``location`` (``s3://bucket/run``) on an object store."""

    def __init__(
        self, location: str, storage_options: Mapping[str, Any] | None, lease_ttl_s: float
    ) -> None:
        self.url: StorageURL = parse_url(location)
        self.options = dict(storage_options or {})
        self.store = objects.open_store(self.url, self.options)
        self.lease_ttl_s = lease_ttl_s
        self._commits = CommitCache()

    def __str__(self) -> str:
        return str(self.url)

    def location(self, step: int) -> str:
        return str(self.url.child(step_dir_name(step)))

    def complete(self) -> list[StoredStep]:
        objects.check_same_process(self.url)
        try:
            return complete_steps(self.store, self.url, self._commits)
        except Exception as exc:
            raise _unreachable(self.url, exc) from exc

    def steps(self) -> list[int]:
        """The complete steps, oldest first."""
        return [s.step for s in self.complete()]

    def is_complete(self, step: int) -> bool:
        return step in self.steps()

    def delete(self, step: int) -> None:
        """Delete committed ``step``: commit object first, then its data and leases.

        Raises:
            CheckpointError: a request failed (the step may be left uncommitted: readers
                no longer see it, and the next cleanup removes the rest).
        """
        objects.check_same_process(self.url)
        try:
            for stored in list_steps(self.store, self.url):
                if stored.step == step:
                    delete_committed(self.store, stored)
        except Exception as exc:
            raise _unreachable(self.url.child(step_dir_name(step)), exc) from exc

    def cleanup(self) -> list[str]:
        """Remove the abandoned uploads under the root (see `clean_abandoned`)."""
        objects.check_same_process(self.url)
        try:
            return clean_abandoned(self.store, self.url, self.lease_ttl_s)
        except Exception as exc:
            raise _unreachable(self.url, exc) from exc

    def write(self, step: int, snap: Snapshot) -> str:
        """Save ``snap`` as ``step`` under the step's lease, renewed while it uploads.

        A lease a live writer holds is waited for up to twice the lease lifetime (a writer
        that crashed on another machine holds it until it expires).

        Raises:
            InvalidInputError: the step is committed already.
            CheckpointWriteError: another live writer holds the step, the lease was lost,
                or an upload failed; no commit object is written then.
        """
        from ..save import object_files

        target = self.url.child(step_dir_name(step))
        objects.check_same_process(target)
        lease, holder = acquire(self.store, target, self.lease_ttl_s, wait_s=2 * self.lease_ttl_s)
        if lease is None:
            if holder is None:
                raise InvalidInputError(
                    f"{target} already holds a committed checkpoint; save a later step"
                )
            raise CheckpointWriteError(
                f"cannot save {target}: another live writer holds its lease "
                f"{holder.describe()}; two managers are saving the same step"
            )
        try:
            clear_step(self.store, target)  # what a writer that crashed on this step left
            done = objects.save_files(
                str(target), object_files(snap), self.options, before_commit=lease.check
            )
        except LeaseLost:
            lease.release(delete=False)  # the step and its objects are the new owner's now
            raise
        except BaseException:
            self._abandon(lease, target)
            raise
        lease.release()
        return done

    def _abandon(self, lease: Lease, target: StorageURL) -> None:
        """After a failed save: remove what it uploaded, only while the lease is still ours."""
        try:
            lease.check()
            clear_step(self.store, target)
        except LeaseLost:
            lease.release(delete=False)
            return
        except Exception as exc:  # the server is gone: the lease expires, cleanup follows
            log.warning("could not remove the uncommitted %s: %s", target, exc)
        lease.release()


def _unreachable(url: StorageURL, exc: Exception) -> Exception:
    if isinstance(exc, CheckpointError):
        return exc
    return CheckpointError(f"a request to {url} failed: {_describe(exc)}")
