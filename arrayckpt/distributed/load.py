"""Loading one rank's part of a distributed checkpoint, resharding when world sizes differ."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .. import backends, nested, storage, templates
from ..errors import CheckpointNotFoundError, InvalidInputError, TopologyError
from ..layout import SHARDING_META_FILE, PathLike
from ..load import Checkpoint, interrupted_save_hint, read_consistently
from . import jax_restore
from .global_shards import ReadStats, is_global, load_boxes
from .reshard import load_share, zero_share
from .shards import SavedRank, check_manifest, check_ranks_present
from .trees import merged_tree
from .types import Replicated, ShardingMeta, ZeroPartitioned


def load_distributed_checkpoint(
    directory: PathLike,
    rank: int,
    *,
    world_size: int | None = None,
    keys: Collection[str] | None = None,
    into: Mapping[str, Any] | None = None,
    optimizer_into: Mapping[str, Any] | None = None,
    stats: ReadStats | None = None,
    xp: ModuleType | str | None = None,
    device: Any = None,
    verify: bool = True,
    mmap: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Load rank ``rank``'s state from a distributed checkpoint (arrayckpt's or boostr's).

    Every saved rank's directory must be present and complete (the error names the ones
    that are not). Without ``world_size`` (or with the saved one) the rank's own files are
    loaded. With another ``world_size`` the checkpoint is resharded for it (see
    docs/distributed.md): tensor-parallel ranks get their even slice of every split
    tensor, read from only the byte ranges they need; ZeroPartitioned ranks get a
    deterministic partition of the keys; Replicated ranks get rank 0's state.

    Args:
        directory: the distributed checkpoint directory.
        rank: the rank to load for, ``0 <= rank < world_size``.
        world_size: the world size to load for; default: the saved one.
        keys: load exactly these names (from model and optimizer state) instead of the
            strategy's share; split tensors still come as this rank's slice.
        into: for a checkpoint saved from DTensors: ``name -> DTensor`` (e.g. the new
            model's ``state_dict()``) of any placement, mesh and world size, filled in
            place with the saved values; each rank reads only the byte ranges overlapping
            its local shards. Without it, one rank (``world_size=1``) gets whole tensors.
            A JAX template (``jax.ShapeDtypeStruct`` leaves with shardings, or
            ``jax.Array`` leaves; pass ``rank=jax.process_index()``) gets new arrays with
            its shardings instead, each device's box read once from the saved boxes.
        optimizer_into: as ``into``, for the optimizer state.
        stats: a `ReadStats` to which the tensor bytes and byte ranges read are added.
        xp: as for `load_checkpoint`.
        device: as for `load_checkpoint`.
        verify: as for `load_checkpoint`.
        mmap: as for `load_checkpoint`. A slice narrower than a saved
            shard cannot be checked against that shard's checksum.
        storage_options: for an ``s3://``, ``gs://`` or ``az://`` URL (a step a coordinated
            save committed there): object-store settings over those from the environment.
            Only the headers and the byte ranges this rank needs are fetched (ranged gets).

    Returns:
        ``Checkpoint(model, optimizer, training_state)``; when resharding, the training
        state is rank 0's. Nested state comes back in its saved structure when the rank
        loads all of it (Replicated, TensorParallel, ZeroPartitioned into one rank); a
        partial share (ZeroPartitioned into several ranks, or ``keys=``) is flat, with
        dotted names, except a ZeroPartitioned torch optimizer state_dict saved over each
        rank's own parameters: its share is a state_dict for exactly this rank's parameters.

    Raises:
        TopologyError: ``rank`` is out of range (for the saved world size unless
            ``world_size`` is given).
        CheckpointNotFoundError: ``sharding_meta.json`` or a rank's files are missing.
        CorruptCheckpointError: a file is malformed, or shards do not fit together.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> zero = ac.ShardingConfig(ac.ZeroPartitioned(3))
        >>> _ = ac.save_distributed_checkpoint(d, 0, 2, {"a": np.zeros(2)}, None, None, zero)
        >>> _ = ac.save_distributed_checkpoint(d, 1, 2, {"b": np.ones(2)}, None, None, zero)
        >>> sorted(ac.load_distributed_checkpoint(d, 0, world_size=1).model)
        ['a', 'b']
    """
    targets = {"model": into, "optimizer": optimizer_into}
    if storage.is_url(directory):
        from ..storage import distributed as remote  # the object-store client only here

        # Committed objects never change: no consistency retries.
        with remote.open_step(str(directory), storage_options) as step:
            return load_saved(
                step.path,
                step.meta(),
                step.ranks,
                rank,
                world_size,
                keys,
                xp,
                device,
                verify,
                mmap,
                targets,
                stats,
            )
    root = Path(storage.local_path(directory))
    # A coordinated save swaps the whole directory while we read: the manifest of one
    # save would meet the files of the next.
    return read_consistently(
        root,
        lambda: _load_once(
            root,
            rank,
            world_size,
            keys,
            xp,
            device,
            verify,
            mmap,
            targets,
            stats,
        ),
    )


def _load_once(
    root: Path,
    rank: int,
    world_size: int | None,
    keys: Collection[str] | None,
    xp: ModuleType | str | None,
    device: Any,
    verify: bool,
    mmap: bool,
    targets: dict[str, Mapping[str, Any] | None],
    stats: ReadStats | None,
) -> Checkpoint:
    if not root.is_dir():
        raise CheckpointNotFoundError(
            f"no complete checkpoint at {root}: not a directory{interrupted_save_hint(root)}"
        )
    meta = ShardingMeta.read(root / SHARDING_META_FILE)
    return load_saved(
        root,
        meta,
        lambda n: check_ranks_present(root, n),
        rank,
        world_size,
        keys,
        xp,
        device,
        verify,
        mmap,
        targets,
        stats,
    )


def load_saved(
    root: Any,
    meta: ShardingMeta,
    open_ranks: Callable[[int], Sequence[SavedRank]],
    rank: int,
    world_size: int | None,
    keys: Collection[str] | None,
    xp: ModuleType | str | None,
    device: Any,
    verify: bool,
    mmap: bool,
    targets: dict[str, Mapping[str, Any] | None],
    stats: ReadStats | None,
) -> Checkpoint:
    """`_load_once` after ``sharding_meta.json`` is read, for any storage: ``root`` names the
    checkpoint in messages; ``open_ranks(world_size)`` gives the saved ranks."""
    saved = meta.world_size
    if world_size is not None and (
        not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1
    ):
        raise InvalidInputError(f"world_size must be a positive int, got {world_size!r}")
    target = saved if world_size is None else world_size
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < target:
        fix = (
            "pass world_size= (the number of ranks loading) to reshard the checkpoint, or "
            "merge it with consolidate_checkpoint"
            if world_size is None
            else "pass a rank below world_size"
        )
        raise TopologyError(
            f"{root}: rank {rank} out of range for world_size={target} "
            f"(the checkpoint was saved by {saved} ranks); {fix}"
        )
    ranks = open_ranks(saved)
    if meta.ranks is not None and is_global(meta.ranks):
        return _load_boxes(
            root,
            ranks,
            meta.ranks,
            rank,
            target,
            targets,
            xp,
            device,
            verify,
            ReadStats() if stats is None else stats,
        )
    same = target == saved and keys is None
    if meta.ranks is not None:  # a coordinated save recorded what each rank wrote
        for r in [rank] if same else range(saved):
            check_manifest(ranks[r], meta.ranks[r])
    if same:
        return ranks[rank].load(
            xp=xp,
            device=device,
            verify=verify,
            mmap=mmap,
            into=_jax_only(targets.get("model")),
            optimizer_into=_jax_only(targets.get("optimizer")),
        )
    backend = backends.for_namespace(xp)
    backend.check_device(device)
    state = ranks[0].training_state(ranks[0].model.header.metadata)
    if isinstance(meta.sharding.strategy, ZeroPartitioned) and keys is None:
        # A parameter travels with its optimizer state, as a state_dict its optimizer loads.
        share = zero_share(ranks, rank, target, verify=verify)
        if share is not None:
            params, opt = share
            return Checkpoint(
                {n: backend.from_host(a, device) for n, a in params.items()},
                _map_arrays(opt, lambda a: backend.from_host(a, device)),
                state,
            )
    model, optimizer = load_share(ranks, meta, rank, target, keys=keys, verify=verify)

    def convert(arrays: dict[str, Any], part: str) -> Any:
        out = {name: backend.from_host(a, device) for name, a in arrays.items()}
        return out if keys is not None else _structured(out, ranks, meta, part, root)

    loaded = Checkpoint(
        convert(model, "model"),
        None if optimizer is None else convert(optimizer, "optimizer"),
        state,
    )
    return _restore_jax(loaded, targets, root)


def _jax_only(target: Any) -> Any:
    """A JAX template, else ``None``: other targets are for sharded-array checkpoints."""
    return target if templates.is_jax_template(target) else None


def _restore_jax(
    loaded: Checkpoint, targets: dict[str, Mapping[str, Any] | None], root: Path
) -> Checkpoint:
    """``loaded`` rebuilt in the structure and shardings of its JAX templates, if any."""
    model, optimizer = loaded.model, loaded.optimizer
    if _jax_only(targets.get("model")) is not None:
        model = templates.restore(targets["model"], model, source=f"{root} (model)")
    if _jax_only(targets.get("optimizer")) is not None and optimizer is not None:
        optimizer = templates.restore(targets["optimizer"], optimizer, source=f"{root} (optimizer)")
    return loaded._replace(model=model, optimizer=optimizer)


def load_into_jax(
    root: Path,
    into: Any,
    optimizer_into: Any,
    *,
    optimizer: bool,
    xp: ModuleType | str | None,
    device: Any,
    verify: bool,
    mmap: bool,
) -> Checkpoint:
    """`load_checkpoint` of a distributed checkpoint into JAX templates: this process
    (``jax.process_index()`` of ``jax.process_count()``) gets its devices' boxes; a part
    without a template comes whole, the optimizer not at all without ``optimizer``."""
    import jax  # the templates hold JAX objects: already imported

    targets = {"model": into, **({"optimizer": optimizer_into} if optimizer else {})}
    rank, world = jax.process_index(), jax.process_count()
    loaded = _load_once(root, rank, world, None, xp, device, verify, mmap, targets, None)
    return loaded if optimizer else loaded._replace(optimizer=None)


def _load_boxes(
    root: Any,
    ranks: Sequence[SavedRank],
    manifests: list[dict[str, Any]],
    rank: int,
    world_size: int,
    targets: dict[str, Mapping[str, Any] | None],
    xp: ModuleType | str | None,
    device: Any,
    verify: bool,
    stats: ReadStats,
) -> Checkpoint:
    for saved, manifest in zip(ranks, manifests, strict=True):
        check_manifest(saved, manifest)
    backend = backends.for_namespace(xp)
    backend.check_device(device)
    convert = lambda a: backend.from_host(a, device)  # noqa: E731
    if any(templates.is_jax_template(t) for t in targets.values()):
        parts = jax_restore.load_parts(ranks, manifests, targets, convert, stats, verify, str(root))
    else:
        parts = load_boxes(
            ranks, manifests, rank, world_size, targets, convert, stats, verify, str(root)
        )
    model = parts["model"]
    return Checkpoint(
        {} if model is None else model,
        parts["optimizer"],
        ranks[0].training_state(),
    )


def _structured(
    arrays: dict[str, Any],
    ranks: Sequence[SavedRank],
    meta: ShardingMeta,
    part: str,
    root: Any,
) -> Any:
    """``arrays`` in the saved nested structure when this rank's share is the whole state
    (Replicated, TensorParallel, or everything of ZeroPartitioned); else flat."""
    files = [r.part(part) for r in ranks]
    if isinstance(meta.sharding.strategy, Replicated):
        files = files[:1]
    everything = {n for f in files if f is not None for n in f.entries}
    if set(arrays) != everything:
        return arrays  # a ZeroPartitioned share: a partial tree is not well-defined
    tree = merged_tree(files, everything, part)
    if tree is None:
        return arrays
    return nested.unflatten(tree, arrays.__getitem__, everything, source=f"{root} ({part})")


def _map_arrays(tree: Any, convert: Any) -> Any:
    """``tree`` with every NumPy array replaced by ``convert(array)``."""
    if isinstance(tree, np.ndarray):
        return convert(tree)
    if isinstance(tree, dict):
        return {k: _map_arrays(v, convert) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_arrays(v, convert) for v in tree)
    return tree
