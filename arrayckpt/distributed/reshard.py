"""Loading a rank's share of a checkpoint saved by a different number of ranks.

Rules (documented in docs/distributed.md):

- Replicated: every new rank gets rank 0's state.
- TensorParallel: a tensor in ``split_dims`` is the concatenation of the saved shards in
  rank order; new rank ``r`` of ``M`` gets indices ``numpy.array_split`` would give it,
  read from only the byte ranges of the old shards that overlap them. Other tensors are
  replicated: rank 0's copy.
- ZeroPartitioned: a key every saved rank holds (when more than one rank saved) is
  replicated and goes to every new rank; the other keys, sorted by name, are cut into
  ``M`` contiguous runs of about equal bytes: a key goes to rank
  ``floor(M * (bytes before it + half its bytes) / total bytes)``. Model and optimizer
  keys are partitioned separately. ``keys=`` overrides the rule.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format import Entry
from .shards import SavedRank, ShardFile, SplitTensor, even_slice, plan_split
from .types import Replicated, ShardingMeta, TensorParallel

PARTS = ("model", "optimizer")


def load_share(
    ranks: Sequence[SavedRank],
    meta: ShardingMeta,
    rank: int,
    world_size: int,
    *,
    keys: Collection[str] | None,
    verify: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """New rank ``rank`` of ``world_size``'s model and optimizer state as NumPy arrays."""
    out: dict[str, dict[str, np.ndarray] | None] = {}
    wanted = None if keys is None else set(keys)
    found: set[str] = set()
    for part in PARTS:
        files = [r.part(part) for r in ranks]
        if all(f is None for f in files):
            out[part] = None
            continue
        names = share_names(files, meta, rank, world_size, part, wanted)
        found |= set(names)
        out[part] = {name: _read(name, files, meta, rank, world_size, part, verify)
                     for name in names}
    if wanted is not None and wanted - found:
        raise CheckpointNotFoundError(
            f"keys={sorted(wanted - found)[:10]} are in no saved rank's model or optimizer state"
        )
    model = out["model"]
    assert model is not None  # every rank has a model file
    return model, out["optimizer"]


def share_names(
    files: Sequence[ShardFile | None],
    meta: ShardingMeta,
    rank: int,
    world_size: int,
    part: str,
    wanted: set[str] | None,
) -> list[str]:
    """The names new rank ``rank`` loads from ``part``, in a stable order."""
    if wanted is not None:
        return [n for n in _all_names(files) if n in wanted]
    strategy = meta.sharding.strategy
    if not isinstance(strategy, (Replicated, TensorParallel)):
        return zero_partition(files, rank, world_size)
    first = files[0]
    names = [] if first is None else list(first.entries)
    if isinstance(strategy, TensorParallel):
        split_dims = meta.sharding.split_dims
        _check_replicated_names(files, names, split_dims, part)
        # a split tensor rank 0 lacks is still loaded, so that the missing shard is reported
        names += [n for n in _all_names(files) if n in split_dims and n not in set(names)]
    return names


def _all_names(files: Sequence[ShardFile | None]) -> list[str]:
    seen: dict[str, None] = {}
    for f in files:
        if f is not None:
            seen.update(dict.fromkeys(f.entries))
    return list(seen)


def _check_replicated_names(
    files: Sequence[ShardFile | None], names: list[str], split_dims: Mapping[str, int], part: str
) -> None:
    have = set(names)
    for r, f in enumerate(files[1:], start=1):
        extra = sorted(n for n in (f.entries if f else {}) if n not in have and n not in split_dims)
        if extra:
            raise CorruptCheckpointError(
                f"{part} tensors {extra[:5]} exist on rank_{r} but not on rank_0 and are not in "
                "split_dims: tensor-parallel tensors are either split (list them in split_dims) "
                "or replicated (every rank holds them)"
            )


def zero_partition(files: Sequence[ShardFile | None], rank: int, world_size: int) -> list[str]:
    """The keys new rank ``rank`` owns under the ZeroPartitioned rule (module docstring)."""
    holders: dict[str, list[int]] = {}
    entry: dict[str, Entry] = {}
    for r, f in enumerate(files):
        for name, e in (f.entries if f else {}).items():
            holders.setdefault(name, []).append(r)
            entry.setdefault(name, e)
    everywhere = len(files) > 1
    replicated = [n for n, h in holders.items() if everywhere and len(h) == len(files)]
    owned = sorted(n for n in holders if n not in set(replicated))
    sizes = [entry[n].end - entry[n].start for n in owned]
    total = sum(sizes)
    mine = []
    before = 0
    for i, (name, size) in enumerate(zip(owned, sizes, strict=True)):
        if total:
            owner = min(world_size - 1, int(world_size * (2 * before + size) // (2 * total)))
        else:
            owner = i * world_size // len(owned)
        if owner == rank:
            mine.append(name)
        before += size
    return replicated + mine


def _read(
    name: str,
    files: Sequence[ShardFile | None],
    meta: ShardingMeta,
    rank: int,
    world_size: int,
    part: str,
    verify: bool,
) -> np.ndarray:
    split_dims = meta.sharding.split_dims
    if isinstance(meta.sharding.strategy, TensorParallel) and name in split_dims:
        plan = plan_split(name, [f.entries if f else None for f in files], split_dims[name], part)
        lo, hi = even_slice(plan.shape[plan.dim], rank, world_size)
        return read_global_slice(plan, files, lo, hi, verify=verify)
    holder = next(f for f in files if f is not None and name in f.entries)
    return holder.read(name, verify=verify)


def read_global_slice(
    plan: SplitTensor, files: Sequence[ShardFile | None], lo: int, hi: int, *, verify: bool
) -> np.ndarray:
    """Indices ``lo:hi`` along the split dim of the merged tensor, from the overlapping
    shards only (a shard wholly inside is read whole and verified)."""
    pieces = []
    for f, start, size in zip(files, plan.offsets, plan.sizes, strict=True):
        a, b = max(lo, start), min(hi, start + size)
        if a < b and f is not None:
            pieces.append(f.read_slab(plan.name, plan.dim, a - start, b - start, verify=verify))
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        shape = (*plan.shape[: plan.dim], 0, *plan.shape[plan.dim + 1 :])
        return np.empty(shape, plan.dtype.numpy)
    return np.concatenate(pieces, axis=plan.dim)

