"""Synchronous save and load of one checkpoint directory (boostr's layout)."""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import numpy as np

from . import backends, fill, format, fsops, hostcopy, nested, pool
from .commit import commit_directory
from .dtypes import DType
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsupportedArrayError,
)
from .layout import (
    MODEL_FILE,
    OLD_MARKER,
    OPTIMIZER_FILE,
    SHARDING_META_FILE,
    TRAINING_STATE_FILE,
    rank_dir_name,
)
from .snapshot import HostTensor, StagingPool, check_key, check_mapping
from .training_state import TrainingState

log = logging.getLogger("arrayckpt")

PathLike = str | os.PathLike[str]
T = TypeVar("T")


class Checkpoint(NamedTuple):
    """A loaded checkpoint: ``model, optimizer, training_state = load_checkpoint(...)``.

    ``model`` and ``optimizer`` have the structure that was saved: a flat ``str -> array``
    dict, or the nested dicts/lists/tuples of a state dict or pytree.
    """

    model: Any
    optimizer: Any | None
    training_state: TrainingState


@dataclass(frozen=True)
class Snapshot:
    """Everything one save writes, already in host memory owned by arrayckpt."""

    model: dict[str, HostTensor]
    optimizer: dict[str, HostTensor]
    training_state: TrainingState
    #: JSON trees of nested states (see `nested`); ``None`` for flat mappings.
    model_tree: str | None = None
    optimizer_tree: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for part in (self.model, self.optimizer) for t in part.values())


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
            key: in_slab[key] if key in in_slab
            else HostTensor(backend.to_host(x, key, dtype, alloc), dtype)
            for key, x, backend, dtype in plan
        }


def _begin_staging(
    staging: StagingPool, *plans: Plan
) -> list[tuple[Plan, SlabLayout, np.ndarray] | None]:
    """Tell ``staging`` the snapshot's buffer sizes; take one slab per plan for its small
    NumPy arrays (`None` where a plan has fewer than two)."""
    sizes: list[int] = []
    smalls: list[Plan] = []
    for plan in plans:
        small, rest = _split_small(plan)
        if len(small) <= 1:
            small, rest = [], plan  # a slab of one array saves nothing
        smalls.append(small)
        sizes += [math.prod(backend.shape(x)) * dtype.itemsize for _, x, backend, dtype in rest]
    layouts = [_slab_layout(small) for small in smalls]
    staging.begin(sizes + [n for small, (_, n) in zip(smalls, layouts, strict=True) if small])
    return [
        (small, groups, staging.take(n)) if small else None
        for small, (groups, n) in zip(smalls, layouts, strict=True)
    ]


def _synchronize(*plans: Plan) -> None:
    """Wait once per backend for the (possibly asynchronous) device-to-host copies."""
    for backend in {id(b): b for plan in plans for _, _, b, _ in plan}.values():
        backend.synchronize()


def take_snapshot(
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None,
    training_state: TrainingState | None,
    *,
    staging: StagingPool | None,
) -> Snapshot:
    """Validate and copy one checkpoint's state to host memory.

    Every key and value is validated before the first byte is copied. With ``staging``
    each array is copied into the pool's reusable buffers (so the caller may mutate its
    arrays afterwards); without it, host arrays that are already contiguous are used in
    place (zero copy, for synchronous saves).

    With ``staging``, the pool's previous snapshot is overwritten: its write must be done.
    """
    training_state = TrainingState(step=0) if training_state is None else training_state
    if not isinstance(training_state, TrainingState):
        raise InvalidInputError(
            f"training_state must be a TrainingState, not {type(training_state).__name__}"
        )
    training_state.to_json()  # validates; raises before anything is copied
    flat_model, model_tree = _flatten(model_state, what="model_state")
    flat_optimizer, optimizer_tree = _flatten(optimizer_state, what="optimizer_state")
    model_plan = _plan(flat_model, what="model_state")
    optimizer_plan = _plan(flat_optimizer, what="optimizer_state")
    slabs = (
        _begin_staging(staging, model_plan, optimizer_plan) if staging is not None else [None, None]
    )
    try:
        with hostcopy.batched():  # one batch of copies for both states
            model = _copy(model_plan, staging, slabs[0])
            optimizer = _copy(optimizer_plan, staging, slabs[1])
    finally:
        # One synchronisation per snapshot; also after a failed copy, so no device copy
        # still writes into staging buffers the next snapshot will reuse.
        _synchronize(model_plan, optimizer_plan)
    if staging is not None:
        staging.end()
    return Snapshot(model, optimizer, training_state, model_tree, optimizer_tree)


def _flatten(state: Any, *, what: str) -> tuple[Mapping[str, Any] | None, str | None]:
    if state is None:
        return None, None
    return nested.flatten(state, what=what)


def _tree_metadata(tree: str | None) -> dict[str, str] | None:
    return None if tree is None else {nested.TREE_KEY: tree}


def write_files(directory: Path, snap: Snapshot) -> None:
    """Write and fsync a checkpoint's files into an (uncommitted) directory.

    Two threads write at once: this one the model file, a second one the optimizer file
    and ``training_state.json``. Overlapping one file's fsync with the other's writing
    finished sooner than one file after the other (``bench/writer_variants.py``).
    """

    def other_files() -> None:
        if snap.optimizer or snap.optimizer_tree is not None:
            format.write_file(
                directory / OPTIMIZER_FILE, snap.optimizer, _tree_metadata(snap.optimizer_tree)
            )
        state_path = directory / TRAINING_STATE_FILE
        fs = fsops.fs()
        fs.write_bytes(state_path, snap.training_state.to_json().encode())
        fs.fsync_file(state_path)

    others = pool.in_new_thread(other_files, "arrayckpt-second-writer")
    try:
        format.write_file(directory / MODEL_FILE, snap.model, _tree_metadata(snap.model_tree))
    finally:
        # Never return (and let the commit remove the directory) while it still writes.
        error = others.exception()
    if error is not None:
        raise error


def write_snapshot(directory: PathLike, snap: Snapshot) -> Path:
    """Atomically commit ``snap`` as the checkpoint at ``directory``."""
    started = time.perf_counter()
    target = commit_directory(directory, lambda tmp: write_files(tmp, snap))
    log.info(
        "saved %s: %d tensors, %.1f MiB in %.3f s",
        target,
        len(snap.model) + len(snap.optimizer),
        snap.nbytes / 2**20,
        time.perf_counter() - started,
    )
    return target


def save_checkpoint(
    directory: PathLike,
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    training_state: TrainingState | None = None,
) -> Path:
    """Save a checkpoint directory atomically and durably, and return its path.

    Writes ``model.safetensors``, ``optimizer.safetensors`` (only when non-empty) and
    ``training_state.json`` into a temporary sibling, fsyncs them, and swaps the
    directory into place: ``directory`` holds the complete previous checkpoint or the
    complete new one at every instant.

    Args:
        directory: where the checkpoint goes; must be new, empty, or a checkpoint.
        model_state: ``str -> array`` of any supported framework (mixed is fine).
        optimizer_state: as ``model_state``; ``None`` or empty writes no optimizer file.
        training_state: step, epoch, learning rate and metadata; default ``step=0``.

    Raises:
        InvalidInputError: a key, value or training-state field cannot be saved
            (`UnsupportedArrayError` for arrays and dtypes); nothing is written.
        CheckpointWriteError: I/O failed; the previous checkpoint is intact.

    Example:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = ac.save_checkpoint(f"{d}/step_1", {"w": np.ones(3, np.float32)},
        ...                        training_state=ac.TrainingState(step=1))
        >>> ac.load_checkpoint(f"{d}/step_1").model["w"]
        array([1., 1., 1.], dtype=float32)
    """
    snap = take_snapshot(model_state, optimizer_state, training_state, staging=None)
    return write_snapshot(directory, snap)


def load_state_file(
    path: Path,
    *,
    xp: ModuleType | str | None = None,
    device: Any = None,
    verify: bool = True,
    mmap: bool = True,
    keys: Iterable[str] | None = None,
    into: Any = None,
) -> Any:
    """Load one safetensors file as arrays of ``xp`` on ``device``, in its saved structure.

    With ``keys``, only those tensors (by their names in the file) are read and checked,
    returned as a flat dict. With ``into``, the tensors are copied into its arrays instead
    (see `fill.fill`), and ``into`` is returned.
    """
    if keys is not None and into is not None:
        raise InvalidInputError("keys= and into= cannot be combined; pick one")
    # eager partial loads read only the header and the requested tensors' byte ranges
    reader = format.SafetensorsReader(path, mmap=mmap, ranges=keys is not None and not mmap)
    if into is not None:
        return fill.fill(into, reader, verify=verify)
    backend = backends.for_namespace(xp)
    backend.check_device(device)

    def get(name: str) -> Any:
        try:
            return backend.from_host(reader.array(name, verify=verify), device)
        except UnsupportedArrayError as exc:
            raise UnsupportedArrayError(f"{path}: tensor {name!r}: {exc}") from exc

    if keys is not None:
        if isinstance(keys, str):
            raise InvalidInputError(f"keys must be a list of tensor names, not the str {keys!r}")
        missing = [k for k in keys if k not in reader.header.entries]
        if missing:
            raise CheckpointNotFoundError(
                f"{path}: no tensors named {missing[:5]}; `arrayckpt inspect` lists them"
            )
        return {name: get(name) for name in keys}
    tree = reader.header.metadata.get(nested.TREE_KEY)
    if tree is not None:
        return nested.unflatten(tree, get, set(reader.names), source=str(path))
    return {name: get(name) for name in reader.names}


def load_checkpoint(
    directory: PathLike,
    *,
    xp: ModuleType | str | None = None,
    device: Any = None,
    verify: bool = True,
    mmap: bool = True,
    keys: Iterable[str] | None = None,
    optimizer: bool = True,
    into: Any = None,
) -> Checkpoint:
    """Load a checkpoint directory into arrays of any framework.

    Args:
        directory: a checkpoint written by arrayckpt or boostr.
        xp: the namespace of the arrays to return: ``None`` (NumPy), a module
            (``numpy``, ``torch``, ``cupy``, ``jax.numpy``, ``array_api_strict``, ...)
            or its name.
        device: that framework's device (``"cuda:0"``, a CuPy ``Device``, ...).
        verify: check every loaded tensor's CRC32C (files from other tools have none).
        mmap: map files copy-on-write (zero copy; best on local disks); ``False`` reads
            each file sequentially (best on network file systems).
        keys: load only these model tensors (names as in the file, dotted for nested
            state), as a flat dict; the rest of the file is never read (with ``mmap=False``
            only the header and those tensors' byte ranges are read).
        optimizer: ``False`` skips the optimizer file (``optimizer`` is then ``None``).
        into: an existing model state with the saved structure (e.g.
            ``model.state_dict()``): tensors are copied into its arrays in place, on
            their devices, and ``model`` is ``into`` itself. ``xp`` and ``device`` are
            then unused.

    Returns:
        ``Checkpoint(model, optimizer, training_state)``; ``model`` and ``optimizer`` have
        the saved structure; ``optimizer`` is ``None`` when no optimizer file was saved.

    Raises:
        CheckpointNotFoundError: the directory, a required file or a requested key is missing.
        CorruptCheckpointError: a file is malformed or fails its checksum (names which).
        InvalidInputError: ``into`` does not match the saved structure, shapes or dtypes.

    Example:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = ac.save_checkpoint(d, {"w": np.ones(2, np.float32), "b": np.zeros(1)})
        >>> ac.load_checkpoint(d, keys=["w"]).model
        {'w': array([1., 1.], dtype=float32)}
    """
    root = Path(directory)
    options = {"xp": xp, "device": device, "verify": verify, "mmap": mmap}
    return read_consistently(
        root, lambda: _load_once(root, options, keys=keys, optimizer=optimizer, into=into)
    )


_LOAD_ATTEMPTS = 100


def read_consistently(root: Path, read: Callable[[], T]) -> T:
    """``read()`` the directory ``root`` as one unit, even while saves replace it.

    A save may swap the directory while we read it. Its files are never changed in place,
    so if the directory is the same one before and after, everything read came from it;
    otherwise read again (a renamed-in directory has a new inode or ctime).
    """
    for _ in range(_LOAD_ATTEMPTS):
        before = _identity(root)
        try:
            loaded = read()
        except CheckpointError:
            if before is not None and _identity(root) != before:
                continue
            raise
        if _identity(root) == before:
            return loaded
    raise CheckpointError(
        f"{root} was replaced {_LOAD_ATTEMPTS} times while it was being loaded; "
        "load it when saves to it pause"
    )


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _load_once(
    root: Path, options: dict[str, Any], *, keys: Iterable[str] | None, optimizer: bool,
    into: Any,
) -> Checkpoint:
    if not root.is_dir():
        raise CheckpointNotFoundError(
            f"no complete checkpoint at {root}: not a directory{interrupted_save_hint(root)}"
        )
    if (root / SHARDING_META_FILE).exists() and not (root / MODEL_FILE).exists():
        raise InvalidInputError(
            f"{root} is a distributed checkpoint; use load_distributed_checkpoint(directory, rank)"
        )
    if not (root / MODEL_FILE).exists():
        raise CheckpointNotFoundError(
            f"no complete checkpoint at {root}: {MODEL_FILE} is missing"
            f"{interrupted_save_hint(root)}"
        )
    model = load_state_file(root / MODEL_FILE, keys=keys, into=into, **options)
    opt_path = root / OPTIMIZER_FILE
    opt = load_state_file(opt_path, **options) if optimizer and opt_path.exists() else None
    state = TrainingState.read(root / TRAINING_STATE_FILE)
    return Checkpoint(model, opt, state)


def interrupted_save_hint(root: Path) -> str:
    """Where a save interrupted between its two renames left the previous checkpoint.

    Several aside copies can survive a power cut; the one with the highest step is the
    previous checkpoint.
    """
    found: list[tuple[int, str]] = []
    try:
        for path in root.parent.glob(f".{glob.escape(root.name)}{OLD_MARKER}*"):
            # a distributed checkpoint keeps its training state in each rank's directory
            state = path / TRAINING_STATE_FILE
            if not state.exists():
                state = path / rank_dir_name(0) / TRAINING_STATE_FILE
            try:
                found.append((TrainingState.read(state).step, str(path)))
            except (CheckpointError, OSError):
                continue  # not a complete checkpoint: no use to the user
    except OSError:
        return ""
    if not found:
        return ""
    step, newest = max(found)
    return (
        f"; a save was interrupted and left the previous checkpoint (step {step}) in {newest}: "
        f"rename it to {root} to restore it"
    )
