"""`open_checkpoint`: a checkpoint whose tensors are read only when accessed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from . import backends, format, nested, storage
from .errors import CheckpointNotFoundError, InvalidInputError
from .layout import MODEL_FILE, OPTIMIZER_FILE, SHARDING_META_FILE, TRAINING_STATE_FILE, PathLike
from .training_state import TrainingState


class TensorInfo(NamedTuple):
    """What a file's header says about one tensor (nothing of its data is read)."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class LazyState(Mapping[str, Any]):
    """A read-only mapping of one file's tensor names to arrays, each read on access.

    The file is mapped (or, with ``mmap=False``, each tensor is read from it on its own
    each time it is looked up); a tensor's bytes are checksummed and converted to the
    requested framework only when it is looked up.
    Names are those in the file: dotted paths for nested state. Non-array leaves of a
    nested state are in `leaves`.
    """

    def __init__(
        self,
        reader: format.SafetensorsReader,
        backend: backends.Backend,
        device: Any,
        verify: bool,
    ) -> None:
        self._reader, self._backend = reader, backend
        self._device, self._verify = device, verify

    @property
    def path(self) -> Path:
        return self._reader.path

    def __getitem__(self, name: str) -> Any:
        if name not in self._reader.header.entries:
            raise KeyError(name)
        host = self._reader.array(name, verify=self._verify)
        return self._backend.from_host(host, self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.names)

    def __len__(self) -> int:
        return len(self._reader.header.entries)

    def info(self, name: str) -> TensorInfo:
        """Dtype code, shape and size of tensor ``name``, from the header alone."""
        e = self._reader.header.entries[name]
        return TensorInfo(e.dtype.code, e.shape, e.end - e.start)

    @property
    def nested(self) -> bool:
        """True when the file holds a nested state (a tree in its ``__metadata__``)."""
        return nested.TREE_KEY in self._reader.header.metadata

    @property
    def leaves(self) -> dict[str, Any]:
        """The non-array leaves of a nested state by dotted path (``{}`` for flat files)."""
        source = str(self._reader.path)
        tree = nested.tree_text(self._reader.header.metadata, source=source)
        return {} if tree is None else nested.leaves(tree, source=source)


class LazyCheckpoint(NamedTuple):
    """``open_checkpoint``'s result: lazy ``model`` and ``optimizer``, and the training state."""

    model: LazyState
    optimizer: LazyState | None
    training_state: TrainingState


def open_checkpoint(
    directory: PathLike,
    *,
    xp: ModuleType | str | None = None,
    device: Any = None,
    verify: bool = True,
    mmap: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> LazyCheckpoint:
    """Open a checkpoint without reading its tensors: each is read when accessed.

    Only the headers and ``training_state.json`` are read here (and validated). With
    ``mmap`` (the default) looking up one tensor touches only that tensor's pages.

    Args:
        directory: a checkpoint written by arrayckpt or boostr; an ``s3://``, ``gs://``
            or ``az://`` URL opens its committed step, downloaded once (into memory on
            ``/dev/shm`` when it has room) and checked against its commit object.
        xp: the framework of the arrays returned on access, as in `load_checkpoint`.
        device: where they go, as in `load_checkpoint`.
        verify: check each tensor's CRC32C when it is accessed.
        mmap: map the files (``True``), or read each tensor's bytes when it is accessed
            (``False``, for network file systems; memory holds only what was accessed).
        storage_options: object-store settings over those from the environment.

    Returns:
        ``LazyCheckpoint(model, optimizer, training_state)``; ``optimizer`` is ``None``
        when no optimizer file was saved.

    Raises:
        CheckpointNotFoundError: the directory or a required file is missing.
        CorruptCheckpointError: a header is malformed; on access, a tensor fails its checksum.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = ac.save_checkpoint(d, {"w": np.ones(2, np.float32), "b": np.zeros(1)})
        >>> ckpt = ac.open_checkpoint(d)
        >>> sorted(ckpt.model), ckpt.model.info("w").shape
        (['b', 'w'], (2,))
        >>> ckpt.model["w"]
        array([1., 1.], dtype=float32)
    """
    if storage.is_url(directory):
        from .storage import objects  # the object-store client is imported only here

        # the copy is mapped: its pages outlive its removal when the block ends
        with objects.local_copy(str(directory), storage_options) as copy:
            return open_checkpoint(copy, xp=xp, device=device, verify=verify, mmap=True)
    root = Path(storage.local_path(directory))
    if not root.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint at {root}: not a directory")
    if (root / SHARDING_META_FILE).exists() and not (root / MODEL_FILE).exists():
        raise InvalidInputError(
            f"{root} is a distributed checkpoint; open one rank's directory (rank_N) instead"
        )
    backend = backends.for_namespace(xp)
    backend.check_device(device)

    def lazy(path: Path) -> LazyState:
        reader = format.SafetensorsReader(
            path, mmap=mmap, ranges=not mmap, verify_while_reading=verify
        )
        return LazyState(reader, backend, device, verify)

    opt_path = root / OPTIMIZER_FILE
    return LazyCheckpoint(
        lazy(root / MODEL_FILE),
        lazy(opt_path) if opt_path.exists() else None,
        TrainingState.read(root / TRAINING_STATE_FILE),
    )
