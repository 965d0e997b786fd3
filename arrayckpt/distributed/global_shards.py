"""Sharded arrays (torch DTensor, jax.Array) saved as boxes of one global tensor, read by box.

Each saved rank writes, under the tensor's own name, the one box of the global tensor it
owns (replicas once: the rank at coordinate 0 of every replicated mesh dimension), and
its manifest in ``sharding_meta.json`` records ``global_shape`` and ``global_offset``.
A load reads, for each target box, only the byte ranges of the saved boxes that overlap it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import nested
from ..dtypes import BY_CODE, DType, from_name
from ..errors import CorruptCheckpointError, InvalidInputError, TopologyError
from . import jax_arrays
from .shards import SavedRank, ShardFile
from .trees import merged_tree

PARTS = ("model", "optimizer")
#: Manifest fields a sharded-array save adds to each tensor (boostr's fields are untouched).
GLOBAL_SHAPE, GLOBAL_OFFSET = "global_shape", "global_offset"


def _dtensor_type() -> Any:
    # Only a DTensor that already exists can be in the state: never import torch to ask.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def has_sharded(*states: Any) -> bool:
    """True when a state (a flat mapping or a nested one) holds a torch DTensor or a
    ``jax.Array`` over several devices."""
    dt = _dtensor_type()
    if dt is None and "jax" not in sys.modules:
        return False
    found = False

    def look(name: str, v: Any) -> Any:
        nonlocal found
        found = found or (dt is not None and isinstance(v, dt)) or jax_arrays.is_sharded(v)
        return v

    for s in states:
        if s is not None:
            nested.map_arrays(s, look)
    return found


def localize(state: Any, rank: int, what: str) -> tuple[Any, dict[str, dict[str, list[int]]]]:
    """This rank's boxes of ``state`` to write, and each written box's global facts.

    ``state`` may be nested (an FSDP2 ``optimizer.state_dict()``): it keeps its
    structure, each DTensor replaced by its local tensor when this rank is its box's
    writer and left out otherwise (a sharded ``jax.Array`` by this process's shards of
    replica 0, see `jax_arrays.owned_box`); facts are keyed by the tensor names
    `nested.flatten` gives. A plain array is taken as replicated (rank 0 writes it); scalars stay on
    every rank.

    Raises:
        InvalidInputError: a ``Partial`` placement (not yet reduced).
    """
    if state is None:
        return None, {}
    dt = _dtensor_type()
    facts: dict[str, dict[str, list[int]]] = {}

    def own(name: str, v: Any) -> Any:
        if dt is not None and isinstance(v, dt):
            box = _dtensor_box(v, name, what)
            if box is None:
                return nested.DROP
            local, offset = box
        elif jax_arrays.is_sharded(v):
            box = jax_arrays.owned_box(v, name, what)
            if box is None:
                return nested.DROP
            local, offset = box
        elif rank == 0:
            local, offset = v, [0] * len(getattr(v, "shape", ()))
        else:
            return nested.DROP
        facts[name] = {GLOBAL_SHAPE: [int(d) for d in v.shape], GLOBAL_OFFSET: offset}
        return local

    return nested.map_arrays(state, own), facts


def _dtensor_box(v: Any, name: str, what: str) -> tuple[Any, list[int]] | None:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(v.placements)
    if any(p.is_partial() for p in placements):
        raise InvalidInputError(
            f"{what}[{name!r}] is a DTensor with a Partial placement {placements}: reduce it "
            "(redistribute to Shard or Replicate) before saving"
        )
    mesh = v.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        return None  # this rank is not in the tensor's mesh
    if any(p.is_replicate() and c != 0 for p, c in zip(placements, coord, strict=True)):
        return None  # another rank writes this replica
    shape, offset = compute_local_shape_and_global_offset(v.shape, mesh, placements)
    local = v.to_local()
    if math.prod(shape) == 0:
        return None  # an uneven split left this rank nothing
    if tuple(local.shape) != tuple(shape):
        raise InvalidInputError(
            f"{what}[{name!r}]: local shard {tuple(local.shape)} is not the {tuple(shape)} its "
            f"placements {placements} give; strided shards are not supported"
        )
    return local, [int(o) for o in offset]


@dataclass
class ReadStats:
    """Bytes and byte ranges a load read from tensor data (headers excluded)."""

    bytes_read: int = 0
    ranges: int = 0


@dataclass(frozen=True)
class Piece:
    rank: int
    file: ShardFile
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass
class GlobalTensor:
    """One tensor as the saved ranks hold it: its global shape and dtype, and the boxes."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)


def is_global(manifests: Sequence[Any] | None) -> bool:
    """True when a coordinated save recorded global boxes (a sharded-array checkpoint)."""
    return bool(manifests) and any(
        isinstance(m, dict)
        and any(
            isinstance(f, dict) and GLOBAL_SHAPE in f
            for part in PARTS
            for f in (m.get(part) or {}).values()
        )
        for m in manifests or ()
    )


def plan(
    ranks: Sequence[SavedRank], manifests: Sequence[Any], part: str, source: str
) -> dict[str, GlobalTensor] | None:
    """Every tensor of ``part``, checked to be covered exactly once by its saved boxes.

    Raises:
        CorruptCheckpointError: naming the tensor and the ranks, when boxes disagree in
            dtype or global shape, or do not cover the tensor (a rank is missing).
    """
    out: dict[str, GlobalTensor] = {}
    for saved, m in zip(ranks, manifests, strict=True):
        for name, f in (m.get(part) or {}).items():
            file = saved.part(part)
            assert file is not None  # check_manifest found the file the manifest lists
            dtype, gshape = BY_CODE[f["dtype"]], tuple(f[GLOBAL_SHAPE])
            t = out.setdefault(name, GlobalTensor(name, dtype, gshape))
            if (t.dtype, t.shape) != (dtype, gshape):
                raise CorruptCheckpointError(
                    f"{source}: {part} tensor {name!r}: rank_{saved.rank} saved a box of "
                    f"{dtype.code}{list(gshape)}, rank_{t.pieces[0].rank} of "
                    f"{t.dtype.code}{list(t.shape)}; the ranks did not save one tensor"
                )
            t.pieces.append(Piece(saved.rank, file, tuple(f[GLOBAL_OFFSET]), tuple(f["shape"])))
    for t in out.values():
        covered = sum(math.prod(p.shape) for p in t.pieces)
        if covered != math.prod(t.shape):
            raise CorruptCheckpointError(
                f"{source}: {part} tensor {t.name!r} {list(t.shape)}: the boxes saved by ranks "
                f"{[p.rank for p in t.pieces]} cover {covered} of {math.prod(t.shape)} elements; "
                "a rank's shard is missing or duplicated"
            )
    return out or None


def read_box(
    t: GlobalTensor, lo: Sequence[int], shape: Sequence[int], stats: ReadStats, verify: bool
) -> np.ndarray:
    """The box of ``t`` at ``lo`` with ``shape``, reading only overlapping byte ranges."""
    out = np.empty(tuple(shape), t.dtype.numpy)
    for p in t.pieces:
        a = [max(x, o) for x, o in zip(lo, p.offset, strict=True)]
        b = [min(x + n, o + m) for x, n, o, m in zip(lo, shape, p.offset, p.shape, strict=True)]
        if any(i >= j for i, j in zip(a, b, strict=True)) and t.shape:
            continue
        src = tuple(slice(i - o, j - o) for i, j, o in zip(a, b, p.offset, strict=True))
        dst = tuple(slice(i - x, j - x) for i, j, x in zip(a, b, lo, strict=True))
        out[dst] = _read_sub(p, t, src, stats, verify)
    return out


def _read_sub(
    p: Piece, t: GlobalTensor, box: tuple[slice, ...], stats: ReadStats, verify: bool
) -> np.ndarray:
    """``box`` of piece ``p``'s saved tensor: the whole tensor (verified) or its rows."""
    sub = tuple(s.stop - s.start for s in box)
    if sub == p.shape:
        stats.bytes_read += math.prod(sub) * t.dtype.itemsize
        stats.ranges += 1
        return p.file.read(t.name, verify=verify)
    # Runs are contiguous over the trailing dimensions the box spans whole.
    k = len(sub) - 1
    while k > 0 and sub[k] == p.shape[k]:
        k -= 1
    item = t.dtype.itemsize
    strides = [math.prod(p.shape[d + 1 :]) * item for d in range(len(sub))]
    run = sub[k] * strides[k]
    e = p.file.entries[t.name]
    starts = [e.start + box[k].start * strides[k]]
    for d in range(k - 1, -1, -1):
        starts = [s + (box[d].start + i) * strides[d] for i in range(sub[d]) for s in starts]
        # ``starts`` is built innermost-last so the runs come out in file order
    starts.sort()
    buf = np.empty(len(starts) * run, np.uint8)
    p.file._fill([(s, run) for s in starts], buf.data)
    stats.bytes_read += len(buf)
    stats.ranges += len(starts)
    return buf.view(t.dtype.numpy).reshape(sub)


def target_box(
    target: Any, name: str, t: GlobalTensor, rank: int, what: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The global offset and shape of ``target``'s local data, after checking it fits ``t``.

    Raises:
        TopologyError: the target's global shape differs from the saved one.
        InvalidInputError: the target's dtype differs.
    """
    gshape = tuple(int(d) for d in target.shape)
    if gshape != t.shape:
        bigger = math.prod(gshape) > math.prod(t.shape)
        raise TopologyError(
            f"{what}[{name!r}] on rank {rank}: the target's global shape {list(gshape)} "
            f"{'is larger than' if bigger else 'differs from'} the saved {list(t.shape)} "
            f"(saved by ranks {sorted({p.rank for p in t.pieces})}); build the model with "
            "the saved shapes"
        )
    code = _dtype_code(target, name)
    if code is not None and code != t.dtype.code:
        raise InvalidInputError(
            f"{what}[{name!r}] on rank {rank}: the target is {code}, the checkpoint holds "
            f"{t.dtype.code}; cast after loading or build the target with the saved dtype"
        )
    dt = _dtensor_type()
    if dt is not None and isinstance(target, dt):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, tuple(target.placements)
        )
        return tuple(offset), tuple(shape)
    return (0,) * len(gshape), gshape


def _dtype_code(x: Any, name: str) -> str | None:
    dtype = getattr(x, "dtype", None)
    return None if dtype is None else from_name(str(dtype), tensor=name).code


def load_boxes(
    ranks: Sequence[SavedRank],
    manifests: Sequence[Any],
    rank: int,
    world_size: int,
    targets: Mapping[str, Mapping[str, Any] | None],
    convert: Any,
    stats: ReadStats,
    verify: bool,
    source: str,
) -> dict[str, dict[str, Any] | None]:
    """Each part filled into its target (DTensors: their local data in place), or, with no
    target and one rank loading, as whole tensors through ``convert``.

    Raises:
        InvalidInputError: several ranks load without targets, or a target names a tensor
            the checkpoint lacks.
    """
    out: dict[str, dict[str, Any] | None] = {}
    for part in PARTS:
        saved = plan(ranks, manifests, part, source)
        target = targets.get(part)
        what = "into" if part == "model" else "optimizer_into"
        if saved is None:
            out[part] = None if target is None else dict(target)
            continue
        if target is None:
            if world_size != 1:
                raise InvalidInputError(
                    f"{source}: loading a DTensor checkpoint on {world_size} ranks needs "
                    f"{what}= (the state_dict() of the model built on the new mesh), so each "
                    "rank knows which shards it holds"
                )
            whole = {
                n: convert(read_box(t, (0,) * len(t.shape), t.shape, stats, verify))
                for n, t in saved.items()
            }
            out[part] = _structured(whole, ranks, part, source)
            continue
        # A nested target (an optimizer's state_dict()) is filled leaf by leaf, under the
        # names its save gave them; its scalars (lr, betas) are the caller's.
        leaves, _ = nested.flatten(target, what=what)
        missing = sorted(set(leaves) - set(saved))
        if missing:
            raise InvalidInputError(
                f"{source}: {what} names {part} tensors {missing[:5]} the checkpoint does not "
                f"hold (it holds {sorted(saved)[:5]}...)"
            )
        for name, dst in leaves.items():
            offset, shape = target_box(dst, name, saved[name], rank, what)
            data = read_box(saved[name], offset, shape, stats, verify)
            _copy_local(dst, data)
        out[part] = dict(target)
    return out


def _structured(
    whole: dict[str, Any], ranks: Sequence[SavedRank], part: str, source: str
) -> dict[str, Any]:
    """Whole tensors in the nested structure the ranks saved (their trees merged)."""
    tree = merged_tree([r.part(part) for r in ranks], set(whole), part)
    if tree is None:
        return whole
    return nested.unflatten(tree, whole.__getitem__, set(whole), source=f"{source} ({part})")


def _copy_local(dst: Any, data: np.ndarray) -> None:
    import torch

    dt = _dtensor_type()
    local = dst.to_local() if dt is not None and isinstance(dst, dt) else dst
    with torch.no_grad():
        # ascontiguousarray makes a 0-d array (AdamW's step) 1-d: keep the shape.
        local.copy_(torch.from_numpy(np.ascontiguousarray(data).reshape(data.shape)))
