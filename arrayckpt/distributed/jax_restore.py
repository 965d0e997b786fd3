"""Restoring into JAX templates with shardings: each device gets its box of each tensor,
read from only the byte ranges of the saved boxes (or the one saved tensor) it overlaps.

Works on an ordinary checkpoint file and on a distributed checkpoint saved from sharded
arrays (DTensor or jax.Array) at any world size. Each distinct box is read once, however
many devices (replicated mesh axes) hold it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import aliases, format, nested, templates
from ..errors import UnsupportedArrayError
from ..layout import OPTIMIZER_FILE
from .global_shards import PARTS, GlobalTensor, Piece, ReadStats, check_target, plan, read_box
from .global_shards import _read_sub as read_sub
from .jax_arrays import Box, index_box
from .shards import SavedRank, ShardFile
from .trees import merged_tree


class SavedTensor:
    """A saved tensor not yet read: `place` builds it on a template's sharding box by box;
    anything else that asks for its data (``np.asarray``) reads it whole."""

    def __init__(
        self,
        t: GlobalTensor,
        what: str,
        stats: ReadStats,
        verify: bool,
        read_whole: Callable[[], np.ndarray] | None = None,
    ) -> None:
        self.t, self.what, self.stats, self.verify = t, what, stats, verify
        self._read_whole = read_whole  # an open file's own (mapped) read of the tensor

    @property
    def name(self) -> str:
        return self.t.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.t.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.t.dtype.numpy)

    def __repr__(self) -> str:
        return f"<saved tensor {self.t.name!r} {self.t.dtype.code}{list(self.t.shape)}>"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        t = self.t
        if self._read_whole is not None:
            self.stats.bytes_read += math.prod(t.shape) * t.dtype.itemsize
            self.stats.ranges += 1
            whole = self._read_whole()
        elif len(t.pieces) == 1:  # one saved box is the whole tensor: no copy to assemble
            every = tuple(slice(0, n) for n in t.shape)
            whole = read_sub(t.pieces[0], t, every, self.stats, self.verify)
        else:
            whole = read_box(t, (0,) * len(t.shape), t.shape, self.stats, self.verify)
        return whole if dtype is None else whole.astype(dtype)

    def place(self, target: Any) -> Any:
        """A ``jax.Array`` with ``target``'s global shape and sharding (a
        ``jax.ShapeDtypeStruct`` without one: the default device).

        Raises:
            TopologyError: ``target``'s shape is not the saved global shape.
            InvalidInputError: its dtype is not the saved one.
        """
        import jax

        t = self.t
        check_target(target, t.name, t, jax.process_index(), self.what)
        sharding = getattr(target, "sharding", None)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        where = {
            d: index_box(i, t.shape)
            for d, i in sharding.addressable_devices_indices_map(t.shape).items()
        }
        distinct = set(where.values())
        if self.verify and sum(math.prod(b[1]) for b in distinct) == math.prod(t.shape):
            # This process holds all of it (one process driving every device): read each
            # saved box whole, checked against its CRC32C; JAX cuts the devices' boxes.
            return self._checked(jax.device_put(np.asarray(self), sharding))
        boxes: dict[Box, np.ndarray] = {}
        arrays = []
        for device, box in where.items():
            if box not in boxes:
                boxes[box] = read_box(t, box[0], box[1], self.stats, self.verify)
            arrays.append(jax.device_put(boxes[box], device))
        return self._checked(jax.make_array_from_single_device_arrays(t.shape, sharding, arrays))

    def _checked(self, x: Any) -> Any:
        if x.dtype != self.t.dtype.numpy:
            # JAX without x64 turns int64/float64 into 32-bit types without a word.
            raise UnsupportedArrayError(
                f"{self.what}[{self.t.name!r}]: JAX turned the saved {self.t.dtype.code} "
                f"into {x.dtype}; enable 64-bit types (jax_enable_x64)"
            )
        return x


def whole(tree: Any, convert: Callable[[np.ndarray], Any] = lambda a: a) -> Any:
    """``tree`` with every `SavedTensor` read whole (and passed through ``convert``)."""
    if isinstance(tree, SavedTensor):
        return convert(np.asarray(tree))
    if isinstance(tree, dict):
        return {k: whole(v, convert) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(whole(v, convert) for v in tree)
    return tree


def restore_file(
    reader: format.SafetensorsReader, template: Any, *, verify: bool, stats: ReadStats | None
) -> Any:
    """One ordinary checkpoint file restored into the JAX ``template``, box by box; a
    tensor a process needs whole is read through ``reader`` (mapped, unless it was opened
    with ``mmap=False``)."""
    path = reader.path
    file = ShardFile(path)  # its header only: the tensors' bytes are read by box
    what = "optimizer_into" if path.name == OPTIMIZER_FILE else "into"
    stats = ReadStats() if stats is None else stats
    entries = file.entries

    def get(name: str) -> SavedTensor:
        e = entries[name]
        piece = Piece(0, file, (0,) * len(e.shape), tuple(e.shape))
        t = GlobalTensor(name, e.dtype, tuple(e.shape), [piece])
        return SavedTensor(t, what, stats, verify, lambda: reader.array(name, verify=verify))

    tied = aliases.read(file.header.metadata, entries, source=str(path))
    lookup = aliases.resolver(get, tied)
    names = {*entries, *tied}
    tree = nested.tree_text(file.header.metadata, source=str(path))
    state = (
        nested.unflatten(tree, lookup, names, source=str(path))
        if tree is not None
        else {n: lookup(n) for n in [*entries, *tied]}
    )
    return templates.restore(template, state, source=str(path))


def load_parts(
    ranks: Sequence[SavedRank],
    manifests: Sequence[Any],
    targets: Mapping[str, Any],
    convert: Callable[[np.ndarray], Any],
    stats: ReadStats,
    verify: bool,
    source: str,
) -> dict[str, Any]:
    """Each part of a global-shard checkpoint restored into its JAX template, or, with a
    ``None`` template, whole (through ``convert``), in the structure the ranks saved. A part
    ``targets`` does not name is not read (``None``)."""
    out: dict[str, Any] = {}
    for part in PARTS:
        saved = plan(ranks, manifests, part, source) if part in targets else None
        if saved is None:
            out[part] = None
            continue
        what = "into" if part == "model" else "optimizer_into"
        tensors = {n: SavedTensor(t, what, stats, verify) for n, t in saved.items()}
        tree = merged_tree([r.part(part) for r in ranks], set(tensors), part)
        state = (
            tensors
            if tree is None
            else nested.unflatten(
                tree, tensors.__getitem__, set(tensors), source=f"{source} ({part})"
            )
        )
        target = targets.get(part)
        out[part] = (
            whole(state, convert)
            if target is None
            else templates.restore(target, state, source=f"{source} ({part})")
        )
    return out
