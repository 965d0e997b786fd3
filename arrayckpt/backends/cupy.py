"""CuPy arrays: device-to-host copies into pinned buffers on a side stream."""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..errors import InvalidInputError, UnsupportedArrayError
from ..staging import Allocator, host_view
from .base import SideStreamBackend

#: NumPy dtype kinds CuPy arrays can hold; ml_dtypes' BF16 and float8 types (kind "V")
#: have no CuPy counterpart.
_CUPY_KINDS = frozenset("biufc")


class CupyBackend(SideStreamBackend):
    name = "cupy"

    def dtype(self, x: Any, key: str) -> DType:
        return dtypes.from_numpy(x.dtype, tensor=key)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def stages_pinned(self, x: Any) -> bool:
        return True

    def to_host(self, x: Any, key: str, dtype: DType, alloc: Allocator | None) -> np.ndarray:
        with x.device:
            x = cupy.ascontiguousarray(x)  # a device-side copy only when `x` is strided
            flat = alloc(x.nbytes, True) if alloc else np.empty(x.nbytes, np.uint8)
            out = host_view(flat, dtype, tuple(x.shape))
            stream = self._streams.get(x.device.id)
            if stream is None:  # one side stream per device, made once
                stream = self._streams[x.device.id] = cupy.cuda.Stream(non_blocking=True)
            # Order the copy after the work that produced `x` on the caller's stream.
            stream.wait_event(cupy.cuda.get_current_stream().record())
            x.get(stream=stream, out=out, blocking=False)
        self._keep_until_synchronized(x)
        return out

    def from_host(self, host: np.ndarray, device: Any) -> Any:
        if host.dtype.kind not in _CUPY_KINDS:
            code = dtypes.from_numpy(host.dtype, tensor="?").code
            raise UnsupportedArrayError(
                f"CuPy has no dtype for {code}; load it with xp=torch (device='cuda:0') or xp=numpy"
            )
        with self._device(device):
            # Blocking: `host` is usually a temporary view of the file's mapping, unmapped
            # once the last view is freed; CuPy's default copy may still be reading it then.
            return cupy.asarray(host, blocking=True)

    def check_device(self, device: Any) -> None:
        self._device(device)

    @staticmethod
    def _device(device: Any) -> Any:
        if device is None:
            return cupy.cuda.Device()
        if isinstance(device, cupy.cuda.Device):
            index = device.id
        elif isinstance(device, int) and not isinstance(device, bool):
            index = device
        elif isinstance(device, str) and device.partition(":")[0] == "cuda":
            number = device.partition(":")[2]
            if number and not number.isdigit():
                raise InvalidInputError(f"{device!r} is not a CuPy device (use 'cuda:N')")
            index = int(number or 0)
        else:
            raise InvalidInputError(
                f"{device!r} is not a CuPy device (use an int, 'cuda:N' or a Device)"
            )
        count = cupy.cuda.runtime.getDeviceCount()
        if not 0 <= index < count:
            raise InvalidInputError(
                f"device {device!r} is out of range: CuPy sees {count} CUDA device(s)"
            )
        return cupy.cuda.Device(index)


def pinned_empty(nbytes: int) -> np.ndarray:
    """Page-locked host memory; the array keeps CuPy's pinned allocation alive."""
    mem = cupy.cuda.alloc_pinned_memory(max(nbytes, 1))
    return np.frombuffer(mem, np.uint8, nbytes)
