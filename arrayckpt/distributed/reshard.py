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
  keys are partitioned separately. When each saved rank's optimizer is a torch
  ``state_dict()`` over exactly its parameters, the units are parameters with all their
  optimizer state instead, and each share is a state_dict its optimizer loads
  (`zero_share`). ``keys=`` overrides the rule.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import nested
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format import Entry
from ..nested import TREE_KEY
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
        out[part] = {
            name: _read(name, files, meta, rank, world_size, part, verify) for name in names
        }
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
    shards only (a shard wholly inside is read whole and verified), each read straight
    into its place in the result where that place is contiguous (a split along the first
    dimension), so no piece is held beside the result."""
    shape = (*plan.shape[: plan.dim], hi - lo, *plan.shape[plan.dim + 1 :])
    out = np.empty(shape, plan.dtype.numpy)
    for f, start, size in zip(files, plan.offsets, plan.sizes, strict=True):
        a, b = max(lo, start), min(hi, start + size)
        if a < b and f is not None:
            region = out[(slice(None),) * plan.dim + (slice(a - lo, b - lo),)]
            into = region if region.flags.c_contiguous else None
            piece = f.read_slab(plan.name, plan.dim, a - start, b - start, verify=verify, out=into)
            if into is None:
                region[...] = piece
    return out


class _Ref:
    """A tensor's place in a saved optimizer tree, read only if a share needs it."""

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass
class _Param:
    name: str  # the model tensor
    rank: int  # the saved rank holding it and its state
    group: int  # its param_groups index
    state: dict[Any, Any]  # its optimizer state: _Ref for tensors, scalars as saved


def zero_param_units(
    ranks: Sequence[SavedRank],
) -> tuple[list[_Param], list[dict[str, Any]]] | None:
    """Each saved rank's parameters paired with their optimizer state, and rank 0's
    param_groups, when every rank saved a torch-style ``optimizer.state_dict()`` (``state``
    and ``param_groups``) of an optimizer over its own parameters, in its model's order.

    ``None`` for any other optimizer layout: keys are then partitioned one by one.
    """
    holders: dict[str, int] = {}
    for saved in ranks:
        for name in saved.model.entries:
            holders[name] = holders.get(name, 0) + 1
    everywhere = len(ranks) > 1
    params: list[_Param] = []
    groups: list[dict[str, Any]] | None = None
    for saved in ranks:
        opt = saved.optimizer
        text = None if opt is None else opt.header.metadata.get(TREE_KEY)
        if opt is None or text is None:
            return None
        tree = nested.unflatten(text, _Ref, set(opt.entries), source=str(opt.path))
        if not (
            isinstance(tree, dict)
            and set(tree) == {"state", "param_groups"}
            and isinstance(tree["state"], dict)
            and isinstance(tree["param_groups"], list)
            and all(
                isinstance(g, dict) and isinstance(g.get("params"), list)
                for g in tree["param_groups"]
            )
        ):
            return None
        ids = [(g, pid) for g, group in enumerate(tree["param_groups"]) for pid in group["params"]]
        own = [n for n in saved.model.entries if not (everywhere and holders[n] == len(ranks))]
        if len(ids) != len(own) or (
            groups is not None and len(groups) != len(tree["param_groups"])
        ):
            return None
        if groups is None:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in tree["param_groups"]]
        for name, (g, pid) in zip(own, ids, strict=True):
            state = tree["state"].get(pid, {})
            if not isinstance(state, dict):
                return None
            params.append(_Param(name, saved.rank, g, state))
    assert groups is not None
    return params, groups


def zero_share(
    ranks: Sequence[SavedRank], rank: int, world_size: int, *, verify: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """New rank ``rank``'s parameters and an ``optimizer.state_dict()`` for exactly them.

    A parameter goes with all of its optimizer state (the ZeroPartitioned byte rule of the
    module docstring, over parameter + state bytes). The share's ``param_groups`` are the
    saved groups' settings with ``params`` renumbered ``0..k-1`` in the order of the model
    share, which is the order to build this rank's optimizer in. ``None`` when the
    optimizer is not such a state_dict (see `zero_param_units`).
    """
    found = zero_param_units(ranks)
    if found is None:
        return None
    params, groups = found
    files = [r.model for r in ranks]

    def nbytes(p: _Param) -> int:
        e = files[p.rank].entries[p.name]
        opt = ranks[p.rank].optimizer
        assert opt is not None
        refs = [v.name for v in p.state.values() if isinstance(v, _Ref)]
        return e.end - e.start + sum(opt.entries[n].end - opt.entries[n].start for n in refs)

    ordered = sorted(params, key=lambda p: p.name)
    sizes = [nbytes(p) for p in ordered]
    total, before = sum(sizes), 0
    mine: list[_Param] = []
    for i, (p, size) in enumerate(zip(ordered, sizes, strict=True)):
        owner = (
            min(world_size - 1, int(world_size * (2 * before + size) // (2 * total)))
            if total
            else i * world_size // len(ordered)
        )
        if owner == rank:
            mine.append(p)
        before += size
    owned = {p.name for p in params}
    model = {n: files[0].read(n, verify=verify) for n in files[0].entries if n not in owned}
    state: dict[int, dict[Any, Any]] = {}
    for j, p in enumerate(mine):
        model[p.name] = files[p.rank].read(p.name, verify=verify)
        opt = ranks[p.rank].optimizer
        assert opt is not None
        state[j] = {
            k: opt.read(v.name, verify=verify) if isinstance(v, _Ref) else v
            for k, v in p.state.items()
        }
    param_groups = [
        {**settings, "params": [j for j, p in enumerate(mine) if p.group == g]}
        for g, settings in enumerate(groups)
    ]
    return model, {"state": state, "param_groups": param_groups}
