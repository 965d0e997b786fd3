"""Saving a distributed checkpoint: per rank (caller-coordinated) or committed as one."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import fsops, storage
from ..commit import commit_directory, temporary_sibling
from ..dtypes import BY_CODE
from ..errors import (
    CheckpointError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidInputError,
    TopologyError,
)
from ..format import Entry, Header
from ..layout import MODEL_FILE, OPTIMIZER_FILE, SHARDING_META_FILE, PathLike, rank_dir_name
from ..save import write_files, write_snapshot
from ..snapshot import Snapshot, take_snapshot
from ..staging import StagingPool
from ..training_state import TrainingState
from . import protocol
from .coordinator import Coordinator, SoloCoordinator, resolve
from .global_shards import check_saved_boxes, has_sharded, is_global, localize
from .shards import ShardFile, plan_split
from .types import Replicated, ShardingConfig, ShardingMeta, TensorParallel, strategy_to_json

log = logging.getLogger("arrayckpt")
#: part -> tensor -> the global facts a sharded-array save adds to its manifest entry.
Facts = dict[str, dict[str, dict[str, list[int]]]]


def save_distributed_checkpoint(
    directory: PathLike,
    rank: int,
    world_size: int,
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    training_state: TrainingState | None = None,
    sharding: ShardingConfig | None = None,
    *,
    coordinator: Any = "auto",
    timeout: float | None = None,
    extra: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Save this rank's part of a distributed checkpoint (boostr's layout).

    Two modes:

    - **Caller-coordinated** (``coordinator=None``, or ``"auto"`` with no engine running;
      boostr's behaviour): this rank commits ``rank_{rank}/`` atomically on its own and
      rank 0 writes ``sharding_meta.json``. The caller must make every rank finish
      (a barrier) before the checkpoint is used; loading checks every rank is there.
    - **Coordinated** (``"auto"`` when torch.distributed, else jax.distributed, is
      initialised; a torch ``ProcessGroup``, an mpi4py communicator, jax.distributed's
      client, ``"torch"``/``"mpi"``/``"jax"``): all ranks write
      into one temporary directory, rank 0 gathers every rank's manifest, writes
      ``sharding_meta.json`` last and renames the whole directory into place. Every rank
      returns only after the commit; if any rank fails, every rank raises and nothing
      becomes visible.

    Args:
        directory: the distributed checkpoint directory (shared by all ranks).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of ranks saving.
        model_state: ``str -> array`` this rank holds (its shards for tensor parallel).
        optimizer_state: as ``model_state``; ``None`` or empty writes no optimizer file.
        training_state: step, epoch, learning rate, metadata; default ``step=0``.
        sharding: how the state is sharded; default ``ShardingConfig(Replicated())``, or,
            when the state holds torch DTensors, their own placements: each rank writes
            the shards it owns (replicas once) with their global shape and offsets
            (coordinated saves only; plain tensors beside them are rank 0's copy); for
            ``jax.Array`` values over several devices, their shardings: each process writes
            its addressable shards of replica 0, copied from the devices as one box per
            tensor. With ``world_size=1`` no engine is needed.
        coordinator: see the modes above.
        timeout: seconds each cross-rank wait may take (default: the coordinator's).
        extra: this rank's extra state (as in `save_checkpoint`), in ``rank_{rank}/``.
        storage_options: object-store settings over the environment's, for a URL.

    ``directory`` may be an ``s3://``, ``gs://`` or ``az://`` URL (coordinated saves, or one
    rank): each rank uploads its own ``rank_{rank}/`` objects, then rank 0 commits the step
    with one commit object, written only if every rank's upload succeeded (see
    docs/storage.md).

    Returns:
        The checkpoint directory (a URL as given, credentials never included).

    Raises:
        InvalidInputError: bad arguments or state; nothing is written.
        TopologyError: rank/world size disagree with the engine, or ranks did not arrive
            in time (names which).
        CheckpointWriteError: writing failed on this or (coordinated) another rank.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> tp = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
        >>> for r in range(2):  # each rank, in its own process, saves its half
        ...     _ = ac.save_distributed_checkpoint(d, r, 2, {"w": np.full(2, r, np.float32)},
        ...                                        None, ac.TrainingState(5), tp)
        >>> ac.load_distributed_checkpoint(d, 0, world_size=1).model["w"]
        array([0., 0., 1., 1.], dtype=float32)
    """
    directory = storage.local_path(directory)
    job = prepare_save(
        directory,
        rank,
        world_size,
        model_state,
        optimizer_state,
        training_state,
        sharding,
        staging=None,
        coordinator=coordinator,
        timeout=timeout,
        join_on_error=True,
        extra=extra,
        storage_options=storage_options,
    )
    return job()


def prepare_save(
    directory: PathLike,
    rank: int,
    world_size: int,
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None,
    training_state: TrainingState | None,
    sharding: ShardingConfig | None,
    *,
    staging: StagingPool | None,
    coordinator: Any = "auto",
    timeout: float | None = None,
    background: bool = False,
    join_on_error: bool = False,
    extra: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Callable[[], Path | str]:
    """Validate, pick the coordinator and snapshot on the calling thread; return the write.

    The returned job may run on the writer thread (``background=True``): everything that
    must happen on the training thread (building a coordinator is a collective the first
    time; copying arrays) is done here. With ``join_on_error`` a coordinated rank whose
    state is invalid still takes part in the commit, to fail every rank at once instead
    of leaving them to time out; the job then raises the validation error.
    """
    facts: Facts = {}
    invalid: CheckpointError | None = None  # this rank's state cannot be saved
    if sharding is None and has_sharded(model_state, optimizer_state):
        # Placements come from the arrays: each rank writes the boxes it owns.
        try:
            local_model, facts["model"] = localize(model_state, rank, "model_state")
            model_state = local_model or {}
            optimizer_state, facts["optimizer"] = localize(optimizer_state, rank, "optimizer_state")
        except CheckpointError as exc:
            invalid = exc
        sharding = ShardingConfig(TensorParallel())
    sharding = ShardingConfig(Replicated()) if sharding is None else sharding
    if not isinstance(sharding, ShardingConfig):
        raise InvalidInputError(f"sharding must be a ShardingConfig, not {type(sharding).__name__}")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInputError(f"{name} must be a non-negative int, got {value!r}")
    if world_size < 1 or rank >= world_size:
        raise TopologyError(f"rank {rank} is out of range for world_size={world_size}")
    coord = resolve(coordinator, rank, world_size)
    if coord is not None and background and not coord.thread_safe:
        raise InvalidInputError(
            f"{type(coord).__name__} cannot be used from the writer thread: MPI was "
            "initialised without MPI_THREAD_MULTIPLE; save synchronously or initialise MPI "
            "with thread level MULTIPLE (mpi4py's default)"
        )
    snap: Snapshot | CheckpointError
    try:
        if invalid is not None:
            raise invalid
        snap = take_snapshot(
            model_state, optimizer_state, training_state, staging=staging, extra=extra
        )
    except CheckpointError as exc:
        if coord is None or not join_on_error:
            raise
        snap = exc
    meta = ShardingMeta(world_size, sharding)
    if storage.is_url(directory):
        from ..storage import distributed as remote  # the object-store client only here

        return remote.save_job(str(directory), snap, meta, coord, timeout, facts, storage_options)
    target = Path(directory).absolute()
    if coord is None and facts and world_size == 1:
        coord = SoloCoordinator()  # one process holds every shard: no engine to ask
    if coord is None and facts:
        raise InvalidInputError(
            f"saving sharded arrays to {target} needs a coordinated save (the global offsets "
            "are gathered on rank 0): initialise torch.distributed or jax.distributed, or pass "
            "coordinator="
        )
    if coord is None:
        assert isinstance(snap, Snapshot)  # errors were raised above
        own = snap
        return lambda: _save_own_rank(target, rank, own, meta)
    return lambda: _save_coordinated(target, snap, meta, coord, timeout, facts)


def _save_own_rank(target: Path, rank: int, snap: Snapshot, meta: ShardingMeta) -> Path:
    write_snapshot(target / rank_dir_name(rank), snap)
    if rank == 0:
        write_meta_atomically(target, meta)
    return target


def write_meta_atomically(target: Path, meta: ShardingMeta) -> None:
    """Replace ``target/sharding_meta.json`` in one rename, durably."""
    fs = fsops.fs()
    path = target / SHARDING_META_FILE
    tmp = temporary_sibling(path)
    try:
        fs.write_bytes(tmp, meta.to_json().encode())
        fs.fsync_file(tmp)
        fs.rename(tmp, path)
        fs.fsync_dir(target)
    except OSError as exc:
        if os.path.lexists(tmp):
            fs.remove_file(tmp)
        raise CheckpointWriteError(f"writing {path} failed: {exc}") from exc


def _write_rank_into(
    tmp: Path, rank: int, snap: Snapshot | CheckpointError, facts: Facts
) -> dict[str, Any]:
    """Write this rank's files into the shared temporary directory; return its manifest."""
    if isinstance(snap, CheckpointError):
        raise snap  # this rank's state was invalid: fail its part of the save
    fs = fsops.fs()
    rank_dir = tmp / rank_dir_name(rank)
    fs.mkdir(rank_dir)
    write_files(rank_dir, snap)
    fs.fsync_dir(rank_dir)
    headers: dict[str, Header] = {}
    for part, file in (("model", MODEL_FILE), ("optimizer", OPTIMIZER_FILE)):
        if part == "optimizer" and not snap.optimizer:
            continue
        try:
            headers[part] = ShardFile(rank_dir / file).header  # what reached the disk
        except (CheckpointReadError, CorruptCheckpointError) as exc:
            if isinstance(exc.__cause__, OSError):
                raise exc.__cause__ from None  # reading back failed: an I/O error of this save
            raise
    return rank_manifest(rank, headers, facts)


def rank_manifest(rank: int, headers: Mapping[str, Header], facts: Facts) -> dict[str, Any]:
    """What a coordinated save records for one rank: each tensor's dtype, shape and the
    CRC32C its written header holds, plus the global facts of sharded arrays."""
    manifest: dict[str, Any] = {"rank": rank}
    for part, header in headers.items():
        sums = header.checksums or {}
        manifest[part] = {
            name: {"dtype": e.dtype.code, "shape": list(e.shape), "crc32c": f"{sums[name]:08x}"}
            for name, e in header.entries.items()
        }
        for name, fact in facts.get(part, {}).items():
            manifest[part][name].update(fact)
    return manifest


def _save_coordinated(
    target: Path,
    snap: Snapshot | CheckpointError,
    meta: ShardingMeta,
    coord: Coordinator,
    timeout: float | None,
    facts: Facts,
) -> Path:
    """This rank's part of a coordinated save into a local (or network) directory: the
    ranks write into rank 0's temporary directory, renamed into place at the commit."""

    def write_part(start: protocol.Start) -> protocol.Report:
        return {"manifest": _write_rank_into(Path(start["tmp"]), coord.rank, snap, facts)}

    def commit(start: protocol.Start, reports: list[protocol.Report]) -> None:
        manifests = check_reports(reports, meta)
        fs = fsops.fs()
        path = Path(start["tmp"]) / SHARDING_META_FILE
        done = ShardingMeta(meta.world_size, meta.sharding, meta.version, manifests)
        fs.write_bytes(path, done.to_json().encode())  # written last: the commit record
        fs.fsync_file(path)

    medium = protocol.Medium(
        where=str(target),
        verb="writing",
        open_step=lambda body: commit_directory(target, lambda tmp: body({"tmp": str(tmp)})),
        write_part=write_part,
        commit=commit,
    )
    protocol.run(coord, medium, sharding_doc(meta), timeout)
    return target


def sharding_doc(meta: ShardingMeta) -> dict[str, Any]:
    return {
        "world_size": meta.world_size,
        "strategy": strategy_to_json(meta.sharding.strategy),
        "split_dims": dict(sorted(meta.sharding.split_dims.items())),
    }


def check_reports(reports: list[dict[str, Any]], meta: ShardingMeta) -> list[dict[str, Any]]:
    """Every rank wrote, all agree on the sharding, and split tensors fit together.

    Returns the per-rank manifests, with each split shard's offset in the global tensor.
    """
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if not rep["ok"]]
    if failed:
        raise CheckpointWriteError("; ".join(f"rank {r} failed: {err}" for r, err in failed))
    mine = sharding_doc(meta)
    odd = [r for r, rep in enumerate(reports) if rep["sharding"] != mine]
    if odd:
        raise TopologyError(
            f"ranks {odd} passed a different world_size or ShardingConfig than rank 0 "
            f"({mine}); every rank must pass the same"
        )
    manifests = [rep["manifest"] for rep in reports]
    if is_global(manifests):
        check_saved_boxes(manifests, "the ranks' sharded-array state")
    if isinstance(meta.sharding.strategy, TensorParallel):
        for part in ("model", "optimizer"):
            maps = [
                {
                    n: Entry(n, BY_CODE[f["dtype"]], tuple(f["shape"]), 0, 0)
                    for n, f in m.get(part, {}).items()
                }
                for m in manifests
            ]
            present = set().union(*maps)
            for name, dim in meta.sharding.split_dims.items():
                if name not in present:
                    continue
                plan = plan_split(name, maps, dim, part)
                for r, m in enumerate(manifests):
                    m[part][name]["offset"] = plan.offsets[r]
    return manifests
