"""Merging a distributed checkpoint into one checkpoint, one tensor at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import format, fsops, storage
from ..commit import commit_directory
from ..dtypes import DType
from ..errors import CorruptCheckpointError, InvalidInputError
from ..layout import MODEL_FILE, OPTIMIZER_FILE, SHARDING_META_FILE, TRAINING_STATE_FILE, PathLike
from ..nested import tree_metadata
from ..training_state import STATE_CHECKSUM_KEY, state_checksum
from .global_shards import GlobalTensor, ReadStats, is_global, read_box
from .global_shards import plan as plan_boxes
from .reshard import PARTS
from .shards import (
    SavedRank,
    ShardFile,
    SplitTensor,
    check_manifest,
    check_ranks_present,
    plan_split,
)
from .trees import merged_tree
from .types import Replicated, ShardingMeta, TensorParallel

log = logging.getLogger("arrayckpt")

#: Jobs at least this large log their progress (about every 10%).
PROGRESS_LOG_BYTES = 256 * 2**20

Progress = Callable[[int, int], None]


def _check_apart(source: Path, output: Path) -> None:
    """Refuse an output that is, holds or lies inside the source: the commit would replace
    (part of) the checkpoint being read, e.g. ``src/rank_0`` with the merged state."""
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise InvalidInputError(
            f"consolidate_checkpoint: output {output} overlaps the distributed checkpoint "
            f"{source} it reads; write the merged checkpoint to a directory outside it, "
            f"e.g. {src.parent / (src.name + '-merged')}"
        )


def consolidate_checkpoint(
    sharded_dir: PathLike,
    output_dir: PathLike,
    *,
    verify: bool = True,
    progress: Progress | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Merge a distributed checkpoint into one ordinary checkpoint, atomically.

    Streams tensor by tensor: peak memory is about one merged tensor (plus one shard of
    it), not the model. Replicated: rank 0's state. ZeroPartitioned: every rank's keys
    (a key several ranks hold is taken from the lowest; they must agree in dtype and
    shape). TensorParallel: tensors in ``split_dims`` are concatenated along their dim
    in rank order, for model and optimizer state; the rest are rank 0's. DTensor state:
    each tensor assembled from its saved boxes. Nested state
    (state dicts, pytrees) keeps its structure: rank 0's for Replicated, else the ranks'
    structures merged (see `arrayckpt.distributed.trees`; flat when they disagree).

    Args:
        sharded_dir: the distributed checkpoint.
        output_dir: where the merged checkpoint goes (new, empty, or a checkpoint).
        verify: check every shard against its CRC32C as it is read.
        progress: called as ``progress(bytes_done, bytes_total)`` after each tensor;
            jobs over 256 MiB also log progress at INFO.
        storage_options: object-store settings (over the environment's) when either
            side is an ``s3://``, ``gs://`` or ``az://`` URL: a source step committed by a
            coordinated save is read by byte ranges; a URL output is merged into a local
            temporary directory, then uploaded and committed like `save_checkpoint`'s.

    Returns:
        ``output_dir`` (an object-store output as its URL).

    Raises:
        CheckpointNotFoundError: ``sharding_meta.json`` or a rank's files are missing.
        CorruptCheckpointError: a split tensor is missing from a rank, or shards disagree
            in dtype or shape (boostr skips these silently; arrayckpt refuses).

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> tp = ac.ShardingConfig(ac.TensorParallel(), {"w": 1})
        >>> for r in range(2):
        ...     _ = ac.save_distributed_checkpoint(f"{d}/tp", r, 2,
        ...             {"w": np.full((2, 1), r, np.int32)}, None, None, tp)
        >>> _ = ac.consolidate_checkpoint(f"{d}/tp", f"{d}/merged")
        >>> ac.load_checkpoint(f"{d}/merged").model["w"].tolist()
        [[0, 1], [0, 1]]
    """
    if storage.is_url(sharded_dir) or storage.is_url(output_dir):
        from ..storage import distributed as remote  # the object-store client only here

        return remote.consolidate(
            sharded_dir, output_dir, storage_options, verify=verify, progress=progress
        )
    root = Path(storage.local_path(sharded_dir))
    output = Path(storage.local_path(output_dir))
    _check_apart(root, output)
    meta, ranks = open_local(root)
    return merge(meta, ranks, output, verify=verify, progress=progress)


def open_local(root: Path) -> tuple[ShardingMeta, list[SavedRank]]:
    """The sharding meta and every rank of the distributed checkpoint directory ``root``."""
    meta = ShardingMeta.read(root / SHARDING_META_FILE)
    return meta, check_ranks_present(root, meta.world_size)


def merge(
    meta: ShardingMeta,
    ranks: Sequence[SavedRank],
    output_dir: Path,
    *,
    verify: bool,
    progress: Progress | None,
) -> Path:
    """`consolidate_checkpoint` once the source is open: commit the merge at ``output_dir``."""
    if meta.ranks is not None:  # a coordinated save recorded what each rank wrote
        for saved, manifest in zip(ranks, meta.ranks, strict=True):
            check_manifest(saved, manifest)
    boxes = meta.ranks is not None and is_global(meta.ranks)
    if (
        isinstance(meta.sharding.strategy, TensorParallel)
        and not meta.sharding.split_dims
        and not boxes
    ):
        where = ranks[0].path.parent / SHARDING_META_FILE
        raise CorruptCheckpointError(
            f"{where}: TensorParallel with empty split_dims says nothing "
            "about how to merge the shards; save with ShardingConfig(TensorParallel(), "
            "split_dims={...})"
        )
    plans = {part: _plan(ranks, meta, part) for part in PARTS}
    trees = {part: _tree(ranks, meta, part, plans[part]) for part in PARTS}
    state = ranks[0].training_state(ranks[0].model.header.metadata)
    state_bytes = state.to_json().encode()
    meter = _Meter(sum(_nbytes(p) for plan in plans.values() if plan for p in plan), progress)

    def fill(tmp: Path) -> None:
        for part, file in (("model", MODEL_FILE), ("optimizer", OPTIMIZER_FILE)):
            plan = plans[part]
            if plan is None or (part == "optimizer" and not plan and trees[part] is None):
                continue
            by_name = {p.name: p for p in plan}

            def produce(name: str, by_name: dict[str, _Source] = by_name) -> Iterator[np.ndarray]:
                return meter.each(by_name[name], verify)

            layout = [(p.name, p.dtype, p.shape) for p in plan]
            tree = trees[part]
            metadata = tree_metadata(tree) or {}
            if part == "model":
                metadata[STATE_CHECKSUM_KEY] = state_checksum(state_bytes)
            format.write_file_streaming(tmp / file, layout, produce, metadata)
        fs = fsops.fs()
        fs.write_bytes(tmp / TRAINING_STATE_FILE, state_bytes)
        fs.fsync_file(tmp / TRAINING_STATE_FILE)

    target = commit_directory(output_dir, fill)
    meter.finish(target)
    return target


def _tree(
    ranks: Sequence[SavedRank], meta: ShardingMeta, part: str, plan: list[_Source] | None
) -> str | None:
    if plan is None:
        return None
    files = [r.part(part) for r in ranks]
    if isinstance(meta.sharding.strategy, Replicated):
        files = files[:1]  # rank 0's state, so rank 0's structure
    return merged_tree(files, [p.name for p in plan], part)


class _Source:
    """Where one merged tensor's bytes come from: a whole tensor, or shards to place."""

    def __init__(
        self,
        name: str,
        dtype: DType,
        shape: tuple[int, ...],
        files: Sequence[ShardFile],
        split: SplitTensor | None,
    ) -> None:
        self.name, self.dtype, self.shape, self.files, self.split = name, dtype, shape, files, split

    def produce(self, verify: bool) -> Iterator[np.ndarray]:
        if self.split is None:
            yield self.files[0].read(self.name, verify=verify)
            return
        s = self.split
        if s.dim == 0:  # shards are consecutive runs of the merged bytes: no merge buffer
            for f in self.files:
                yield f.read(self.name, verify=verify)
            return
        merged = np.empty(s.shape, s.dtype.numpy)
        for f, start, size in zip(self.files, s.offsets, s.sizes, strict=True):
            index = (slice(None),) * s.dim + (slice(start, start + size),)
            merged[index] = f.read(self.name, verify=verify)  # one shard held at a time
        yield merged


class _BoxSource(_Source):
    """A tensor saved as boxes of one global tensor (DTensor state), assembled whole."""

    def __init__(self, t: GlobalTensor) -> None:
        super().__init__(t.name, t.dtype, t.shape, [p.file for p in t.pieces], None)
        self.tensor = t

    def produce(self, verify: bool) -> Iterator[np.ndarray]:
        t = self.tensor
        yield read_box(t, (0,) * len(t.shape), t.shape, ReadStats(), verify)


def _nbytes(source: _Source) -> int:
    n = source.dtype.itemsize
    for d in source.shape:
        n *= d
    return n


def _plan(ranks: Sequence[SavedRank], meta: ShardingMeta, part: str) -> list[_Source] | None:
    files = [r.part(part) for r in ranks]
    if all(f is None for f in files):
        return None
    if meta.ranks is not None and is_global(meta.ranks):
        boxes = plan_boxes(ranks, meta.ranks, part, str(ranks[0].path.parent))
        return [_BoxSource(t) for t in (boxes or {}).values()]
    strategy = meta.sharding.strategy
    if isinstance(strategy, Replicated):
        first = files[0]
        if first is None:
            raise CorruptCheckpointError(
                f"rank_1.. saved {part} state but rank_0 did not; a Replicated checkpoint "
                "takes rank 0's"
            )
        return [_Source(n, e.dtype, e.shape, [first], None) for n, e in first.entries.items()]
    if isinstance(strategy, TensorParallel):
        return _plan_tensor_parallel(files, meta, part)
    return _plan_zero(files, part)


def _plan_tensor_parallel(
    files: Sequence[ShardFile | None], meta: ShardingMeta, part: str
) -> list[_Source]:
    split_dims = meta.sharding.split_dims
    maps = [f.entries if f else None for f in files]
    names: dict[str, None] = {}
    for r, f in enumerate(files):
        for name in f.entries if f else {}:
            if name not in split_dims and r > 0 and name not in names:
                raise CorruptCheckpointError(
                    f"{part} tensor {name!r} exists on rank_{r} but not on rank_0 and is not in "
                    "split_dims; list it in split_dims or save it on every rank"
                )
            names[name] = None
    out = []
    for name in names:
        if name in split_dims:
            plan = plan_split(name, maps, split_dims[name], part)
            out.append(_Source(name, plan.dtype, plan.shape, [f for f in files if f], plan))
        else:
            first = files[0]
            assert first is not None
            e = first.entries[name]
            out.append(_Source(name, e.dtype, e.shape, [first], None))
    return out


def _plan_zero(files: Sequence[ShardFile | None], part: str) -> list[_Source]:
    out: dict[str, _Source] = {}
    for r, f in enumerate(files):
        if f is None:
            continue
        for name, e in f.entries.items():
            seen = out.get(name)
            if seen is None:
                out[name] = _Source(name, e.dtype, e.shape, [f], None)
            elif (seen.dtype, seen.shape) != (e.dtype, e.shape):
                raise CorruptCheckpointError(
                    f"{part} tensor {name!r}: rank_{r} holds {e.dtype.code}{list(e.shape)} but "
                    f"a lower rank holds {seen.dtype.code}{list(seen.shape)}; the ranks "
                    "disagree about it"
                )
    return list(out.values())


class _Meter:
    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total, self.done, self.callback = total, 0, callback
        self.started = time.perf_counter()
        self._next_log = 0.1

    def each(self, source: _Source, verify: bool) -> Iterator[np.ndarray]:
        yield from source.produce(verify)
        self.done += _nbytes(source)
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self.total >= PROGRESS_LOG_BYTES and self.done >= self._next_log * self.total:
            log.info(
                "consolidating: %.0f%% of %.1f GiB",
                100 * self.done / self.total,
                self.total / 2**30,
            )
            self._next_log += 0.1

    def finish(self, target: Path) -> None:
        log.info(
            "consolidated %.1f MiB into %s in %.3f s",
            self.total / 2**20,
            target,
            time.perf_counter() - self.started,
        )
