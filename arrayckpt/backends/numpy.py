"""NumPy arrays (and ml_dtypes' BF16/F8), including big-endian and strided ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..errors import InvalidInputError
from ..hostcopy import copy_bytes
from ..snapshot import Allocator, host_view
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"

    def dtype(self, x: Any, key: str) -> DType:
        return dtypes.from_numpy(np.asarray(x).dtype, tensor=key)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(np.shape(x))

    def to_host(self, x: Any, key: str, dtype: DType, alloc: Allocator | None) -> np.ndarray:
        x = np.asarray(x)
        if alloc is None:
            if x.flags.c_contiguous and x.dtype == dtype.numpy:
                return x
            out = np.empty(x.shape, dtype.numpy)
        else:
            flat = alloc(x.nbytes, False)
            out = host_view(flat, dtype, x.shape)
            if x.flags.c_contiguous and x.dtype == dtype.numpy:
                copy_bytes(flat, x.reshape(-1).view(np.uint8))
                return out
        # `equiv` casting converts big-endian to little-endian and nothing else.
        np.copyto(out, x, casting="equiv")
        return out

    def from_host(self, host: np.ndarray, device: Any) -> Any:
        self.check_device(device)
        return host

    def check_device(self, device: Any) -> None:
        if device not in (None, "cpu"):
            raise InvalidInputError(f"NumPy arrays live on the host; device={device!r} is invalid")
