"""Snapshots: validate a checkpoint's state and copy it to host memory owned by arrayckpt."""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np

from . import aliases, backends, format, hostcopy, nested, pool, priority, statecache
from .dtypes import DType
from .errors import InvalidInputError
from .handoff import CopyGates, Handoff
from .staging import HostTensor, StagingPool
from .training_state import TrainingState


@dataclass(frozen=True)
class Snapshot:
    """Everything one save writes, already in host memory owned by arrayckpt."""

    model: dict[str, HostTensor]
    optimizer: dict[str, HostTensor]
    training_state: TrainingState
    #: JSON trees of nested states (see `nested`); ``None`` for flat mappings.
    model_tree: str | None = None
    optimizer_tree: str | None = None
    #: Tied tensors (see `aliases`): ``{alias: stored name}`` per part.
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    optimizer_aliases: Mapping[str, str] = field(default_factory=dict)
    #: The ``extra=`` state; ``None`` when none was given (no extra file is written).
    extra: dict[str, HostTensor] | None = None
    extra_tree: str | None = None
    extra_aliases: Mapping[str, str] = field(default_factory=dict)
    #: The tensors may be the caller's own arrays (no staging: zero copy), which another
    #: thread may change while they are written; see `format.write_file`.
    borrowed: bool = False

    @property
    def nbytes(self) -> int:
        parts = (self.model, self.optimizer, self.extra or {})
        # C-level passes: the writer logs it after every save, of maybe 20,000 tensors
        return sum(sum(map(_data_nbytes, part.values())) for part in parts)


_data_nbytes = operator.attrgetter("data.nbytes")

Plan = list[tuple[str, Any, backends.Backend, DType]]


def _plan(state: Mapping[str, Any] | None, *, what: str) -> Plan:
    """Validate every key and value of ``state`` before the first byte is copied."""
    if state is None:
        return []
    entry = state.entry if isinstance(state, statecache.CheckedState) else None
    if entry is not None and entry.backends is not None and entry.dtypes is not None:
        # The same names and arrays as a save that passed these checks (see `statecache`)
        return statecache.CheckedPlan(
            zip(state, state.values(), entry.backends, entry.dtypes, strict=True), entry
        )
    state = check_mapping(state, what=what)
    if entry is None or entry.immutable:
        keys = list(state)
        # The keys checked in C-level passes when all are valid; else one by one, so the
        # first bad key or array in the state's order is the one named
        checked = set(map(type, keys)) <= {str} and _keys_valid(keys)
        plan = []
        for key, x in state.items():
            if not checked:
                check_key(key, what=what)
            backend = backends.for_array(x, key)
            plan.append((key, x, backend, backend.dtype(x, key)))
        if entry is None:
            return plan
        entry.backends, entry.dtypes = list(map(_backend_of, plan)), list(map(_dtype_of, plan))
        return statecache.CheckedPlan(plan, entry)
    # str keys and plain NumPy arrays only (see `statecache.entry_for`): checked at once
    keys = list(state)
    if not _keys_valid(keys):
        for key in keys:
            check_key(key, what=what)  # raises, naming the key
    numpy_backend = backends.for_array(_NUMPY_PROBE, "")
    dtypes = list(map(numpy_backend.dtype, state.values(), keys))  # raises, naming the key
    entry.backends, entry.dtypes = [numpy_backend] * len(keys), dtypes
    return _plan(state, what=what)


def _keys_valid(keys: list[str]) -> bool:
    """Whether every one of ``keys`` (all ``str``) is a valid tensor name: non-empty, no
    NUL, not safetensors' reserved key, encodable as UTF-8. The one statement of the rule
    (`check_key` uses it too), in C-level passes over many keys."""
    joined = "".join(keys)
    return (
        "\x00" not in joined
        and "__metadata__" not in keys
        and min(map(len, keys), default=1) > 0
        and _is_utf8(joined)
    )


#: NumPy arrays up to this size share one staging slab per snapshot (see `_slab_copy`).
SLAB_MAX_BYTES = 64 << 10


def _split_small(plan: Plan) -> tuple[Plan, Plan]:
    """Split off the small, C-contiguous, little-endian NumPy arrays of ``plan``."""
    numpy_backend = backends.for_array(_NUMPY_PROBE, "")
    entry = plan.entry if isinstance(plan, statecache.CheckedPlan) else None
    if entry is not None and entry.small is not None and len(entry.small) == len(plan):
        # the same arrays as a save that split them (see `statecache`)
        return _split_by(plan, entry.small, entry)
    if plan:
        _, xs, kinds, dtypes = zip(*plan, strict=True)
        if set(map(type, xs)) == {np.ndarray} and set(map(id, kinds)) == {id(numpy_backend)}:
            fits = _fit_slab(xs, dtypes)
            if entry is not None:
                entry.small = fits
            return _split_by(plan, fits, entry)
    small: Plan = []
    rest: Plan = []
    for item in plan:
        _, x, backend, dtype = item
        if (
            backend is numpy_backend
            and type(x) is np.ndarray
            and x.nbytes <= SLAB_MAX_BYTES
            and x.dtype == dtype.numpy
            and x.flags.c_contiguous
        ):
            small.append(item)
        else:
            rest.append(item)
    return small, rest


_NUMPY_PROBE = np.empty(0, np.uint8)


def _split_by(plan: Plan, fits: np.ndarray, entry: statecache.Entry | None) -> tuple[Plan, Plan]:
    """``plan``'s items where ``fits``, and the others; the first keeps ``plan``'s entry."""
    if entry is not None and fits.all():
        return plan, []  # all of them (e.g. 20,000 small tensors): no copy of the plan
    small = list(itertools.compress(plan, fits))
    rest = list(itertools.compress(plan, ~fits))
    return (small if entry is None else statecache.CheckedPlan(small, entry)), rest


def _fit_slab(xs: tuple[Any, ...], dtypes: tuple[DType, ...]) -> np.ndarray:
    """Which of the plain NumPy arrays ``xs`` go to the slab, in C-level passes."""
    n = len(xs)
    fits = np.fromiter(map(_nbytes, xs), np.int64, n) <= SLAB_MAX_BYTES
    fits &= np.fromiter(map(_c_contiguous, xs), bool, n)
    wanted = list(map(_numpy_of, dtypes))
    same = np.fromiter(map(operator.is_, map(_np_dtype, xs), wanted), bool, n)
    if not same.all():  # builtin dtypes are singletons: only the others need comparing
        same = np.fromiter(map(operator.eq, map(_np_dtype, xs), wanted), bool, n)
    fits &= same
    return fits


_nbytes = operator.attrgetter("nbytes")
_c_contiguous = operator.attrgetter("flags.c_contiguous")
_np_dtype = operator.attrgetter("dtype")
_numpy_of = operator.attrgetter("numpy")


SlabLayout = list[tuple[np.dtype[Any], list[int]]]


def _slab_layout(small: Plan) -> tuple[SlabLayout, int]:
    """Group ``small`` by dtype: each group's plan indices, and the slab's byte size.

    Each group starts 64-byte aligned, so every view into the slab is aligned.
    """
    if not small:
        return [], 0
    entry = small.entry if isinstance(small, statecache.CheckedPlan) else None
    if entry is not None and entry.slab_layout is not None and entry.slab_layout[0] == len(small):
        return entry.slab_layout[1]  # the same small arrays (see `statecache`)
    layout = _group_by_dtype(small)
    if entry is not None:
        entry.slab_layout = (len(small), layout)
    return layout


def _group_by_dtype(small: Plan) -> tuple[SlabLayout, int]:
    xs = [x for _, x, _, _ in small]
    kinds = set(map(_np_dtype, xs))
    if len(kinds) == 1:  # one dtype (the common case): one group, no per-array lookups
        return [(kinds.pop(), list(range(len(xs))))], sum(map(_nbytes, xs))
    groups: dict[np.dtype[Any], list[int]] = {}
    sizes: dict[np.dtype[Any], int] = {}
    for i, (_, x, _, _) in enumerate(small):
        dt = x.dtype
        if dt in groups:
            groups[dt].append(i)
            sizes[dt] += x.nbytes
        else:
            groups[dt] = [i]
            sizes[dt] = x.nbytes
    total = 0
    for dt in groups:
        total = -(-total // 64) * 64 + sizes[dt]
    return list(groups.items()), total


@dataclass(eq=False)
class SlabViews:
    """The tensors (views into one staging slab) that the small arrays of one state were
    copied into, kept for the next snapshot of that state into the same slab: making
    20,000 views and tensors costs more than copying their 4 KiB each.

    Valid while the state's `statecache.Entry` matches (the same arrays, shapes, strides
    and dtypes, so the same layout) and the slab is the same buffer; `_begin_staging`
    checks both.
    """

    entry: statecache.Entry
    groups: SlabLayout
    buffer: np.ndarray
    #: ``None`` until the first copy into ``buffer`` has made them.
    tensors: dict[str, HostTensor] | None = None
    #: Per dtype group, the part of ``buffer`` its arrays are packed into.
    segments: list[np.ndarray] = field(default_factory=list)


@dataclass(eq=False)
class Slab:
    """One plan's small NumPy arrays, their layout (`_slab_layout`), the staging buffer
    they are copied into, and its reusable views (``None``: the state is not cached)."""

    small: Plan
    groups: SlabLayout
    buffer: np.ndarray
    views: SlabViews | None = None


def _slab_copy(slab: Slab) -> dict[str, HostTensor]:
    """Copy many small arrays into one slab laid out by `_slab_layout`: one
    `np.concatenate` per dtype instead of a staging buffer, views and a copy call per array
    (20,000 tensors of 4 KiB: ~5 µs less each); the views of each run of equal shapes come
    from one reshape, or from the slab's earlier snapshot (`SlabViews`)."""
    small, kept = slab.small, slab.views
    if kept is not None and kept.tensors is not None:
        for (_, members), segment in zip(slab.groups, kept.segments, strict=True):
            np.concatenate(_members(small, members), axis=None, out=segment)
        return dict(kept.tensors)  # a copy: `_gate` replaces tensors in what it is given
    out: list[HostTensor | None] = [None] * len(small)
    segments = []
    at = 0
    for dt, members in slab.groups:
        at = -(-at // 64) * 64
        arrays = _members(small, members)
        count = sum(map(_size, arrays))
        segment = slab.buffer[at : at + count * dt.itemsize].view(dt)
        np.concatenate(arrays, axis=None, out=segment)
        segments.append(segment)
        at += count * dt.itemsize
        tensors = _slab_views(arrays, segment, small[members[0]][3])
        for i, t in zip(members, tensors, strict=True):
            out[i] = t
    # Every array is a member of one group, so every place in ``out`` is filled.
    made = cast(dict[str, HostTensor], dict(zip(map(_key_of, small), out, strict=True)))
    if kept is None:
        return made
    kept.tensors, kept.segments = made, segments
    return dict(made)


def _members(small: Plan, members: list[int]) -> list[np.ndarray]:
    """The arrays of ``small`` at ``members`` (all of them: one C-level pass)."""
    if len(members) == len(small):  # one group: members are 0, 1, ... in order
        return list(map(_array_of, small))
    return [small[i][1] for i in members]


_size = operator.attrgetter("size")
_key_of = operator.itemgetter(0)
_array_of = operator.itemgetter(1)
_backend_of = operator.itemgetter(2)
_dtype_of = operator.itemgetter(3)
_shape = operator.attrgetter("shape")


def _slab_views(arrays: list[np.ndarray], segment: np.ndarray, dtype: DType) -> list[HostTensor]:
    """``arrays``' copies in ``segment`` (one dtype, packed in order) as tensors: each run
    of equal shapes is one reshape of the segment, whose rows are the views."""
    tensors: list[HostTensor] = []
    address = segment.__array_interface__["data"][0]
    itemsize = segment.itemsize
    start = 0
    for shape, run in itertools.groupby(map(_shape, arrays)):
        n = len(list(run))
        size = math.prod(shape)
        block = segment[start : start + n * size]
        if shape:
            views = list(block.reshape(n, *shape))
        else:  # rows of a 1-D array are scalars, not views
            views = [block[i : i + 1].reshape(()) for i in range(n)]
        step = size * itemsize
        at = address + start * itemsize
        where = range(at, at + n * step, step) if step else [at] * n
        tensors += map(HostTensor, views, itertools.repeat(dtype), where)
        start += n * size
    return tensors


def _copy(
    plan: Plan, staging: StagingPool | None, slab: Slab | None = None
) -> dict[str, HostTensor]:
    """Copy ``plan`` to host memory; ``slab``: its small arrays and where they go."""
    alloc = staging.take if staging is not None else None
    in_slab = _slab_copy(slab) if slab is not None else {}
    if len(in_slab) == len(plan):  # all in the slab, in the plan's order
        return in_slab
    # Host copies are collected and run together at the end, spread across threads.
    with hostcopy.batched():
        return {
            key: in_slab[key]
            if key in in_slab
            else HostTensor(backend.to_host(x, key, dtype, alloc), dtype)
            for key, x, backend, dtype in plan
        }


def _staging_layout(
    *plans: Plan,
) -> tuple[list[tuple[int, bool]], list[Plan], list[tuple[SlabLayout, int]]]:
    """The staging buffers (byte size, pinned) a snapshot of ``plans`` takes, and each
    plan's small NumPy arrays with their slab layout (none where a plan has fewer than two).

    `take_snapshot` and `staging_buffers` (the warm-up) both use it, so a warmed pool holds
    exactly the buffers the next snapshot asks for.
    """
    buffers: list[tuple[int, bool]] = []
    smalls: list[Plan] = []
    for plan in plans:
        small, rest = _split_small(plan)
        if len(small) <= 1:
            small, rest = [], plan  # a slab of one array saves nothing
        smalls.append(small)
        buffers += [
            (math.prod(backend.shape(x)) * dtype.itemsize, backend.stages_pinned(x))
            for _, x, backend, dtype in rest
        ]
    layouts = [_slab_layout(small) for small in smalls]
    buffers += [(n, False) for small, (_, n) in zip(smalls, layouts, strict=True) if small]
    return buffers, smalls, layouts


#: Per staging pool, the `SlabViews` of its last snapshot's slabs (see `_begin_staging`).
_kept_views: weakref.WeakKeyDictionary[StagingPool, list[SlabViews]] = weakref.WeakKeyDictionary()


def _begin_staging(staging: StagingPool, *plans: Plan) -> list[Slab | None]:
    """Tell ``staging`` the snapshot's buffer sizes; take one slab per plan for its small
    NumPy arrays (`None` where a plan has fewer than two), with the views an earlier
    snapshot of the same state made into the same buffer."""
    buffers, smalls, layouts = _staging_layout(*plans)
    entries = [_entry_of(small) for small in smalls]
    # Views keep their slab alive: drop those of other states before `begin` may drop
    # their buffers. A state still saved needs its slab's size again, so the pool keeps it.
    kept = [v for v in _kept_views.get(staging, ()) if any(v.entry is e for e in entries)]
    _kept_views[staging] = kept
    staging.begin(n for n, _ in buffers)
    slabs: list[Slab | None] = []
    views: list[SlabViews] = []
    for small, (groups, n), entry in zip(smalls, layouts, entries, strict=True):
        if not small:
            slabs.append(None)
            continue
        slab = Slab(small, groups, staging.take(n))
        if entry is not None:
            slab.views = next(
                (
                    v
                    for v in kept
                    if v.entry is entry and v.groups is groups and v.buffer is slab.buffer
                ),
                None,
            ) or SlabViews(entry, groups, slab.buffer)
            views.append(slab.views)
        slabs.append(slab)
    _kept_views[staging] = views
    return slabs


def forget_slab_views(staging: StagingPool) -> None:
    """Drop the views into ``staging``'s slabs (call it when the pool releases its
    buffers: the views would keep them alive)."""
    _kept_views.pop(staging, None)


def _entry_of(plan: Plan) -> statecache.Entry | None:
    """The cached facts of ``plan``'s state, when it carries them (`statecache.CheckedPlan`)."""
    return plan.entry if isinstance(plan, statecache.CheckedPlan) else None


def _share_immutable(plan: Plan) -> tuple[Plan, dict[str, HostTensor]]:
    """Split off the arrays that cannot change after the save returns (JAX arrays in host
    memory): the snapshot holds them as they are, with no copy and no staging memory."""
    entry = _entry_of(plan)
    if entry is not None and entry.shares_nothing:
        return plan, {}  # the same arrays as a save that found none (see `statecache`)
    if entry is not None and entry.shares_all and plan:
        # the same JAX arrays as a save that shared them all (see `statecache`): each
        # view's checks hold for good, so only the views are made, in C-level passes
        view = plan[0][2].immutable_view_again
        keys, xs, _, dtypes = zip(*plan, strict=True)
        return [], dict(zip(keys, map(HostTensor, map(view, xs), dtypes), strict=True))
    rest: Plan = []
    shared: dict[str, HostTensor] = {}
    for item in plan:
        key, x, backend, dtype = item
        view = backend.immutable_host_view(x, dtype)
        if view is None:
            rest.append(item)
        else:
            shared[key] = HostTensor(view, dtype)
    if entry is not None:
        entry.shares_nothing = not shared
        entry.shares_all = entry.immutable and not rest and len(set(map(_backend_of, plan))) == 1
    # The plan itself when nothing is shared: it may carry the cached facts of its state
    # (`statecache.CheckedPlan`), which a copy of its items would drop.
    return (plan if not shared else rest), shared


def _within_budget(
    plans: tuple[Plan, ...], max_staging_bytes: int
) -> tuple[tuple[Plan, ...], tuple[dict[str, HostTensor], ...], Handoff | None]:
    """Split ``plans`` for a save that stages at most ``max_staging_bytes``: the arrays
    written last that fit the budget are staged; the ones before them are written in place
    from the caller's memory, which the caller leaves alone until the writer has passed
    them (the returned `Handoff`; ``None`` when everything fits).

    Arrays that have no host view (device arrays, strided or byte-swapped ones) are always
    staged; they must fit the budget themselves.

    Raises:
        InvalidInputError: the arrays that must be copied exceed the budget.
    """
    views: list[dict[str, np.ndarray]] = []
    must_copy = 0
    first_copied = ""
    for plan in plans:
        found = {}
        for key, x, backend, dtype in plan:
            view = backend.host_view(x, key, dtype)
            if view is None:
                must_copy += math.prod(backend.shape(x)) * dtype.itemsize
                first_copied = first_copied or key
            else:
                found[key] = view
        views.append(found)
    if must_copy > max_staging_bytes:
        raise InvalidInputError(
            f"max_staging_bytes={max_staging_bytes} is below the {must_copy} bytes of arrays "
            f"that must be copied to be saved (device arrays, strided or byte-swapped ones, "
            f"e.g. {first_copied!r}); raise the budget, or pass contiguous host arrays"
        )
    # Walk back from the last array written (model file, then optimizer, then extra; each
    # in its file order): stage while the budget lasts, then write the rest in place.
    left = max_staging_bytes - must_copy
    in_place: list[set[str]] = [set() for _ in plans]
    over = False
    for part, key in reversed(_write_order(_sizes(plans))):
        view = views[part].get(key)
        if view is None:
            continue  # counted in must_copy
        if not over and view.nbytes <= left:
            left -= view.nbytes
        else:
            over = True  # stage only a suffix: the caller waits for the last in place
            in_place[part].add(key)
    staged = _without(plans, in_place)
    # The slab's alignment padding counts too: move the first staged arrays in place
    # until the buffers fit (the staged ones stay the last written).
    for part, key in _write_order(_sizes(staged)):
        if sum(n for n, _ in _staging_layout(*staged)[0]) <= max_staging_bytes:
            break
        if key in views[part]:
            in_place[part].add(key)
            staged = _without(plans, in_place)
    count = sum(map(len, in_place))
    if not count:
        return plans, ({}, {}, {}), None
    handoff = Handoff(count)
    reports = iter(handoff.callbacks())
    borrowed = tuple(
        {
            key: HostTensor(views[part][key], dtype, written=next(reports))
            for key, _, _, dtype in plans[part]
            if key in in_place[part]
        }
        for part in range(len(plans))
    )
    return staged, borrowed, handoff


def _without(plans: tuple[Plan, ...], keys: list[set[str]]) -> tuple[Plan, ...]:
    """Each plan without the items whose key is in its part of ``keys``."""
    return tuple(
        [item for item in plan if item[0] not in drop]
        for plan, drop in zip(plans, keys, strict=True)
    )


def _sizes(plans: tuple[Plan, ...]) -> list[list[tuple[str, int]]]:
    return [[(key, dtype.itemsize) for key, *_, dtype in plan] for plan in plans]


def _write_order(parts: list[list[tuple[str, int]]]) -> list[tuple[int, str]]:
    """(part, name) of every tensor of ``parts`` (each a list of (name, item size)) in the
    order a save writes them: the model file, then the optimizer's, then the extra one,
    each in its file order (`format.file_order`)."""
    order = []
    for part, tensors in enumerate(parts):
        names = tuple(name for name, _ in tensors)
        itemsizes = tuple(size for _, size in tensors)
        order += [(part, names[i]) for i in format.file_order(names, itemsizes)]
    return order


def check_budget(max_staging_bytes: Any) -> int | None:
    """``max_staging_bytes`` as given to `AsyncCheckpointer`: a positive int or ``None``."""
    if max_staging_bytes is None:
        return None
    if type(max_staging_bytes) is not int or max_staging_bytes < 1:
        raise InvalidInputError(
            f"max_staging_bytes must be a positive int (bytes) or None, not {max_staging_bytes!r}"
        )
    return max_staging_bytes


def staging_buffers(
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    *,
    extra: Any = None,
    max_staging_bytes: int | None = None,
) -> list[tuple[int, bool]]:
    """The staging buffers (byte size, pinned) an asynchronous save of this state takes;
    validates the state like a save. Arrays may be the real state or any arrays of the
    same shapes, dtypes and kinds."""
    plans = tuple(
        _share_immutable(plan)[0] for plan, _, _ in _validated(model_state, optimizer_state, extra)
    )
    # Each dtype's NumPy form, now: BF16 and F8 import ml_dtypes (~0.45 s), which the
    # first save's stall would pay otherwise.
    for dtype in {dtype for plan in plans for *_, dtype in plan}:
        _ = dtype.numpy
    if max_staging_bytes is not None:
        plans = _within_budget(plans, max_staging_bytes)[0]
    return _staging_layout(*plans)[0]


def _in_order(
    keys: list[str], ready: dict[str, HostTensor], copied: dict[str, HostTensor]
) -> dict[str, HostTensor]:
    """The snapshot's tensors in the caller's key order, wherever each was copied."""
    if not ready:
        return copied
    return {key: ready[key] if key in ready else copied[key] for key in keys}


def _synchronize(*plans: Plan) -> None:
    """Wait once per backend for the (possibly asynchronous) device-to-host copies."""
    found: dict[int, backends.Backend] = {}
    for plan in plans:
        kinds = list(map(_backend_of, plan))
        if kinds and kinds.count(kinds[0]) == len(kinds):  # one backend: a C-level pass
            found[id(kinds[0])] = kinds[0]
        else:
            found.update(zip(map(id, kinds), kinds, strict=True))
    for backend in found.values():
        backend.synchronize()


def _by_staging(plan: Plan) -> tuple[Plan, Plan]:
    """``plan``'s arrays that stage in pinned memory (device arrays), and the others."""
    entry = _entry_of(plan)
    if entry is not None and entry.pins_nothing:
        return [], plan  # the same arrays as a save that found none (see `statecache`)
    pinned = [item[2].stages_pinned(item[1]) for item in plan]
    if entry is not None and not any(pinned):
        entry.pins_nothing = True
        return [], plan  # the plan itself: it carries its state's cached facts
    return list(itertools.compress(plan, pinned)), [
        item for item, p in zip(plan, pinned, strict=True) if not p
    ]


@dataclass
class PendingSnapshot:
    """A validated snapshot whose host copies have not run yet (see `start_snapshot`)."""

    #: Per part (model, optimizer, extra): every key in the caller's order, the arrays
    #: still to copy, their slab (small NumPy arrays), and what is already in host memory.
    keys: tuple[list[str], ...]
    host_plans: tuple[Plan, ...]
    slabs: list[Slab | None]
    ready: tuple[dict[str, HostTensor], ...]
    device_plans: tuple[Plan, ...]
    staging: StagingPool | None
    #: The snapshot with every field but its tensors.
    template: Snapshot
    #: The caller's arrays written in place (a save within a staging budget): the caller
    #: must not change them before ``handoff.done``; ``None`` when every array is staged.
    handoff: Handoff | None = None

    def finish(self) -> Snapshot:
        """Run the host copies and wait for the device ones: the snapshot is complete."""
        snap, copy = self.start_copies()
        copy()
        return snap

    def start_copies(self) -> tuple[Snapshot, Callable[[], None]]:
        """The snapshot with its buffers taken but its host copies not run, and the
        function that runs them and waits for the device copies.

        Until that function returns, the tensors still to be copied carry a gate
        (`HostTensor.ready`) that the writer waits at: a write started at once writes
        the first tensors while the later ones copy, so a save takes about
        max(copy, write) instead of their sum. The copies run in write order (model,
        optimizer, extra; each in file order) in runs of `PIPELINE_BYTES`. If they fail,
        every gate fails, and a writer waiting at one raises instead of reading.
        """
        try:
            with hostcopy.recorded() as jobs:  # one batch of copies for all states
                copies = [
                    _copy(plan, self.staging, slab)
                    for plan, slab in zip(self.host_plans, self.slabs, strict=True)
                ]
        except BaseException:
            # Also after a failed copy: no device copy may still write into staging
            # buffers the next snapshot will reuse.
            _synchronize(*self.device_plans, *self.host_plans)
            raise
        if self.staging is not None:
            self.staging.end()
        parts = [
            _in_order(keys, ready, copied)
            for keys, ready, copied in zip(self.keys, self.ready, copies, strict=True)
        ]
        devices = [{key for key, *_ in plan} for plan in self.device_plans]
        runs, gates = _gate(parts, devices, jobs)
        model, optimizer, extra = parts

        def copy() -> None:
            try:
                try:
                    for run, group in enumerate(runs):
                        hostcopy.run_copies(group)
                        gates.open(run)
                finally:  # one synchronisation per snapshot, also after a failed copy
                    _synchronize(*self.device_plans, *self.host_plans)
            except BaseException as exc:
                gates.fail(exc)
                raise
            gates.open(len(runs))  # the device copies' gate

        snap = replace(
            self.template,
            model=model,
            optimizer=optimizer,
            extra=None if self.template.extra is None else extra,
        )
        return snap, copy


#: A snapshot's host copies are released to the writer in runs of about this many bytes.
PIPELINE_BYTES = 64 << 20


def _gate(
    parts: list[dict[str, HostTensor]], devices: list[set[str]], jobs: list[hostcopy.Copy]
) -> tuple[list[list[hostcopy.Copy]], CopyGates]:
    """Group ``jobs`` into runs in write order, and give each tensor they copy into the
    gate of its run (in place in ``parts``); device copies get the last gate. Returns
    the runs and the gates (one per run, plus the device copies')."""
    if not jobs and not any(devices):  # e.g. every tensor in the slab: all copied already
        return [], CopyGates(1)
    order = _write_order([[(k, t.dtype.itemsize) for k, t in part.items()] for part in parts])
    # Each copy lands in one tensor's buffer (or a piece of it): find it by address.
    spans = sorted(
        (parts[part][key].data_ptr, index)
        for index, (part, key) in enumerate(order)
        if parts[part][key].nbytes
    )
    starts = [start for start, _ in spans]
    target: list[int] = []
    for dst, _ in jobs:
        at = bisect.bisect_right(starts, dst.__array_interface__["data"][0]) - 1
        target.append(spans[at][1] if at >= 0 else 0)
    copied = set(target)
    run_of: dict[int, int] = {}
    run, filled = 0, 0
    for index, (part, key) in enumerate(order):
        if index in copied:
            if filled >= PIPELINE_BYTES:
                run, filled = run + 1, 0
            run_of[index] = run
            filled += parts[part][key].nbytes
    runs: list[list[hostcopy.Copy]] = [[] for _ in range(run + 1 if run_of else 0)]
    for job, index in zip(jobs, target, strict=True):
        runs[run_of[index]].append(job)
    gates = CopyGates(len(runs) + 1)
    for index, (part, key) in enumerate(order):
        gate = run_of.get(index)
        if gate is None and key in devices[part]:
            gate = len(runs)
        if gate is not None:
            parts[part][key] = replace(parts[part][key], ready=gates.waiter(gate))
    return runs, gates


def start_snapshot(
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None,
    training_state: TrainingState | None,
    *,
    staging: StagingPool | None,
    extra: Any = None,
    max_staging_bytes: int | None = None,
) -> PendingSnapshot:
    """Validate the state, take its staging buffers and issue the device-to-host copies
    (asynchronous on the device's side stream); `PendingSnapshot.finish` does the rest.

    With ``max_staging_bytes`` (and ``staging``) at most that many bytes are staged: the
    arrays written first are written in place instead (see `_within_budget`).

    Everything that can refuse the state runs here, in the caller's thread; `finish` may
    run on another thread (background staging), as long as the caller leaves the arrays
    alone until it is done. Device copies are issued here because they must be ordered
    after the caller's own stream, which only the caller's thread knows.
    """
    training_state = TrainingState(step=0) if training_state is None else training_state
    if not isinstance(training_state, TrainingState):
        raise InvalidInputError(
            f"training_state must be a TrainingState, not {type(training_state).__name__}"
        )
    training_state.to_json()  # validates; raises before anything is copied
    format.import_writer_modules()
    (
        (model_plan, model_tree, model_aliases),
        (optimizer_plan, optimizer_tree, optimizer_aliases),
        (extra_plan, extra_tree, extra_aliases),
    ) = _validated(model_state, optimizer_state, extra)
    full = (model_plan, optimizer_plan, extra_plan)
    plans: tuple[Plan, ...] = full
    shared: tuple[dict[str, HostTensor], ...] = ({}, {}, {})
    handoff = None
    if staging is not None:
        split = [_share_immutable(plan) for plan in plans]
        plans = tuple(rest for rest, _ in split)
        shared = tuple(views for _, views in split)
        if max_staging_bytes is not None:
            plans, in_place, handoff = _within_budget(plans, max_staging_bytes)
            shared = tuple({**a, **b} for a, b in zip(shared, in_place, strict=True))
    slabs: list[Slab | None] = (
        _begin_staging(staging, *plans) if staging is not None else [None] * len(plans)
    )
    split_by_staging = [_by_staging(plan) for plan in plans]
    device_plans = tuple(device for device, _ in split_by_staging)
    host_plans = tuple(host for _, host in split_by_staging)
    try:
        issued = [_copy(plan, staging) for plan in device_plans]
    except BaseException:
        _synchronize(*device_plans)
        raise
    template = Snapshot(
        {},
        {},
        training_state,
        model_tree,
        optimizer_tree,
        model_aliases,
        optimizer_aliases,
        borrowed=staging is None,
        extra=None if extra is None else {},
        extra_tree=extra_tree,
        extra_aliases=extra_aliases,
    )
    return PendingSnapshot(
        keys=tuple(list(map(_key_of, plan)) for plan in full),
        host_plans=host_plans,
        slabs=slabs,
        ready=tuple({**a, **b} for a, b in zip(shared, issued, strict=True)),
        device_plans=device_plans,
        staging=staging,
        template=template,
        handoff=handoff,
    )


def finish_in_background(pending: PendingSnapshot) -> tuple[Future[Snapshot], Future[None]]:
    """Run ``pending.finish()`` on a thread of its own (not the writer's, which may be busy
    with another checkpointer's write): the snapshot, and a future that only tells when
    the copies are done (what the caller waits on before changing its arrays)."""
    snapshot: Future[Snapshot] = Future()
    staged: Future[None] = Future()

    def run() -> None:
        try:
            snap, copy = pending.start_copies()
        except BaseException as exc:
            staged.set_exception(exc)
            snapshot.set_exception(exc)
            return
        snapshot.set_result(snap)  # the writer may start: it waits for each tensor's copy
        try:
            copy()
        except BaseException as exc:
            staged.set_exception(exc)
        else:
            staged.set_result(None)

    # Lowered like the writer: the copies use what the training step leaves idle.
    thread = threading.Thread(target=priority.background(run), name="arrayckpt-stage", daemon=True)
    if not pool.start(thread):  # the interpreter is exiting: copy on this thread
        run()
    return snapshot, staged


def take_snapshot(
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None,
    training_state: TrainingState | None,
    *,
    staging: StagingPool | None,
    extra: Any = None,
) -> Snapshot:
    """Validate and copy one checkpoint's state to host memory.

    Every key and value is validated before the first byte is copied. With ``staging``
    each array is copied into the pool's reusable buffers (so the caller may mutate its
    arrays afterwards), except JAX arrays in host memory, which never change and are held
    as they are; without it, host arrays that are already contiguous are used in place
    (zero copy, for synchronous saves).

    With ``staging``, the pool's previous snapshot is overwritten: its write must be done.
    ``extra`` is nested state like the optimizer's (see `nested.flatten`); ``None`` saves none.
    """
    return start_snapshot(
        model_state, optimizer_state, training_state, staging=staging, extra=extra
    ).finish()


def _validated(
    model_state: Any, optimizer_state: Any, extra: Any
) -> list[tuple[Plan, str | None, dict[str, str]]]:
    """Each part (model, optimizer, extra) flattened, planned and checked against the
    writer's limits: its plan, JSON tree and tied-tensor aliases. Raises before anything
    is copied or allocated."""
    parts = []
    for state, what in (
        (model_state, "model_state"),
        (optimizer_state, "optimizer_state"),
        (extra, "extra"),
    ):
        flat, tree, tied = _flatten(state, what=what)
        plan = _plan(flat, what=what)
        _check_writable(plan, tree, what=what)
        parts.append((plan, tree, tied))
    return parts


def _check_writable(plan: Plan, tree: str | None, *, what: str) -> None:
    """Refuse now, in the caller's thread, a file the writer would refuse (`limits`)."""
    entry = plan.entry if isinstance(plan, statecache.CheckedPlan) else None
    if entry is not None and tree in entry.writable:
        return  # the same names, dtypes and shapes passed with this tree (see `statecache`)
    layout = [
        (key, dtype, x.shape if type(x) is np.ndarray else backend.shape(x))
        for key, x, backend, dtype in plan
    ]
    format.check_writable(what, layout, None if tree is None else {nested.TREE_KEY: tree})
    if entry is not None:
        entry.writable = {tree}  # one tree: a nested state's tree changes with its scalars


def _flatten(
    state: Any, *, what: str
) -> tuple[Mapping[str, Any] | None, str | None, dict[str, str]]:
    """The arrays to store (a tied tensor once), the tree, and the aliases of tied tensors."""
    if state is None:
        return None, None, {}
    flat, tree = nested.flatten(state, what=what)
    entry = statecache.entry_for(flat)
    if entry is None:
        tied = aliases.find_aliases(flat, what=what)
        return {k: v for k, v in flat.items() if k not in tied}, tree, tied
    if entry.aliases is None:  # a state not seen before (or changed): check it
        entry.aliases = aliases.find_aliases(flat, what=what)
    tied = dict(entry.aliases)
    stored = [(k, v) for k, v in flat.items() if k not in tied] if tied else flat
    return statecache.CheckedState(stored, entry), tree, tied


def check_key(key: Any, *, what: str) -> str:
    """A tensor name must be a non-empty str without NUL, and not safetensors' reserved key."""
    if not isinstance(key, str):
        raise InvalidInputError(f"{what}: key {key!r} is a {type(key).__name__}, not a str")
    if not _keys_valid([key]):
        raise InvalidInputError(
            f"{what}: key {key!r} is not a valid tensor name "
            "(empty, NUL, '__metadata__', or a lone surrogate that UTF-8 cannot encode)"
        )
    return key


def _is_utf8(text: str) -> bool:
    """False for strings with lone surrogates, which no file header can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_mapping(state: Any, *, what: str) -> Mapping[str, Any]:
    if not isinstance(state, Mapping):
        raise InvalidInputError(
            f"{what} must be a mapping of str to arrays, not {type(state).__name__}"
        )
    return state
