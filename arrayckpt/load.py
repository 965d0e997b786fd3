"""Load of one checkpoint directory (boostr's layout) into arrays of any framework."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

from . import aliases, backends, fill, format, hf, nested, storage, templates
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsupportedArrayError,
)
from .layout import (
    EXTRA_FILE,
    MODEL_FILE,
    OLD_MARKER,
    OPTIMIZER_FILE,
    SHARDING_META_FILE,
    TRAINING_STATE_FILE,
    PathLike,
    rank_dir_name,
)
from .training_state import MAX_STATE_BYTES, TrainingState

T = TypeVar("T")


class _Parts(NamedTuple):
    model: Any
    optimizer: Any | None
    training_state: TrainingState


class Checkpoint(_Parts):
    """A loaded checkpoint: ``model, optimizer, training_state = load_checkpoint(...)``.

    ``model`` and ``optimizer`` have the structure that was saved: a flat ``str -> array``
    dict, or the nested dicts/lists/tuples of a state dict or pytree. ``extra`` is the
    ``extra=`` state (``None`` when none was saved); it is an attribute, not a fourth
    tuple item, so three-way unpacking keeps working.
    """

    extra: Any

    def __new__(
        cls, model: Any, optimizer: Any | None, training_state: TrainingState, extra: Any = None
    ) -> Checkpoint:
        self = super().__new__(cls, model, optimizer, training_state)
        self.extra = extra
        return self

    def __repr__(self) -> str:
        return (
            f"Checkpoint(model={self.model!r}, optimizer={self.optimizer!r}, "
            f"training_state={self.training_state!r}, extra={self.extra!r})"
        )

    def _replace(self, **changes: Any) -> Checkpoint:
        fields = {"extra": self.extra, **self._asdict(), **changes}
        return Checkpoint(**fields)


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
    reader = open_state_file(path, mmap=mmap, verify=verify, keys=keys, into=into)
    return read_state(reader, xp=xp, device=device, verify=verify, keys=keys, into=into)


def open_state_file(
    path: Path, *, mmap: bool, verify: bool, keys: Iterable[str] | None, into: Any
) -> format.SafetensorsReader:
    """The reader `read_state` loads ``path`` with, reading no more than it needs.

    Eager partial loads read only the header and the requested tensors' byte ranges. A
    load ``into=`` arrays (other than a JAX template, whose devices read their boxes
    from the map) reads each tensor straight into its target: neither a whole-file
    buffer nor mapped pages beside the targets.
    """
    return format.SafetensorsReader(
        path,
        mmap=mmap,
        ranges=(keys is not None and not mmap)
        or (into is not None and not templates.is_jax_template(into)),
        verify_while_reading=verify,
    )


def read_state(
    reader: format.SafetensorsReader,
    *,
    xp: ModuleType | str | None,
    device: Any,
    verify: bool,
    keys: Iterable[str] | None,
    into: Any,
) -> Any:
    """`load_state_file` for a file already open (the loader also needs its header)."""
    if keys is not None and into is not None:
        raise InvalidInputError("keys= and into= cannot be combined; pick one")
    path = reader.path
    if into is not None and not templates.is_jax_template(into):
        return fill.fill(into, reader, verify=verify)
    if into is not None:
        from .distributed import jax_restore

        # each device of the template's shardings reads only its box of each tensor
        return jax_restore.restore_file(reader, into, verify=verify, stats=None)
    backend = backends.for_namespace(xp)
    backend.check_device(device)
    # A copy holds the values: each tensor's mapped pages can go once it is made (JAX
    # copies in the background: releasing before it finished would map them again).
    release = reader.mapped and not backend.views_host(device)

    def load_one(name: str) -> Any:
        host = reader.array(name, verify=verify)  # its errors name the file and tensor
        try:
            loaded = backend.from_host(host, device)
        except UnsupportedArrayError as exc:
            raise UnsupportedArrayError(f"{path}: tensor {name!r}: {exc}") from exc
        if release:
            getattr(loaded, "block_until_ready", lambda: None)()
            del host
            reader.release(name)
        return loaded

    tied = aliases.read(reader.header.metadata, reader.header.entries, source=str(path))
    # a tied tensor comes back as one object (without ties, no lookup per tensor)
    get = aliases.resolver(load_one, tied) if tied else load_one

    if keys is not None:
        if isinstance(keys, str):
            raise InvalidInputError(f"keys must be a list of tensor names, not the str {keys!r}")
        keys = list(keys)
        missing = [k for k in keys if k not in reader.header.entries and k not in tied]
        if missing:
            raise CheckpointNotFoundError(
                f"{path}: no tensors named {missing[:5]}; `arrayckpt inspect` lists them"
            )
        return {name: get(name) for name in keys}
    tree = nested.tree_text(reader.header.metadata, source=str(path))
    if tree is not None:
        state = nested.unflatten(tree, get, {*reader.names, *tied}, source=str(path))
    else:
        state = {name: get(name) for name in [*reader.names, *tied]}
    # JAX arrays are immutable: a JAX template gets new arrays in its structure
    return state if into is None else templates.restore(into, state, source=str(path))


def load_file(
    path: PathLike,
    *,
    xp: ModuleType | str | None = None,
    device: Any = None,
    keys: Iterable[str] | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load one safetensors file, of any name, written by any tool, as arrays of ``xp``.

    Args:
        path: the file (a Hugging Face ``model.safetensors``, a shard, an arrayckpt file),
            or its ``s3://``, ``gs://`` or ``az://`` URL (``file://`` is a local path).
        xp: as in `load_checkpoint`.
        device: as in `load_checkpoint`.
        keys: only these tensors, as a flat dict; the others are never read.
        verify: check the CRC32C arrayckpt recorded (files from other tools have none).
        storage_options: object-store settings over those from the environment.

    Returns:
        ``{name: array}``; a file arrayckpt wrote from nested state comes back nested.

    Raises:
        CheckpointNotFoundError: no such file, or a requested key is missing.
        CorruptCheckpointError: the file is malformed or fails its checksum.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> from safetensors.numpy import save_file
        >>> f = tempfile.mkdtemp() + "/weights.safetensors"
        >>> save_file({"w": np.arange(3, dtype=np.int32)}, f)
        >>> ac.load_file(f)
        {'w': array([0, 1, 2], dtype=int32)}
    """
    if storage.is_url(path):
        from .storage import fetch  # the object-store client is imported only here

        with fetch.local_file(str(path), storage_options) as copy:  # mapped: outlives it
            return load_file(copy, xp=xp, device=device, keys=keys, verify=verify)
    file = Path(storage.local_path(path))
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: no such file")
    return load_state_file(file, xp=xp, device=device, keys=keys, verify=verify)


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
    optimizer_into: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint directory into arrays of any framework.

    Args:
        directory: a checkpoint written by arrayckpt or boostr; an ``s3://``, ``gs://``
            or ``az://`` URL loads its committed step (parallel ranged reads straight into
            the arrays, each tensor checked as it arrives); ``file://`` is a local path;
            or a Hugging Face model directory (``model.safetensors``, or shards listed in
            ``model.safetensors.index.json``, without ``training_state.json``: then
            ``training_state`` is ``TrainingState(step=0)``, ``optimizer`` is ``None``,
            and with ``keys`` only the shards holding them are opened); or a distributed
            checkpoint saved from DTensors, whose tensors come back whole, assembled from
            every rank's shards (`load_distributed_checkpoint` with ``world_size=1``).
        xp: the namespace of the arrays to return: ``None`` (NumPy), a module
            (``numpy``, ``torch``, ``cupy``, ``jax.numpy``, ``array_api_strict``, ...)
            or its name.
        device: that framework's device (``"cuda:0"``, a CuPy ``Device``, ...).
        verify: check every loaded tensor's CRC32C (files from other tools have none).
        mmap: map files copy-on-write (zero copy; best on local disks); ``False`` reads
            each file sequentially (best on network file systems). Object-store loads
            always read eagerly.
        keys: load only these model tensors (names as in the file, dotted for nested
            state), as a flat dict; the rest of the file is never read (with ``mmap=False``
            only the header and those tensors' byte ranges are read). Not with ``into``,
            and not for a distributed checkpoint (both are refused).
        optimizer: ``False`` skips the optimizer file (``optimizer`` is then ``None``).
        into: an existing model state with the saved structure (e.g.
            ``model.state_dict()``): tensors are copied into its arrays in place, on
            their devices, and ``model`` is ``into`` itself. ``xp`` and ``device`` are
            then unused. A JAX template (JAX arrays or ``jax.ShapeDtypeStruct`` leaves,
            in any pytree: dataclasses, namedtuples, Flax structs) gets new arrays
            instead, in its structure, dtypes and shardings, each device reading only its
            box of each tensor; it also loads a distributed checkpoint saved from sharded
            arrays (DTensor, jax.Array) at any world size, this process
            (``jax.process_index()``) getting its devices' boxes. A template leaf that is
            not an array (``...``) takes what the checkpoint holds there.
        optimizer_into: the same for the optimizer state (e.g. ``tx.init(params)``, so an
            optax state comes back with its ``.mu`` and ``.nu``).
        storage_options: object-store settings over those from the environment.

    Returns:
        ``Checkpoint(model, optimizer, training_state)``; ``model`` and ``optimizer`` have
        the saved structure; ``optimizer`` is ``None`` when no optimizer file was saved.
        ``.extra`` holds the ``extra=`` state (``None`` when none was saved).

    Raises:
        CheckpointNotFoundError: the directory, a required file or a requested key is missing.
        CorruptCheckpointError: a file is malformed or fails its checksum (names which).
        InvalidInputError: ``into`` does not match the saved structure, shapes or dtypes.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = ac.save_checkpoint(d, {"w": np.ones(2, np.float32), "b": np.zeros(1)})
        >>> ac.load_checkpoint(d, keys=["w"]).model
        {'w': array([1., 1.], dtype=float32)}
    """
    if keys is not None and not isinstance(keys, str):  # a str is refused below
        keys = list(keys)  # a generator would be empty on a re-read
    if keys is not None and into is not None:  # before any path: each would drop one
        raise InvalidInputError("keys= and into= cannot be combined; pick one")
    if storage.is_url(directory):
        return _load_url(
            str(directory),
            storage_options,
            {"xp": xp, "device": device, "verify": verify},
            keys=keys,
            optimizer=optimizer,
            into=into,
            optimizer_into=optimizer_into,
        )
    root = Path(storage.local_path(directory))
    options = {"xp": xp, "device": device, "verify": verify, "mmap": mmap}
    return read_consistently(
        root,
        lambda: _load_once(
            root,
            options,
            keys=keys,
            optimizer=optimizer,
            into=into,
            optimizer_into=optimizer_into,
        ),
    )


def _load_url(
    location: str,
    storage_options: Mapping[str, Any] | None,
    options: dict[str, Any],
    *,
    keys: list[str] | str | None,
    optimizer: bool,
    into: Any,
    optimizer_into: Any,
) -> Checkpoint:
    """`load_checkpoint` of a committed step on an object store.

    Its objects never change once committed, so no consistency retries: every file is read
    with parallel ranged gets straight into the buffers the arrays view (never mapped, no
    local copy), only ``keys``' ranges of the model file with ``keys``.
    """
    from .storage import objects  # the object-store client is imported only here

    if isinstance(keys, str):
        raise InvalidInputError(f"keys must be a list of tensor names, not the str {keys!r}")
    step = objects.open_step(location, storage_options)
    if MODEL_FILE not in step.files and SHARDING_META_FILE in step.files:
        raise InvalidInputError(
            f"{step.url} is a distributed checkpoint; use load_distributed_checkpoint(url, rank)"
        )
    wanted: dict[str, list[str] | None] = {MODEL_FILE: keys}
    if optimizer and OPTIMIZER_FILE in step.files:
        wanted[OPTIMIZER_FILE] = None
    if EXTRA_FILE in step.files:
        wanted[EXTRA_FILE] = None
    readers, blobs = step.fetch(
        wanted, {TRAINING_STATE_FILE: MAX_STATE_BYTES}, verify=options["verify"]
    )
    model_reader = readers[MODEL_FILE]
    model = read_state(model_reader, keys=keys, into=into, **options)
    opt = extra = None
    if OPTIMIZER_FILE in readers:
        opt = read_state(readers[OPTIMIZER_FILE], keys=None, into=optimizer_into, **options)
    if EXTRA_FILE in readers:
        extra = read_state(readers[EXTRA_FILE], keys=None, into=None, **options)
    state = TrainingState.checked(
        blobs[TRAINING_STATE_FILE],
        source=str(step.url.child(TRAINING_STATE_FILE)),
        metadata=model_reader.header.metadata,
    )
    return Checkpoint(model, opt, state, extra)


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
    root: Path,
    options: dict[str, Any],
    *,
    keys: Iterable[str] | None,
    optimizer: bool,
    into: Any,
    optimizer_into: Any = None,
) -> Checkpoint:
    if not root.is_dir():
        raise CheckpointNotFoundError(
            f"no complete checkpoint at {root}: not a directory{interrupted_save_hint(root)}"
        )
    if (root / SHARDING_META_FILE).exists() and not (root / MODEL_FILE).exists():
        if templates.is_jax_template(into) or templates.is_jax_template(optimizer_into):
            from .distributed.load import load_into_jax

            return load_into_jax(root, into, optimizer_into, optimizer=optimizer, **options)
        from .distributed import global_shards

        if keys is None and global_shards.is_global_checkpoint(root):
            # Sharded-array state: whole tensors, assembled from every rank's boxes.
            from .distributed.load import load_distributed_checkpoint

            whole = load_distributed_checkpoint(
                root,
                0,
                world_size=1,
                into=into,
                optimizer_into=optimizer_into if optimizer else None,
                **options,
            )
            return whole if optimizer else Checkpoint(whole.model, None, whole.training_state)
        if keys is not None:
            raise InvalidInputError(
                f"{root} is a distributed checkpoint: keys= selects tensors of one file and "
                "does not apply; load it whole without keys=, or one rank's part with "
                "load_distributed_checkpoint(directory, rank)"
            )
        raise InvalidInputError(
            f"{root} is a distributed checkpoint; use load_distributed_checkpoint(directory, rank)"
        )
    if hf.is_model_dir(root):
        if into is not None or optimizer_into is not None:
            raise InvalidInputError(
                f"{root} is a Hugging Face model directory; load it without into= "
                "(or use the model's own load_state_dict)"
            )
        model = hf.load_model_dir(
            root, lambda path, keys: load_state_file(path, keys=keys, **options), keys
        )
        return Checkpoint(model, None, TrainingState(step=0))
    # lexists: a broken or looping link is reported by the reader as what it is
    if not os.path.lexists(root / MODEL_FILE):
        raise CheckpointNotFoundError(
            f"no complete checkpoint at {root}: {MODEL_FILE} is missing"
            f"{interrupted_save_hint(root)}"
        )
    reader = open_state_file(
        root / MODEL_FILE, mmap=options["mmap"], verify=options["verify"], keys=keys, into=into
    )
    model = read_state(
        reader,
        xp=options["xp"],
        device=options["device"],
        verify=options["verify"],
        keys=keys,
        into=into,
    )
    opt_path = root / OPTIMIZER_FILE
    opt = (
        load_state_file(opt_path, into=optimizer_into, **options)
        if optimizer and opt_path.exists()
        else None
    )
    extra_path = root / EXTRA_FILE
    extra = load_state_file(extra_path, **options) if extra_path.exists() else None
    state = TrainingState.read(root / TRAINING_STATE_FILE, metadata=reader.header.metadata)
    return Checkpoint(model, opt, state, extra)


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
