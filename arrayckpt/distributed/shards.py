"""The saved ranks of a distributed checkpoint: presence checks, headers, partial reads."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import format, fsops
from ..dtypes import DType
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..layout import (
    EXTRA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDING_META_FILE,
    TRAINING_STATE_FILE,
    is_rank_dir_name,
    rank_dir_name,
)
from ..training_state import TrainingState

if TYPE_CHECKING:
    from ..load import Checkpoint


class ShardFile:
    """One saved safetensors file, read by byte ranges: only its header is read up front.

    Examples:
        >>> # ShardFile(path).read_slab("attn.wq", dim=0, lo=2, hi=4) reads just those rows
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = format.read_header(path)

    @property
    def entries(self) -> dict[str, format.Entry]:
        return self.header.entries

    def _read(self, ranges: Sequence[tuple[int, int]]) -> bytes:
        out = bytearray(sum(length for _, length in ranges))
        self._fill(ranges, memoryview(out))
        return bytes(out)

    def _fill(self, ranges: Sequence[tuple[int, int]], out: memoryview) -> None:
        try:
            fsops.fs().read_ranges(self.path, ranges, out)
        except (OSError, EOFError) as exc:  # e.g. truncated after its header was validated
            raise CorruptCheckpointError(f"{self.path}: reading failed: {exc}") from exc

    def read(self, name: str, *, verify: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """The whole tensor ``name`` (checked against its CRC32C when ``verify``), read
        straight into ``out`` when given (C-contiguous, of the tensor's shape and dtype)."""
        e = self.entries[name]
        if out is None:
            buf = np.empty(e.end - e.start, np.uint8)
        else:
            assert out.flags.c_contiguous and out.nbytes == e.end - e.start
            buf = out.reshape(-1).view(np.uint8)  # a view: ``out`` is contiguous
        self._fill([(e.start, e.end - e.start)], buf.data)
        if verify:
            format.verify_bytes(self.path, self.header, name, buf.data)
        return buf.view(e.dtype.numpy).reshape(e.shape) if out is None else out

    def read_slab(
        self,
        name: str,
        dim: int,
        lo: int,
        hi: int,
        *,
        verify: bool = True,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Indices ``lo:hi`` of tensor ``name`` along ``dim``, reading only those bytes,
        straight into ``out`` when given (C-contiguous, of the slab's shape and dtype).

        A slab narrower than the tensor cannot be checked against the whole tensor's
        CRC32C; its bytes are bounds-checked through the validated header instead.
        """
        e = self.entries[name]
        if lo == 0 and hi == e.shape[dim]:
            return self.read(name, verify=verify, out=out)
        outer = math.prod(e.shape[:dim])
        inner = math.prod(e.shape[dim + 1 :]) * e.dtype.itemsize
        row = e.shape[dim] * inner
        length = (hi - lo) * inner
        ranges = [(e.start + o * row + lo * inner, length) for o in range(outer)] if length else []
        shape = (*e.shape[:dim], hi - lo, *e.shape[dim + 1 :])
        if out is None:
            out = np.empty(shape, e.dtype.numpy)
        assert out.flags.c_contiguous and out.nbytes == outer * length
        self._fill(ranges, out.reshape(-1).view(np.uint8).data)  # a view: ``out`` is contiguous
        return out


@dataclass
class SavedRank:
    """One ``rank_{r}/`` directory: its files, opened lazily by header only."""

    rank: int
    path: Path
    _model: ShardFile | None = None
    _optimizer: ShardFile | None = None

    @property
    def model(self) -> ShardFile:
        if self._model is None:
            self._model = ShardFile(self.path / MODEL_FILE)
        return self._model

    @property
    def optimizer(self) -> ShardFile | None:
        if self._optimizer is None and (self.path / OPTIMIZER_FILE).exists():
            self._optimizer = ShardFile(self.path / OPTIMIZER_FILE)
        return self._optimizer

    def part(self, which: str) -> ShardFile | None:
        return self.model if which == "model" else self.optimizer

    def training_state(self, metadata: Mapping[str, str] | None = None) -> TrainingState:
        """This rank's ``training_state.json`` (checked against ``metadata``'s CRC32C)."""
        return TrainingState.read(self.path / TRAINING_STATE_FILE, metadata=metadata)

    def load(self, **options: Any) -> Checkpoint:
        """This rank's own checkpoint, whole, as `load_checkpoint` loads it."""
        from ..load import load_checkpoint

        return load_checkpoint(self.path, **options)

    def extra_file(self) -> ShardFile | None:
        """This rank's ``extra=`` state file (``None`` when it saved none)."""
        path = self.path / EXTRA_FILE
        return ShardFile(path) if path.exists() else None

    def extra(self, **options: Any) -> Any:
        """This rank's ``extra=`` state as `load_checkpoint` loads it (``None`` if none)."""
        from ..load import load_state_file

        path = self.path / EXTRA_FILE
        return load_state_file(path, **options) if path.exists() else None


def check_ranks_present(root: Path, world_size: int) -> list[SavedRank]:
    """Every ``rank_{r}/`` for ``r < world_size`` with its required files, or one error naming
    every rank directory or file that is missing.

    Raises:
        CheckpointNotFoundError: listing what is missing.
    """
    missing, unnamed = rank_files_missing(root, world_size)
    if missing:
        more = len(missing) - 20 + unnamed
        shown = ", ".join(missing[:20]) + (f" and {more} more" if more > 0 else "")
        raise CheckpointNotFoundError(
            f"{root}: distributed checkpoint saved by {world_size} ranks is incomplete; "
            f"missing {shown}. Every rank's save must finish before the checkpoint is used."
        )
    return [SavedRank(r, root / rank_dir_name(r)) for r in range(world_size)]


def rank_files_missing(root: Path, world_size: int) -> tuple[list[str], int]:
    """The rank directories and required files of ``rank_0/ .. rank_{world_size-1}/`` that
    are absent: up to the first 20 absent directories and every absent file by name, and
    how many more absent directories there are.

    Bounded by what is on disk, not by ``world_size``: a sharding_meta.json claiming 10^12
    ranks costs one directory listing, not 10^12 lookups.
    """
    try:
        on_disk = {e.name for e in os.scandir(root) if is_rank_dir_name(e.name)}
    except OSError:
        on_disk = set()
    present = sorted(int(n.partition("_")[2]) for n in on_disk)
    present = [r for r in present if r < world_size and (root / rank_dir_name(r)).is_dir()]
    missing: list[str] = []
    absent = world_size - len(present)
    if absent:
        # The first absent ranks lie among the first len(present) + 20 numbers.
        have = set(present)
        shown = [r for r in range(min(world_size, len(present) + 20)) if r not in have][:20]
        missing += [f"{rank_dir_name(r)}/" for r in shown]
    for r in present:
        d = root / rank_dir_name(r)
        missing += [
            f"{rank_dir_name(r)}/{f}"
            for f in (MODEL_FILE, TRAINING_STATE_FILE)
            if not (d / f).is_file()
        ]
    return missing, absent - min(absent, 20)


@dataclass(frozen=True)
class SplitTensor:
    """A tensor-parallel tensor as the saved ranks hold it."""

    name: str
    dtype: DType
    dim: int
    shape: tuple[int, ...]  # the global (merged) shape
    offsets: tuple[int, ...]  # where each rank's shard starts along ``dim``
    sizes: tuple[int, ...]  # each rank's extent along ``dim``


def plan_split(
    name: str, entry_maps: Sequence[Mapping[str, format.Entry] | None], dim: int, what: str
) -> SplitTensor:
    """Check that every rank holds a shard of ``name`` with matching dtype and shape, and
    place the shards along ``dim`` in rank order. ``what`` is ``"model"`` or ``"optimizer"``.

    Raises:
        CorruptCheckpointError: a shard is missing or does not fit the others (names which).
    """
    entries = []
    for r, found in enumerate(entry_maps):
        if found is None or name not in found:
            where = f"rank_{r}/" + (OPTIMIZER_FILE if what == "optimizer" else MODEL_FILE)
            raise CorruptCheckpointError(
                f"{what} tensor {name!r} is split along dim {dim} but {where} has no shard of "
                "it; the checkpoint is incomplete (or split_dims names a tensor not saved)"
            )
        entries.append(found[name])
    first = entries[0]
    if dim >= len(first.shape):
        raise CorruptCheckpointError(
            f"{what} tensor {name!r}: split dim {dim} but the tensor has {len(first.shape)} "
            "dimensions; fix split_dims"
        )
    for r, e in enumerate(entries):
        other_dims = [d for i, d in enumerate(e.shape) if i != dim]
        want_dims = [d for i, d in enumerate(first.shape) if i != dim]
        if e.dtype != first.dtype or len(e.shape) != len(first.shape) or other_dims != want_dims:
            raise CorruptCheckpointError(
                f"{what} tensor {name!r}: rank_{r} holds {e.dtype.code}{list(e.shape)} but "
                f"rank_0 holds {first.dtype.code}{list(first.shape)}; shards split along dim "
                f"{dim} must agree in dtype and every other dimension"
            )
    sizes = tuple(e.shape[dim] for e in entries)
    offsets = tuple(int(x) for x in np.cumsum((0, *sizes[:-1])))
    shape = (*first.shape[:dim], sum(sizes), *first.shape[dim + 1 :])
    return SplitTensor(name, first.dtype, dim, shape, offsets, sizes)


def even_slice(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s part of ``total`` items split into ``world_size`` near-equal parts
    (``numpy.array_split``'s rule: the first ``total % world_size`` ranks get one extra)."""
    q, rem = divmod(total, world_size)
    lo = rank * q + min(rank, rem)
    return lo, lo + q + (1 if rank < rem else 0)


def check_manifest(saved: SavedRank, manifest: Any) -> None:
    """Check a rank's files against the manifest a coordinated save recorded for it.

    Raises:
        CorruptCheckpointError: names the rank directory and what differs.
    """
    for part, file in (("model", MODEL_FILE), ("optimizer", OPTIMIZER_FILE)):
        recorded = manifest.get(part) if isinstance(manifest, dict) else None
        found = saved.part(part)
        have = (
            None
            if found is None
            else {
                name: (e.dtype.code, list(e.shape), (found.header.checksums or {}).get(name))
                for name, e in found.entries.items()
            }
        )
        try:
            want = (
                None
                if recorded is None
                else {
                    name: (f["dtype"], f["shape"], int(f["crc32c"], 16))
                    for name, f in recorded.items()
                }
            )
        except (TypeError, KeyError, ValueError, AttributeError):
            raise CorruptCheckpointError(
                f"{saved.path.parent / SHARDING_META_FILE}: the manifest of rank_{saved.rank} "
                "is malformed"
            ) from None
        if have != want:
            differ = sorted(set(have or {}) ^ set(want or {})) or sorted(
                n for n in (have or {}) if (have or {})[n] != (want or {}).get(n)
            )
            raise CorruptCheckpointError(
                f"{saved.path / file} does not match what sharding_meta.json recorded when the "
                f"checkpoint was committed (tensors {differ[:5]} differ); the rank directory was "
                "replaced or damaged: restore it from the same save"
            )
