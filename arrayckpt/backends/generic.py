"""Any other array-API or DLPack array (JAX, array_api_strict, ...), through NumPy."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..errors import InvalidInputError, UnsupportedArrayError
from ..staging import Allocator
from .base import Backend
from .numpy import NumpyBackend

_NUMPY = NumpyBackend()

#: Shardings `GenericBackend._on_one_cpu` remembers before it starts again (a process
#: uses a few; this bounds one that makes many).
_MAX_SHARDINGS = 256


def _as_numpy(x: Any, key: str) -> np.ndarray:
    # `__array__` / the buffer protocol cover JAX (with BF16) and most libraries; DLPack
    # covers the strict ones that refuse implicit conversion.
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError):
        pass
    try:
        return np.from_dlpack(x)
    except (TypeError, ValueError, RuntimeError, BufferError) as exc:
        raise UnsupportedArrayError(
            f"tensor {key!r}: cannot read a {type(x).__module__}.{type(x).__qualname__} "
            f"into host memory ({exc})"
        ) from exc


def _shares_memory(view: np.ndarray, x: Any) -> bool:
    """Whether ``view`` is ``x``'s memory rather than a copy NumPy made of it."""
    try:
        again = np.from_dlpack(x)
    except (TypeError, ValueError, RuntimeError, BufferError, AttributeError):
        again = np.asarray(x)
    return bool(again.size == 0 or np.shares_memory(view, again))


class GenericBackend(Backend):
    name = "array-api"

    def __init__(self, xp: ModuleType | None = None) -> None:
        self.xp = xp
        # str() of a NumPy dtype (what JAX arrays have) takes ~4 us: a save of 200 JAX
        # arrays spent most of its stall there. Only NumPy dtypes are kept: they are
        # immutable values whose equality (byte order included) decides their name.
        self._dtypes: dict[np.dtype[Any], DType] = {}
        self._one_cpu: dict[Any, bool] = {}

    def dtype(self, x: Any, key: str) -> DType:
        dt = x.dtype
        if isinstance(dt, np.dtype):
            found = self._dtypes.get(dt)
            if found is None:
                found = self._dtypes[dt] = dtypes.from_name(str(dt), tensor=key)
            return found
        return dtypes.from_name(str(dt), tensor=key)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(map(int, x.shape))

    def to_host(self, x: Any, key: str, dtype: DType, alloc: Allocator | None) -> np.ndarray:
        from ..distributed import jax_arrays

        if jax_arrays.is_sharded(x):
            # each shard straight into the buffer: np.asarray would assemble a whole copy first
            return jax_arrays.to_host(x, key, dtype, alloc)
        return _NUMPY.to_host(_as_numpy(x, key), key, dtype, alloc)

    def host_view(self, x: Any, key: str, dtype: DType) -> np.ndarray | None:
        if type(x).__module__.partition(".")[0] in ("jax", "jaxlib"):
            # JAX arrays in host memory are held as they are (`immutable_host_view`); any
            # other JAX array is on a device or sharded, and reading it is a copy
            return None
        try:
            view = _as_numpy(x, key)
        except UnsupportedArrayError:
            return None
        # np.asarray may copy (a device array, a library without a buffer export): only
        # memory the array itself owns counts as a view.
        return _NUMPY.host_view(view, key, dtype) if _shares_memory(view, x) else None

    #: NumPy views a JAX buffer without a copy (and keeps it alive while it does).
    immutable_view_again = staticmethod(np.asarray)

    def immutable_host_view(self, x: Any, dtype: DType) -> np.ndarray | None:
        # A jax.Array never changes after it is made, and while NumPy views its buffer
        # JAX keeps it alive (donating or deleting the array does not free it), so a
        # snapshot may hold the view: no copy, no staging. Only for one host-memory buffer:
        # a sharded or device array needs assembling or a transfer, which is a copy anyway.
        if type(x).__module__.partition(".")[0] not in ("jax", "jaxlib"):
            return None
        try:
            if not self._on_one_cpu(x.sharding) or x.is_deleted():
                return None
            view = self.immutable_view_again(x)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return None
        if (view.dtype is not dtype.numpy and view.dtype != dtype.numpy) or not (
            view.flags.c_contiguous
        ):
            return None
        return view

    def _on_one_cpu(self, sharding: Any) -> bool:
        """Whether ``sharding`` places an array in one buffer in host memory; remembered
        per sharding (immutable, hashable values that the arrays of a state share), since
        reading its device set took a microsecond per array of every save."""
        found = self._one_cpu.get(sharding)
        if found is None:
            devices = sharding.device_set
            found = len(devices) == 1 and next(iter(devices)).platform == "cpu"
            if len(self._one_cpu) >= _MAX_SHARDINGS:
                self._one_cpu.clear()
            self._one_cpu[sharding] = found
        return found

    def from_host(self, host: np.ndarray, device: Any) -> Any:
        xp = self.xp
        assert xp is not None, "a GenericBackend for loading needs its namespace"
        try:
            arr = xp.asarray(host)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UnsupportedArrayError(
                f"{xp.__name__} cannot hold dtype {host.dtype} ({exc}); load with xp=numpy"
            ) from exc
        if str(arr.dtype).rsplit(".", 1)[-1] != host.dtype.name:
            # JAX without x64 turns int64/float64 into 32-bit types without a word.
            raise UnsupportedArrayError(
                f"{xp.__name__} turned dtype {host.dtype} into {arr.dtype}; load with "
                "xp=numpy (or, for JAX, enable 64-bit types: jax_enable_x64)"
            )
        if device is not None:
            import array_api_compat

            try:
                arr = array_api_compat.to_device(arr, device)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidInputError(f"cannot move arrays to device {device!r}: {exc}") from exc
        return arr
