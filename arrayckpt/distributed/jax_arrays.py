"""What a sharded ``jax.Array`` holds in this process: its boxes of the global array.

A save copies each addressable shard whose ``replica_id`` is 0 (every replica once) from
its device straight into host memory: no device gathers the array. JAX is never imported
here: a state holds JAX arrays only once the user has imported it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ..dtypes import DType
from ..errors import InvalidInputError
from ..staging import Allocator, host_view

#: A box of the global array: its first index and its shape, per dimension.
Box = tuple[tuple[int, ...], tuple[int, ...]]


def is_sharded(x: Any) -> bool:
    """True for a ``jax.Array`` laid out over more than one device (any sharding,
    replicated mesh axes included)."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(x, jax.Array):
        return False
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return False  # typed keys are saved as their key data (see templates.key_parts)
    return len(x.sharding.device_set) > 1


def index_box(index: Any, shape: tuple[int, ...]) -> Box:
    """The box a shard's ``index`` (slices, as JAX gives them) selects in ``shape``."""
    lo, size = [], []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n)
        lo.append(start)
        size.append(max(0, stop - start))
    return tuple(lo), tuple(size)


def _owned(x: Any) -> list[tuple[Box, Any]]:
    """This process's replica-0 shards of ``x`` that hold elements, with their boxes."""
    shape = tuple(int(d) for d in x.shape)
    found = []
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue  # another device holds the copy that is written
        box = index_box(shard.index, shape)
        if math.prod(box[1]) or not shape:
            found.append((box, shard.data))
    return found


def owned_box(x: Any, name: str, what: str) -> tuple[Any, list[int]] | None:
    """This process's part of ``x`` to write as one box, and its global offset; ``None``
    when another process writes every element this one holds.

    One shard is returned as it is (the snapshot copies it to host memory); several are
    copied, shard by shard, into one host array.

    Raises:
        InvalidInputError: the shards this process writes do not form one box.
    """
    owned = _owned(x)
    if not owned:
        return None
    ndim = len(x.shape)
    lo = tuple(min(b[0][d] for b, _ in owned) for d in range(ndim))
    hi = tuple(max(b[0][d] + b[1][d] for b, _ in owned) for d in range(ndim))
    size = tuple(h - low for h, low in zip(hi, lo, strict=True))
    if sum(math.prod(b[1]) for b, _ in owned) != math.prod(size):
        raise InvalidInputError(
            f"{what}[{name!r}]: this process's shards {[b for b, _ in owned]} of the global "
            f"{list(x.shape)} do not form one box, and each process saves one box per tensor; "
            "order the mesh's devices so that each process's devices are adjacent "
            "(jax.make_mesh does)"
        )
    if len(owned) == 1:
        return owned[0][1], list(lo)
    out = np.empty(size, x.dtype)
    _fill(out, lo, owned)
    return out, list(lo)


def to_host(x: Any, key: str, dtype: DType, alloc: Allocator | None) -> np.ndarray:
    """The whole of ``x`` in host memory (``alloc``'s buffer when given), copied shard by
    shard from the devices.

    Raises:
        InvalidInputError: ``x`` has shards in other processes.
    """
    if not x.is_fully_addressable:
        raise InvalidInputError(
            f"tensor {key!r} is a jax.Array with shards in other processes; save it with "
            "save_distributed_checkpoint on every process (each writes its own shards)"
        )
    shape = tuple(int(d) for d in x.shape)
    if alloc is None:
        out = np.empty(shape, dtype.numpy)
    else:
        out = host_view(alloc(math.prod(shape) * dtype.itemsize, False), dtype, shape)
    _fill(out, (0,) * len(shape), _owned(x))
    return out


def _fill(out: np.ndarray, lo: tuple[int, ...], owned: list[tuple[Box, Any]]) -> None:
    for (start, size), data in owned:
        where = tuple(slice(s - o, s - o + n) for s, o, n in zip(start, lo, size, strict=True))
        out[where] = np.asarray(data)  # one device's shard: a device-to-host copy at most
