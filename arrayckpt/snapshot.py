"""Snapshots: validate a checkpoint's state and copy it to host memory owned by arrayckpt."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import aliases, backends, format, hostcopy, nested, pool, priority
from .dtypes import DType
from .errors import InvalidInputError
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
        return sum(t.nbytes for part in parts for t in part.values())


Plan = list[tuple[str, Any, backends.Backend, DType]]


def _plan(state: Mapping[str, Any] | None, *, what: str) -> Plan:
    """Validate every key and value of ``state`` before the first byte is copied."""
    if state is None:
        return []
    state = check_mapping(state, what=what)
    plan = []
    for key, x in state.items():
        check_key(key, what=what)
        backend = backends.for_array(x, key)
        plan.append((key, x, backend, backend.dtype(x, key)))
    return plan


#: NumPy arrays up to this size share one staging slab per snapshot (see `_slab_copy`).
SLAB_MAX_BYTES = 64 << 10


def _split_small(plan: Plan) -> tuple[Plan, Plan]:
    """Split off the small, C-contiguous, little-endian NumPy arrays of ``plan``."""
    small: Plan = []
    rest: Plan = []
    numpy_backend = backends.for_array(_NUMPY_PROBE, "")
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


SlabLayout = list[tuple[np.dtype[Any], list[int]]]


def _slab_layout(small: Plan) -> tuple[SlabLayout, int]:
    """Group ``small`` by dtype: each group's plan indices, and the slab's byte size.

    Each group starts 64-byte aligned, so every view into the slab is aligned.
    """
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


def _slab_copy(small: Plan, groups: SlabLayout, slab: np.ndarray) -> dict[str, HostTensor]:
    """Copy many small arrays into one slab laid out by `_slab_layout`: one
    `np.concatenate` per dtype instead of a staging buffer, views and a copy call per array
    (20,000 tensors of 4 KiB: ~5 µs less each)."""
    out: list[HostTensor | None] = [None] * len(small)
    at = 0
    for dt, members in groups:
        at = -(-at // 64) * 64
        arrays = [small[i][1] for i in members]
        count = sum(a.size for a in arrays)
        segment = slab[at : at + count * dt.itemsize].view(dt)
        np.concatenate([a.ravel() for a in arrays], out=segment)
        dtype = small[members[0]][3]
        start = 0
        address = segment.__array_interface__["data"][0]
        for i, a in zip(members, arrays, strict=True):
            end = start + a.size
            view = segment[start:end]
            out[i] = HostTensor(
                view if a.ndim == 1 else view.reshape(a.shape),
                dtype,
                address + start * dt.itemsize,
            )
            start = end
        at += count * dt.itemsize
    return {item[0]: t for item, t in zip(small, out, strict=True) if t is not None}


def _copy(
    plan: Plan,
    staging: StagingPool | None,
    slab: tuple[Plan, SlabLayout, np.ndarray] | None = None,
) -> dict[str, HostTensor]:
    """Copy ``plan`` to host memory; ``slab``: its small arrays, their layout, the slab."""
    alloc = staging.take if staging is not None else None
    in_slab = _slab_copy(*slab) if slab is not None else {}
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


def _begin_staging(
    staging: StagingPool, *plans: Plan
) -> list[tuple[Plan, SlabLayout, np.ndarray] | None]:
    """Tell ``staging`` the snapshot's buffer sizes; take one slab per plan for its small
    NumPy arrays (`None` where a plan has fewer than two)."""
    buffers, smalls, layouts = _staging_layout(*plans)
    staging.begin(n for n, _ in buffers)
    return [
        (small, groups, staging.take(n)) if small else None
        for small, (groups, n) in zip(smalls, layouts, strict=True)
    ]


def _share_immutable(plan: Plan) -> tuple[Plan, dict[str, HostTensor]]:
    """Split off the arrays that cannot change after the save returns (JAX arrays in host
    memory): the snapshot holds them as they are, with no copy and no staging memory."""
    rest: Plan = []
    shared: dict[str, HostTensor] = {}
    for item in plan:
        key, x, backend, dtype = item
        view = backend.immutable_host_view(x, dtype)
        if view is None:
            rest.append(item)
        else:
            shared[key] = HostTensor(view, dtype)
    return rest, shared


def staging_buffers(
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    *,
    extra: Any = None,
) -> list[tuple[int, bool]]:
    """The staging buffers (byte size, pinned) an asynchronous save of this state takes;
    validates the state like a save. Arrays may be the real state or any arrays of the
    same shapes, dtypes and kinds."""
    plans = [
        _share_immutable(plan)[0] for plan, _, _ in _validated(model_state, optimizer_state, extra)
    ]
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
    for backend in {id(b): b for plan in plans for _, _, b, _ in plan}.values():
        backend.synchronize()


@dataclass
class PendingSnapshot:
    """A validated snapshot whose host copies have not run yet (see `start_snapshot`)."""

    #: Per part (model, optimizer, extra): every key in the caller's order, the arrays
    #: still to copy, their slab (small NumPy arrays), and what is already in host memory.
    keys: tuple[list[str], ...]
    host_plans: tuple[Plan, ...]
    slabs: list[tuple[Plan, SlabLayout, np.ndarray] | None]
    ready: tuple[dict[str, HostTensor], ...]
    device_plans: tuple[Plan, ...]
    staging: StagingPool | None
    #: The snapshot with every field but its tensors.
    template: Snapshot

    def finish(self) -> Snapshot:
        """Run the host copies and wait for the device ones: the snapshot is complete."""
        try:
            with hostcopy.batched():  # one batch of copies for all states
                copies = [
                    _copy(plan, self.staging, slab)
                    for plan, slab in zip(self.host_plans, self.slabs, strict=True)
                ]
        finally:
            # One synchronisation per snapshot; also after a failed copy, so no device copy
            # still writes into staging buffers the next snapshot will reuse.
            _synchronize(*self.device_plans, *self.host_plans)
        if self.staging is not None:
            self.staging.end()
        model, optimizer, extra = (
            _in_order(keys, ready, copied)
            for keys, ready, copied in zip(self.keys, self.ready, copies, strict=True)
        )
        return replace(
            self.template,
            model=model,
            optimizer=optimizer,
            extra=None if self.template.extra is None else extra,
        )


def start_snapshot(
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None,
    training_state: TrainingState | None,
    *,
    staging: StagingPool | None,
    extra: Any = None,
) -> PendingSnapshot:
    """Validate the state, take its staging buffers and issue the device-to-host copies
    (asynchronous on the device's side stream); `PendingSnapshot.finish` does the rest.

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
    if staging is not None:
        split = [_share_immutable(plan) for plan in plans]
        plans = tuple(rest for rest, _ in split)
        shared = tuple(views for _, views in split)
    slabs: list[tuple[Plan, SlabLayout, np.ndarray] | None] = (
        _begin_staging(staging, *plans) if staging is not None else [None] * len(plans)
    )
    device_plans = tuple(
        [item for item in plan if item[2].stages_pinned(item[1])] for plan in plans
    )
    host_plans = tuple(
        [item for item in plan if not item[2].stages_pinned(item[1])] for plan in plans
    )
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
        keys=tuple([key for key, *_ in plan] for plan in full),
        host_plans=host_plans,
        slabs=slabs,
        ready=tuple({**a, **b} for a, b in zip(shared, issued, strict=True)),
        device_plans=device_plans,
        staging=staging,
        template=template,
    )


def finish_in_background(pending: PendingSnapshot) -> tuple[Future[Snapshot], Future[None]]:
    """Run ``pending.finish()`` on a thread of its own (not the writer's, which may be busy
    with another checkpointer's write): the snapshot, and a future that only tells when
    the copies are done (what the caller waits on before changing its arrays)."""
    snapshot: Future[Snapshot] = Future()
    staged: Future[None] = Future()

    def run() -> None:
        try:
            snap = pending.finish()
        except BaseException as exc:
            staged.set_exception(exc)
            snapshot.set_exception(exc)
        else:
            staged.set_result(None)
            snapshot.set_result(snap)

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
    layout = [(key, dtype, backend.shape(x)) for key, x, backend, dtype in plan]
    format.check_writable(what, layout, None if tree is None else {nested.TREE_KEY: tree})


def _flatten(
    state: Any, *, what: str
) -> tuple[Mapping[str, Any] | None, str | None, dict[str, str]]:
    """The arrays to store (a tied tensor once), the tree, and the aliases of tied tensors."""
    if state is None:
        return None, None, {}
    flat, tree = nested.flatten(state, what=what)
    tied = aliases.find_aliases(flat, what=what)
    return {k: v for k, v in flat.items() if k not in tied}, tree, tied


def check_key(key: Any, *, what: str) -> str:
    """A tensor name must be a non-empty str without NUL, and not safetensors' reserved key."""
    if not isinstance(key, str):
        raise InvalidInputError(f"{what}: key {key!r} is a {type(key).__name__}, not a str")
    if not key or "\x00" in key or key == "__metadata__" or not _is_utf8(key):
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
