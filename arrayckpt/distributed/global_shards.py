"""Sharded arrays (torch DTensor, jax.Array) saved as boxes of one global tensor, read by box.

Each saved rank writes, under the tensor's own name, the part of the global tensor it
owns (replicas once: the rank at coordinate 0 of every replicated mesh dimension), and
its manifest in ``sharding_meta.json`` records ``global_shape`` and ``global_offset``.
A part is usually one box; a strided shard (``_StridedShard`` of FSDP x TP, unevenly
split) can hold several runs of indices along a dimension, which ``global_runs`` lists.
A load reads, for each target box, only the byte ranges of the saved boxes that overlap it.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import backends, nested
from ..dtypes import BY_CODE, DType, from_name
from ..errors import CorruptCheckpointError, InvalidInputError, TopologyError
from ..layout import SHARDING_META_FILE
from ..limits import MAX_TILING_CELLS
from . import jax_arrays
from .shards import SavedRank, ShardFile
from .trees import merged_tree
from .types import ShardingMeta

PARTS = ("model", "optimizer")
#: Manifest fields a sharded-array save adds to each tensor (boostr's fields are untouched).
GLOBAL_SHAPE, GLOBAL_OFFSET = "global_shape", "global_offset"
#: Present only when a saved part is not one box: per dimension, the ``[global_start,
#: length]`` runs its indices form, in the order the saved tensor holds them.
GLOBAL_RUNS = "global_runs"
#: Per dimension, the runs of global indices a local shard holds: ``(start, length)``.
Runs = list[list[tuple[int, int]]]
#: A box of a local shard: its global offset, its shape, and its offset in the local shard.
Box = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


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


def localize(state: Any, rank: int, what: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """This rank's parts of ``state`` to write, and each written part's global facts.

    ``state`` may be nested (an FSDP2 ``optimizer.state_dict()``): it keeps its
    structure, each DTensor replaced by its local tensor when this rank is its part's
    writer and left out otherwise (a sharded ``jax.Array`` by this process's shards of
    replica 0, see `jax_arrays.owned_box`); facts are keyed by the tensor names
    `nested.flatten` gives. A plain array is taken as replicated (rank 0 writes it);
    scalars stay on
    every rank.

    Raises:
        InvalidInputError: a ``Partial`` or unknown placement, or a local tensor whose
            shape is not the one its placements give (names the tensor and the rank).
    """
    if state is None:
        return None, {}
    dt = _dtensor_type()
    facts: dict[str, dict[str, Any]] = {}

    def own(name: str, v: Any) -> Any:
        runs = None
        if dt is not None and isinstance(v, dt):
            box = _dtensor_box(v, name, rank, what)
            if box is None:
                return nested.DROP
            local, offset, runs = box
        elif jax_arrays.is_sharded(v):
            jax_box = jax_arrays.owned_box(v, name, what)
            if jax_box is None:
                return nested.DROP
            local, offset = jax_box
        elif rank == 0:
            local, offset = v, [0] * len(getattr(v, "shape", ()))
        else:
            return nested.DROP
        facts[name] = {GLOBAL_SHAPE: [int(d) for d in v.shape], GLOBAL_OFFSET: offset}
        if runs is not None:
            facts[name][GLOBAL_RUNS] = runs
        return local

    return nested.map_arrays(state, own), facts


def _dtensor_box(
    v: Any, name: str, rank: int, what: str
) -> tuple[Any, list[int], list[list[list[int]]] | None] | None:
    """This rank's local tensor of ``v``, its global offset, and its runs when they are
    not one box; ``None`` when another rank writes this replica, or this rank holds none
    of it."""
    placements = tuple(v.placements)
    if any(p.is_partial() for p in placements):
        raise InvalidInputError(
            f"{what}[{name!r}] is a DTensor with a Partial placement {placements}: reduce it "
            "(redistribute to Shard or Replicate) before saving"
        )
    coord = v.device_mesh.get_coordinate()
    if coord is None:
        return None  # this rank is not in the tensor's mesh
    if any(p.is_replicate() and c != 0 for p, c in zip(placements, coord, strict=True)):
        return None  # another rank writes this replica
    runs = _checked_runs(v, name, rank, what)
    if any(not r for r in runs):
        return None  # an uneven split left this rank nothing
    offset = [r[0][0] for r in runs]
    if all(len(r) == 1 for r in runs):
        return v.to_local(), offset, None
    return v.to_local(), offset, [[list(run) for run in r] for r in runs]


def _checked_runs(v: Any, name: str, rank: int, what: str) -> Runs:
    """``v``'s local runs, checked against the shape of the local tensor it holds."""
    runs = dtensor_runs(tuple(v.shape), v.device_mesh, tuple(v.placements), f"{what}[{name!r}]")
    shape = tuple(sum(n for _, n in r) for r in runs)
    local = tuple(v.to_local().shape)
    if local != shape:
        raise InvalidInputError(
            f"{what}[{name!r}] on rank {rank}: the DTensor's local tensor is {list(local)}, but "
            f"its placements {tuple(v.placements)} on a {tuple(v.device_mesh.shape)} mesh give "
            f"this rank {list(shape)} of the global {list(v.shape)}; the placements are "
            "inconsistent (a DTensor.from_local(..., run_check=False) with the wrong shape?)"
        )
    return runs


def dtensor_runs(
    global_shape: Sequence[int], mesh: Any, placements: Sequence[Any], what: str
) -> Runs:
    """Per dimension, the runs of global indices this rank's local shard of a DTensor holds.

    Placements apply left to right over the mesh dimensions, as torch's
    ``compute_local_shape_and_global_offset`` applies them (whose first offsets these
    runs' starts equal), but all indices are kept: ``Shard(d)`` takes this coordinate's
    ``torch.chunk`` of the indices left along ``d``; ``_StridedShard(d, split_factor=f)``
    chunks them into ``f`` pieces first and takes this coordinate's chunk of each, which
    is not one run when the split is uneven. ``Replicate`` takes them all.

    Raises:
        InvalidInputError: a placement that is none of these.
    """
    coord = mesh.get_coordinate()
    index: list[np.ndarray | None] = [None] * len(global_shape)
    for mesh_dim, p in enumerate(placements):
        if p.is_replicate():
            continue
        split = getattr(p, "split_factor", None)
        if not (p.is_shard() or split is not None):
            raise InvalidInputError(
                f"{what}: a DTensor placement {p!r} arrayckpt cannot place; use Shard, "
                "Replicate or FSDP x TP's _StridedShard"
            )
        d = p.dim
        have = index[d]
        current = np.arange(global_shape[d]) if have is None else have
        k, r = int(mesh.size(mesh_dim)), int(coord[mesh_dim])
        if split is None:
            lo, hi = _chunk(len(current), k, r)
            index[d] = current[lo:hi]
        else:
            pieces = [_chunk(len(current), int(split), j) for j in range(int(split))]
            index[d] = np.concatenate(
                [current[a + lo : a + hi] for a, b in pieces for lo, hi in [_chunk(b - a, k, r)]]
            )
    return [
        _runs_of(np.arange(n) if idx is None else idx)
        for n, idx in zip(global_shape, index, strict=True)
    ]


def _chunk(n: int, k: int, r: int) -> tuple[int, int]:
    """Chunk ``r`` of ``torch.chunk(range(n), k)``; empty past the last chunk."""
    size = -(-n // k)
    lo = min(r * size, n)
    return lo, min(lo + size, n)


def _runs_of(index: np.ndarray) -> list[tuple[int, int]]:
    if not len(index):
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(index)]))
    return [(int(index[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def runs_boxes(runs: Runs) -> list[Box]:
    """The boxes a local shard with these runs is made of (one per combination of runs)."""
    per_dim = []
    for r in runs:
        at = 0
        dim = []
        for start, n in r:
            dim.append((start, n, at))
            at += n
        per_dim.append(dim)
    return [
        (tuple(c[0] for c in combo), tuple(c[1] for c in combo), tuple(c[2] for c in combo))
        for combo in itertools.product(*per_dim)
    ]


@dataclass
class ReadStats:
    """Bytes and byte ranges a load read from tensor data (headers excluded)."""

    bytes_read: int = 0
    ranges: int = 0


@dataclass(frozen=True)
class Piece:
    """A box of the global tensor that one rank saved: all of its saved tensor, or (a
    strided shard) the part at ``at`` in a saved tensor of shape ``stored``."""

    rank: int
    file: ShardFile
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    at: tuple[int, ...] = ()
    stored: tuple[int, ...] = ()

    @property
    def whole(self) -> bool:
        return not self.stored or self.stored == self.shape


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


def is_global_checkpoint(root: Path) -> bool:
    """True when the distributed checkpoint at ``root`` was saved from sharded arrays."""
    meta = ShardingMeta.read(root / SHARDING_META_FILE)
    return meta.ranks is not None and is_global(meta.ranks)


#: A tensor as the manifests describe it: dtype, global shape, and each rank's boxes.
_Described = tuple[DType, tuple[int, ...], list[tuple[int, tuple[int, ...], Box]]]


def _described(
    manifests: Sequence[Any], part: str, source: str, error: type[Exception]
) -> dict[str, _Described]:
    """Every tensor of ``part`` in the manifests, its boxes checked to tile it exactly.

    Raises:
        ``error``: naming the tensor and the ranks, when the ranks disagree in dtype or
            global shape, a box lies outside the tensor, or the boxes leave part of it
            uncovered or cover part of it twice.
    """
    out: dict[str, _Described] = {}
    for rank, m in enumerate(manifests):
        for name, f in (m.get(part) or {}).items():
            shape = f.get(GLOBAL_SHAPE)
            if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
                raise error(
                    f"{source}: {part} tensor {name!r} of rank_{rank}: {GLOBAL_SHAPE} "
                    f"{shape!r} is not a shape; the manifest is damaged"
                )
            dtype, gshape = BY_CODE[f["dtype"]], tuple(shape)
            seen = out.setdefault(name, (dtype, gshape, []))
            if seen[:2] != (dtype, gshape):
                first = seen[2][0][0]
                raise error(
                    f"{source}: {part} tensor {name!r}: rank_{rank} saved a box of "
                    f"{dtype.code}{list(gshape)}, rank_{first} of "
                    f"{seen[0].code}{list(seen[1])}; the ranks did not save one tensor"
                )
            stored = tuple(f["shape"])
            where = f"{source}: {part} tensor {name!r} of rank_{rank}"
            found = _boxes_of(f, gshape, stored, where, error)
            seen[2].extend((rank, stored, box) for box in found)
    for name, (_, gshape, boxes) in out.items():
        problem = _tiling_problem(gshape, [(r, b[0], b[1]) for r, _, b in boxes])
        if problem is not None:
            raise error(f"{source}: {part} tensor {name!r} {list(gshape)}: {problem}")
    return out


def _boxes_of(
    f: Mapping[str, Any],
    gshape: tuple[int, ...],
    stored: tuple[int, ...],
    what: str,
    error: type[Exception],
) -> list[Box]:
    """The boxes one manifest entry says its saved tensor holds, checked to lie inside
    the global tensor and to make up exactly the saved tensor."""
    offset: Any = f.get(GLOBAL_OFFSET)
    runs: Any = f.get(GLOBAL_RUNS)
    if (
        runs is None
        and isinstance(offset, list)
        and len(offset) == len(stored) == len(gshape)
        and all(
            type(o) is int and o >= 0 and o + n <= total
            for o, n, total in zip(offset, stored, gshape, strict=True)
        )
    ):
        return [(tuple(offset), stored, (0,) * len(stored))]  # one box: the common case
    if not (
        isinstance(offset, list)
        and isinstance(runs, list)
        and len(offset) == len(runs) == len(stored) == len(gshape)
        and all(
            _fits(r, o, n, total)
            for r, o, n, total in zip(runs, offset, stored, gshape, strict=True)
        )
    ):
        raise error(
            f"{what}: its {GLOBAL_OFFSET} {offset!r} / {GLOBAL_RUNS} {runs!r} do not place a "
            f"{list(stored)} box inside the global {list(gshape)}; the manifest is damaged"
        )
    return runs_boxes([[(a, n) for a, n in r] for r in runs])


def _fits(runs: Any, offset: Any, n: int, total: int) -> bool:
    """``runs`` are ``[start, length]`` runs within ``0..total``, ``n`` long, first at
    ``offset``."""
    return (
        isinstance(runs, list)
        and bool(runs)
        and all(
            isinstance(run, list)
            and len(run) == 2
            and all(type(x) is int for x in run)
            and run[0] >= 0
            and run[1] > 0
            and run[0] + run[1] <= total
            for run in runs
        )
        and sum(run[1] for run in runs) == n
        and runs[0][0] == offset
    )


def _tiling_problem(
    shape: tuple[int, ...], boxes: Sequence[tuple[int, tuple[int, ...], tuple[int, ...]]]
) -> str | None:
    """What is wrong with ``boxes`` (rank, offset, shape) as a tiling of ``shape``, or None.

    The boxes' edges cut the tensor into a grid of cells; each cell must be covered once.
    A grid over `MAX_TILING_CELLS` (no DTensor layout makes one) is checked by count only.
    """
    ranks = sorted({r for r, _, _ in boxes})
    boxes = [b for b in boxes if math.prod(b[2])]  # an empty box covers nothing
    owners = np.array([r for r, _, _ in boxes], np.int64)
    if not shape:  # a 0-d tensor: one cell
        counts = np.array(len(boxes))
        a = b = np.zeros((len(boxes), 0), np.int64)
        cuts: list[np.ndarray] = []
    else:
        lo = np.array([o for _, o, _ in boxes], np.int64).reshape(len(boxes), len(shape))
        hi = lo + np.array([s for _, _, s in boxes], np.int64).reshape(lo.shape)
        cuts = [
            np.unique(np.concatenate(([0, n], lo[:, d], hi[:, d]))) for d, n in enumerate(shape)
        ]
        grid = [len(c) - 1 for c in cuts]
        if math.prod(shape) == 0:
            return None if not boxes else f"ranks {ranks} saved elements of an empty tensor"
        if math.prod(grid) > MAX_TILING_CELLS:
            covered = int(np.prod(hi - lo, axis=1).sum())
            if covered == math.prod(shape):
                return None
            return (
                f"the boxes saved by ranks {ranks} cover {covered} of {math.prod(shape)} "
                "elements; a rank's shard is missing or duplicated"
            )
        a = np.stack([np.searchsorted(c, lo[:, d]) for d, c in enumerate(cuts)], axis=1)
        b = np.stack([np.searchsorted(c, hi[:, d]) for d, c in enumerate(cuts)], axis=1)
        if (b - a == 1).all():  # each box one cell: every DTensor layout
            cell_of = np.ravel_multi_index(tuple(a.T), grid)
            counts = np.bincount(cell_of, minlength=math.prod(grid)).reshape(grid)
        else:
            counts = np.zeros(grid, np.int64)
            for i in range(len(boxes)):
                counts[tuple(slice(x, y) for x, y in zip(a[i], b[i], strict=True))] += 1
    bad = np.argwhere(counts != 1)
    if not len(bad):
        return None
    cell = bad[0]
    box = ", ".join(f"{cuts[d][i]}:{cuts[d][i + 1]}" for d, i in enumerate(cell))
    holders = sorted(set(owners[((a <= cell) & (cell < b)).all(axis=1)].tolist()))
    if not holders:
        return (
            f"no saved rank holds [{box}] (ranks {ranks} saved boxes of it); a rank's shard "
            "is missing, or the ranks' placements were inconsistent"
        )
    return (
        f"ranks {holders} each saved [{box}]; the ranks' placements were inconsistent "
        "(every rank must hold the DTensor with the same placements)"
    )


def plan(
    ranks: Sequence[SavedRank], manifests: Sequence[Any], part: str, source: str
) -> dict[str, GlobalTensor] | None:
    """Every tensor of ``part``, checked to be covered exactly once by its saved boxes.

    Raises:
        CorruptCheckpointError: naming the tensor and the ranks, when boxes disagree in
            dtype or global shape, lie outside the tensor, or do not tile it (a rank is
            missing, or the saving ranks' placements were inconsistent).
    """
    out: dict[str, GlobalTensor] = {}
    for name, (dtype, gshape, boxes) in _described(
        manifests, part, source, CorruptCheckpointError
    ).items():
        t = out[name] = GlobalTensor(name, dtype, gshape)
        for rank, stored, (offset, shape, at) in boxes:
            file = ranks[rank].part(part)
            assert file is not None  # check_manifest found the file the manifest lists
            t.pieces.append(Piece(rank, file, offset, shape, at, stored))
    return out or None


def check_saved_boxes(manifests: Sequence[Any], source: str) -> None:
    """At a save's commit: every sharded-array tensor's boxes tile it exactly.

    Raises:
        TopologyError: naming the tensor and the ranks (e.g. the ranks held a DTensor
            with different placements, shapes or dtypes).
    """
    for part in PARTS:
        _described(manifests, part, source, TopologyError)


def read_box(
    t: GlobalTensor,
    lo: Sequence[int],
    shape: Sequence[int],
    stats: ReadStats,
    verify: bool,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The box of ``t`` at ``lo`` with ``shape``, reading only overlapping byte ranges,
    into ``out`` when given (an array of that shape and ``t``'s dtype, e.g. a view of the
    target's memory: the bytes then land there with no copy and no fresh pages).

    A strided shard's saved tensor that the box holds all of is read whole, once, and
    checked against its CRC32C when ``verify`` (it is made of several boxes).
    """
    if out is None:
        out = np.empty(tuple(shape), t.dtype.numpy)
    hi = [x + n for x, n in zip(lo, shape, strict=True)]
    inside: dict[int, bool] = {}
    for p in t.pieces:
        if not p.whole:
            inside[p.rank] = inside.get(p.rank, True) and all(
                x <= o and o + m <= y for x, y, o, m in zip(lo, hi, p.offset, p.shape, strict=True)
            )
    wholes: dict[int, np.ndarray] = {}
    for p in t.pieces:
        a = [max(x, o) for x, o in zip(lo, p.offset, strict=True)]
        b = [min(y, o + m) for y, o, m in zip(hi, p.offset, p.shape, strict=True)]
        if any(i >= j for i, j in zip(a, b, strict=True)) and t.shape:
            continue
        dst = tuple(slice(i - x, j - x) for i, j, x in zip(a, b, lo, strict=True))
        at = p.at or (0,) * len(p.shape)
        src = tuple(
            slice(i - o + s, j - o + s) for i, j, o, s in zip(a, b, p.offset, at, strict=True)
        )
        index: tuple[Any, ...] = (*dst, ...)  # a view, even of a 0-d array (not a scalar)
        region = out[index]
        if inside.get(p.rank):
            if p.rank not in wholes:
                wholes[p.rank] = p.file.read(t.name, verify=verify)
                stats.bytes_read += wholes[p.rank].nbytes
                stats.ranges += 1
            region[...] = wholes[p.rank][src]
        elif region.flags.c_contiguous:  # the runs land in file order, back to back
            _read_sub(p, t, src, stats, verify, region)
        else:
            region[...] = _read_sub(p, t, src, stats, verify)
    return out


def _read_sub(
    p: Piece,
    t: GlobalTensor,
    box: tuple[slice, ...],
    stats: ReadStats,
    verify: bool,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``box`` of piece ``p``'s saved tensor: the whole tensor (verified) or its rows, into
    ``out`` (C-contiguous, of the box's shape) when given."""
    stored = p.stored or p.shape
    sub = tuple(s.stop - s.start for s in box)
    if sub == stored:
        stats.bytes_read += math.prod(sub) * t.dtype.itemsize
        stats.ranges += 1
        return p.file.read(t.name, verify=verify, out=out)
    # Runs are contiguous over the trailing dimensions the box spans whole.
    k = len(sub) - 1
    while k > 0 and sub[k] == stored[k]:
        k -= 1
    item = t.dtype.itemsize
    strides = [math.prod(stored[d + 1 :]) * item for d in range(len(sub))]
    run = sub[k] * strides[k]
    e = p.file.entries[t.name]
    starts = [e.start + box[k].start * strides[k]]
    for d in range(k - 1, -1, -1):
        starts = [s + (box[d].start + i) * strides[d] for i in range(sub[d]) for s in starts]
        # ``starts`` is built innermost-last so the runs come out in file order
    starts.sort()
    if out is None:
        out = np.empty(sub, t.dtype.numpy)
    buf = out.reshape(-1).view(np.uint8)  # a view: ``out`` is C-contiguous
    p.file._fill([(s, run) for s in starts], buf.data)
    stats.bytes_read += len(buf)
    stats.ranges += len(starts)
    return out


def check_target(target: Any, name: str, t: GlobalTensor, rank: int, what: str) -> None:
    """Check that ``target`` (any framework's array) has ``t``'s global shape and dtype.

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


def target_boxes(target: Any, name: str, t: GlobalTensor, rank: int, what: str) -> list[Box]:
    """The boxes of ``target``'s local data (global offset, shape, offset in the local
    data), after checking it fits ``t``: a plain tensor is one box, the whole tensor.

    Raises:
        TopologyError: the target's global shape differs from the saved one.
        InvalidInputError: the dtype differs, or a DTensor target's placements are
            Partial or do not give the shape of its local tensor.
    """
    check_target(target, name, t, rank, what)
    dt = _dtensor_type()
    if dt is None or not isinstance(target, dt):
        return [((0,) * len(t.shape), t.shape, (0,) * len(t.shape))]
    if any(p.is_partial() for p in target.placements):
        raise InvalidInputError(
            f"{what}[{name!r}] on rank {rank}: a Partial target {tuple(target.placements)} "
            "cannot be filled; load into Shard or Replicate placements"
        )
    if target.device_mesh.get_coordinate() is None:
        return []  # this rank holds none of it
    runs = _checked_runs(target, name, rank, what)
    return runs_boxes(runs)  # none when an uneven split left this rank nothing


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
            for offset, shape, at in target_boxes(dst, name, saved[name], rank, what):
                view = _local_view(dst, saved[name].dtype, at, shape, name)
                data = read_box(saved[name], offset, shape, stats, verify, out=view)
                if view is None:
                    _copy_local(dst, at, data)
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


def _local_view(
    dst: Any, dtype: DType, at: Sequence[int], shape: Sequence[int], name: str
) -> np.ndarray | None:
    """The region at ``at`` of ``dst``'s local data as a NumPy array over its own memory,
    to read straight into; ``None`` when there is none to write through (another device,
    a region that is not contiguous)."""
    dt = _dtensor_type()
    local = dst.to_local() if dt is not None and isinstance(dst, dt) else dst
    backend = backends.for_array(local, name)
    if backend.name != "torch" or local.device.type != "cpu" or local.numel() == 0:
        return None
    region = local[tuple(slice(a, a + n) for a, n in zip(at, shape, strict=True))]
    if not region.is_contiguous() or region.numel() == 0:
        return None
    view = backend.to_host(region, name, dtype, None)  # zero-copy for contiguous CPU tensors
    shares = view.flags.writeable and view.ctypes.data == region.data_ptr()
    return view if shares else None


def _copy_local(dst: Any, at: Sequence[int], data: np.ndarray) -> None:
    """Copy ``data`` into ``dst``'s local data at offset ``at``."""
    import torch

    dt = _dtensor_type()
    local = dst.to_local() if dt is not None and isinstance(dst, dt) else dst
    index = tuple(slice(a, a + n) for a, n in zip(at, data.shape, strict=True))
    with torch.no_grad():
        # ascontiguousarray makes a 0-d array (AdamW's step) 1-d: keep the shape.
        local[index].copy_(torch.from_numpy(np.ascontiguousarray(data).reshape(data.shape)))
