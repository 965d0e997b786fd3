"""NumPy arrays (and ml_dtypes' BF16/F8), including big-endian and strided ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..errors import InvalidInputError
from ..hostcopy import copy_bytes
from ..staging import Allocator, host_view
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self) -> None:
        self._dtypes: dict[np.dtype[Any], DType] = {}  # a lookup per tensor adds up at 20,000

    def dtype(self, x: Any, key: str) -> DType:
        np_dtype = x.dtype if isinstance(x, np.ndarray) else np.asarray(x).dtype
        found = self._dtypes.get(np_dtype)
        if found is None:
            found = self._dtypes[np_dtype] = dtypes.from_numpy(np_dtype, tensor=key)
        return found

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

    def views_host(self, device: Any) -> bool:
        return True

    def host_view(self, x: Any, key: str, dtype: DType) -> np.ndarray | None:
        if isinstance(x, np.ndarray) and x.flags.c_contiguous and x.dtype == dtype.numpy:
            return x
        return None

    def from_host(self, host: np.ndarray, device: Any) -> Any:
        self.check_device(device)
        return host

    def check_device(self, device: Any) -> None:
        if device not in (None, "cpu"):
            raise InvalidInputError(f"NumPy arrays live on the host; device={device!r} is invalid")
