"""CuPy arrays: device-to-host copies into pinned buffers on a side stream."""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..errors import InvalidInputError
from ..snapshot import Allocator, host_view
from .base import Backend


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self) -> None:
        self._streams: dict[int, Any] = {}
        # Device arrays read by copies not yet synchronised. A temporary from
        # `ascontiguousarray` freed early would go back to the current stream's pool and
        # could be overwritten by the next array's work while our side stream still reads it.
        self._sources: list[Any] = []

    def dtype(self, x: Any, key: str) -> DType:
        return dtypes.from_numpy(x.dtype, tensor=key)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def to_host(self, x: Any, key: str, dtype: DType, alloc: Allocator | None) -> np.ndarray:
        x = cupy.ascontiguousarray(x)  # a device-side copy only when `x` is strided
        flat = alloc(x.nbytes, True) if alloc else np.empty(x.nbytes, np.uint8)
        out = host_view(flat, dtype, tuple(x.shape))
        with x.device:
            stream = self._streams.setdefault(x.device.id, cupy.cuda.Stream(non_blocking=True))
            stream.wait_event(cupy.cuda.get_current_stream().record())
            x.get(stream=stream, out=out, blocking=False)
        self._sources.append(x)
        return out

    def synchronize(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()
        self._sources.clear()

    def from_host(self, host: np.ndarray, device: Any) -> Any:
        with self._device(device):
            return cupy.asarray(host)

    def check_device(self, device: Any) -> None:
        self._device(device)

    @staticmethod
    def _device(device: Any) -> Any:
        if device is None:
            return cupy.cuda.Device()
        if isinstance(device, cupy.cuda.Device):
            return device
        if isinstance(device, int):
            return cupy.cuda.Device(device)
        if isinstance(device, str) and device.startswith("cuda"):
            return cupy.cuda.Device(int(device.partition(":")[2] or 0))
        raise InvalidInputError(
            f"{device!r} is not a CuPy device (use an int, 'cuda:N' or a Device)"
        )


def pinned_empty(nbytes: int) -> np.ndarray:
    mem = cupy.cuda.alloc_pinned_memory(max(nbytes, 1))
    return np.frombuffer(mem, np.uint8, nbytes)
