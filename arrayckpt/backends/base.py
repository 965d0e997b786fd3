"""The adapter interface every framework backend implements."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..dtypes import DType
from ..staging import Allocator


class Backend(ABC):
    """Moves one framework's arrays to host memory and back.

    Backends know nothing about files: they produce and consume C-contiguous,
    little-endian NumPy arrays (`HostTensor.data`).
    """

    name: str

    @abstractmethod
    def dtype(self, x: Any, key: str) -> DType:
        """The safetensors dtype of ``x``; `UnsupportedArrayError` naming ``key`` if none."""

    @abstractmethod
    def shape(self, x: Any) -> tuple[int, ...]: ...

    @abstractmethod
    def to_host(self, x: Any, key: str, dtype: DType, alloc: Allocator | None) -> np.ndarray:
        """Copy ``x`` into host memory from ``alloc`` (or, with ``alloc=None``, return a
        host view of it when one exists without copying).

        A device backend may issue the copy asynchronously; the bytes are valid after
        `synchronize`.
        """

    def host_view(self, x: Any, key: str, dtype: DType) -> np.ndarray | None:
        """``x``'s own bytes in host memory as a C-contiguous, little-endian array of
        ``dtype``, without a copy; ``None`` when reading it takes a copy (a device array, a
        strided or byte-swapped one). A save with a staging budget writes such views
        straight from the caller's memory (see `snapshot.start_snapshot`)."""
        return None

    def stages_pinned(self, x: Any) -> bool:
        """Whether `to_host` copies ``x`` into pinned (page-locked) staging memory."""
        return False

    def immutable_host_view(self, x: Any, dtype: DType) -> np.ndarray | None:
        """``x``'s bytes in host memory without a copy, when ``x`` can never change (so a
        snapshot may hold it instead of a copy); ``None`` otherwise (the default)."""
        return None

    #: For an ``x`` that `immutable_host_view` gave a view of, the same view again: none
    #: of its checks can change their answer for that ``x`` (a C function where possible,
    #: as a snapshot maps it over every array of a state).
    immutable_view_again: Any = None

    def synchronize(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Wait for every copy `to_host` issued (a no-op for host frameworks)."""

    @abstractmethod
    def from_host(self, host: np.ndarray, device: Any) -> Any:
        """An array of this framework, on ``device``, holding ``host``'s values.

        May share memory with ``host`` when ``device`` is the host.
        """

    def views_host(self, device: Any) -> bool:
        """Whether `from_host` arrays for ``device`` view the host bytes they are given
        (then a load keeps those bytes); ``False``, the default, when they are copies."""
        return False

    def check_device(self, device: Any) -> None:  # noqa: B027 - optional hook
        """Raise `InvalidInputError` early for a device this framework cannot place on."""


class SideStreamBackend(Backend):
    """A GPU backend whose copies to host run on side streams (one per device), with one
    synchronisation per snapshot.

    Device arrays read by copies not yet synchronised are kept alive until then
    (`_keep_until_synchronized`): a temporary (a contiguous copy, a resolved conjugate)
    freed early goes back to the caller's stream's memory pool, which could hand it to the
    next array's work while the side stream still reads it. Per thread: one thread's
    `synchronize` must not drop another's in-flight sources.
    """

    def __init__(self) -> None:
        self._streams: dict[Any, Any] = {}
        self._local = threading.local()

    def _keep_until_synchronized(self, x: Any) -> None:
        sources: list[Any] | None = getattr(self._local, "sources", None)
        if sources is None:
            sources = self._local.sources = []
        sources.append(x)

    def synchronize(self) -> None:
        for stream in list(self._streams.values()):
            stream.synchronize()
        self._local.sources = []
