"""Distributed checkpoints on an object store: every rank uploads its own ``rank_N/``
objects, then rank 0 commits the step with one commit object listing every rank's files;
loads fetch headers and only the byte ranges they need (ranged gets)."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from .. import format
from ..distributed.coordinator import Coordinator, SoloCoordinator
from ..distributed.shards import SavedRank, ShardFile
from ..distributed.types import ShardingMeta
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidInputError,
)
from ..layout import (
    EXTRA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDING_META_FILE,
    TRAINING_STATE_FILE,
    rank_dir_name,
)
from ..limits import MAX_SHARDING_META_BYTES
from ..snapshot import Snapshot
from ..training_state import MAX_STATE_BYTES, TrainingState
from . import objects, transfer
from .url import StorageURL, is_url, local_path, parse_url

log = logging.getLogger("arrayckpt")

#: Bytes fetched first from a safetensors object: the header of most files fits.
HEAD_GUESS_BYTES = 64 << 10

# ---------------------------------------------------------------------------------- save


def save_job(
    location: str,
    snap: Snapshot | CheckpointError,
    meta: ShardingMeta,
    coord: Coordinator | None,
    timeout: float | None,
    facts: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None,
) -> Callable[[], str]:
    """The write of a distributed save to ``location``; checked here, on the caller's
    thread, and run later (possibly on the writer thread: only it talks to the store).

    Raises:
        InvalidInputError: several ranks without a coordinator (no rank could know when
            every upload is done, so none could commit).
    """
    url = parse_url(location)
    if coord is None:
        if meta.world_size > 1:
            raise InvalidInputError(
                f"saving a distributed checkpoint to {url} needs a coordinated save: an object "
                "store has no rename, so rank 0 commits the step once every rank's upload is "
                "done; initialise torch.distributed (or MPI) or pass coordinator="
            )
        coord = SoloCoordinator()
    found = coord
    return lambda: _save(url, snap, meta, found, timeout, facts, storage_options)


def _save(
    url: StorageURL,
    snap: Snapshot | CheckpointError,
    meta: ShardingMeta,
    coord: Coordinator,
    timeout: float | None,
    facts: Mapping[str, Any],
    options: Mapping[str, Any] | None,
) -> str:
    """This rank's part of a coordinated save to an object store: each rank uploads its
    own objects; rank 0's commit object, listing every rank's files, commits the step."""
    from ..distributed import protocol
    from ..distributed.save import check_reports, sharding_doc

    def open_step(body: Callable[[protocol.Start], None]) -> None:
        # A committed step is never replaced: refused before anything is uploaded.
        if objects._committed(objects.open_store(url, options), url):
            raise InvalidInputError(
                f"{url} already holds a committed checkpoint; an object store cannot "
                "replace it atomically: save to a new step, or delete it first"
            )
        body({})

    def write_part(start: protocol.Start) -> protocol.Report:
        files, manifest = _upload_rank(url, coord.rank, snap, facts, options)
        return {"manifest": manifest, "files": files}

    def commit(start: protocol.Start, reports: list[protocol.Report]) -> None:
        manifests = check_reports(reports, meta)
        done = ShardingMeta(meta.world_size, meta.sharding, meta.version, manifests)
        listed = {n: e for rep in reports for n, e in rep["files"].items()}
        text = done.to_json().encode()
        objects.save_files(
            str(url), {SHARDING_META_FILE: [memoryview(text)]}, options, listed=listed
        )

    medium = protocol.Medium(
        where=str(url), verb="uploading", open_step=open_step, write_part=write_part, commit=commit
    )
    protocol.run(coord, medium, sharding_doc(meta), timeout)
    log.info("rank %d: committed part of %s", coord.rank, url)
    return str(url)


def _upload_rank(
    url: StorageURL,
    rank: int,
    snap: Snapshot | CheckpointError,
    facts: Mapping[str, Any],
    options: Mapping[str, Any] | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Upload ``rank_{rank}/``'s files; return each object's size and CRC32C, and the
    rank's manifest (from the headers uploaded, which carry the tensors' checksums)."""
    from ..distributed.save import rank_manifest
    from ..save import object_files

    if isinstance(snap, CheckpointError):
        raise snap  # this rank's state was invalid: fail its part of the save
    store = objects.open_store(url, options)
    files = object_files(snap)
    headers = {}
    for part, file in (("model", MODEL_FILE), ("optimizer", OPTIMIZER_FILE)):
        if file in files and (part == "model" or snap.optimizer):
            parts = files[file]
            headers[part] = format.parse_header(
                Path(file), bytes(parts[0]), sum(p.nbytes for p in parts)
            )
    listing: dict[str, dict[str, Any]] = {}
    for file, parts in files.items():
        name = f"{rank_dir_name(rank)}/{file}"
        try:
            size, crc = transfer.upload(store, url.key(name), parts)
        except Exception as exc:
            raise CheckpointWriteError(
                f"rank {rank}: uploading {url}/{name} failed: {transfer.describe(exc)}; "
                "nothing was committed (the previous steps are intact)"
            ) from exc
        listing[name] = {"size": size, "crc32c": f"{crc:08x}"}
    return listing, rank_manifest(rank, headers, dict(facts))


# ---------------------------------------------------------------------------------- load


class ObjectPath:
    """Where an object lives, shaped like the `Path` the readers put into messages (``/``,
    ``parent``, ``name``, ``str``), and nothing more: no ``__fspath__``, so it can never
    be opened as a local file by mistake."""

    def __init__(self, url: StorageURL) -> None:
        self.url = url

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.url.child(name))

    @property
    def parent(self) -> ObjectPath:
        up = self.url.prefix.rpartition("/")[0]
        return ObjectPath(StorageURL(self.url.scheme, self.url.bucket, up))

    @property
    def name(self) -> str:
        return self.url.prefix.rpartition("/")[2]

    def __str__(self) -> str:
        return str(self.url)

    def __repr__(self) -> str:
        return f"ObjectPath({str(self.url)!r})"


class RemoteStep:
    """A step committed on an object store: its commit object's listing, and ranged reads
    of the objects it lists (counted, so that what a load fetched can be told)."""

    def __init__(self, location: str, options: Mapping[str, Any] | None) -> None:
        self.url = parse_url(location)
        self.path = ObjectPath(self.url)
        self.options = options
        self.store = objects.open_store(self.url, options)
        self.files = objects.read_commit(self.store, self.url, ranks=True)
        self._lock = threading.Lock()
        #: Bytes and gets of tensor data, and of everything else (commit, headers, JSON).
        self.data_bytes = self.data_gets = self.other_bytes = self.other_gets = 0

    def entry(self, name: str) -> dict[str, Any]:
        found = self.files.get(name)
        if found is None:
            raise CheckpointNotFoundError(
                f"{self.url}/{name} is not listed in the step's {objects.COMMIT_OBJECT}: the "
                "step was not committed by a distributed save of all its ranks"
            )
        return found

    def _get(self, name: str, start: int, end: int) -> Any:
        import obstore

        try:
            got = obstore.get_range(self.store, self.url.key(name), start=start, end=end)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"{self.url}/{name} disappeared while it was read (deleted by retention?)"
            ) from exc
        except Exception as exc:
            raise CheckpointReadError(
                f"reading {self.url}/{name} failed: {transfer.describe(exc)}"
            ) from exc
        if len(memoryview(got)) != end - start:
            raise CorruptCheckpointError(
                f"{self.url}/{name} does not match its commit object (it is shorter): it was "
                "changed after the commit; restore another step"
            )
        return got

    def read_small(self, name: str, limit: int) -> bytes:
        """A whole small object (JSON), checked against the commit object's size and CRC32C."""
        entry = self.entry(name)
        size = int(entry["size"])
        if size > limit:
            raise CorruptCheckpointError(
                f"{self.url}/{name} is {size} bytes, over the {limit}-byte limit for it"
            )
        data = bytes(memoryview(self._get(name, 0, size))) if size else b""
        with self._lock:
            self.other_bytes += size
            self.other_gets += 1
        if f"{format.checksum(data):08x}" != entry["crc32c"]:
            raise CorruptCheckpointError(
                f"{self.url}/{name} does not match its commit object (CRC32C): it was changed "
                "after the commit; restore another step"
            )
        return data

    def read_head(self, name: str) -> tuple[bytearray, int]:
        """The first bytes of a safetensors object, enough for its whole header, and its size."""
        size = int(self.entry(name)["size"])
        where = cast(Path, self.path / name)
        head = bytearray(memoryview(self._get(name, 0, min(size, HEAD_GUESS_BYTES))))
        if len(head) >= 8:
            need = 8 + format.header_length(where, head[:8], size)
            if need > len(head):
                head += memoryview(self._get(name, len(head), need))
        with self._lock:
            self.other_bytes += len(head)
            self.other_gets += 1 + (len(head) > HEAD_GUESS_BYTES)
        return head, size

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]], out: memoryview) -> None:
        """Each ``(offset, length)`` of object ``name`` into consecutive bytes of ``out``.

        Touching ranges are merged and long ones cut into `transfer.RANGE_BYTES` gets, run
        `transfer.RANGES_IN_FLIGHT` at a time; no byte outside ``ranges`` is fetched.
        """
        gets: list[tuple[int, int, int]] = []  # (object offset, length, offset in out)
        pos = 0
        for offset, length in ranges:
            if length:
                if gets and gets[-1][0] + gets[-1][1] == offset:
                    o, n, p = gets[-1]
                    gets[-1] = (o, n + length, p)
                else:
                    gets.append((offset, length, pos))
            pos += length
        pieces = [
            (o + i, min(transfer.RANGE_BYTES, n - i), p + i)
            for o, n, p in gets
            for i in range(0, n, transfer.RANGE_BYTES)
        ]

        def fetch(piece: tuple[int, int, int]) -> None:
            o, n, p = piece
            out[p : p + n] = memoryview(self._get(name, o, o + n))

        if len(pieces) == 1:
            fetch(pieces[0])
        elif pieces:
            with ThreadPoolExecutor(transfer.RANGES_IN_FLIGHT, "arrayckpt-get") as pool:
                list(pool.map(fetch, pieces))
        with self._lock:
            self.data_bytes += sum(n for _, n, _ in pieces)
            self.data_gets += len(pieces)

    def meta(self) -> ShardingMeta:
        if SHARDING_META_FILE not in self.files:
            raise CheckpointNotFoundError(
                f"{self.url} is not a distributed checkpoint: its {objects.COMMIT_OBJECT} lists "
                f"no {SHARDING_META_FILE}; load it with load_checkpoint"
            )
        data = self.read_small(SHARDING_META_FILE, MAX_SHARDING_META_BYTES)
        return ShardingMeta.from_json(data, source=f"{self.url}/{SHARDING_META_FILE}")

    def ranks(self, world_size: int) -> list[SavedRank]:
        """Every saved rank; each one's model and training state must be listed."""
        # Bounded by the listing, not by world_size: each rank lists at least two files.
        missing = (
            [
                f"{rank_dir_name(r)}/{f}"
                for r in range(world_size)
                for f in (MODEL_FILE, TRAINING_STATE_FILE)
                if f"{rank_dir_name(r)}/{f}" not in self.files
            ]
            if 2 * world_size <= len(self.files)
            else ["the files of most ranks"]
        )
        if missing:
            raise CheckpointNotFoundError(
                f"{self.url}: the distributed checkpoint saved by {world_size} ranks does not "
                f"list {', '.join(missing[:20])} in its {objects.COMMIT_OBJECT}; it was not "
                "committed by a distributed save of every rank"
            )
        return [RemoteRank(self, r) for r in range(world_size)]

    @contextlib.contextmanager
    def local_files(self, prefix: str) -> Iterator[Path]:
        """The objects under ``prefix/`` fetched whole into a private temporary directory
        (on ``/dev/shm`` when it has room), each checked against the commit object."""
        names = {n: e for n, e in self.files.items() if n.startswith(prefix + "/")}
        need = sum(int(e["size"]) for e in names.values())
        base = None
        with contextlib.suppress(OSError):
            shm = os.statvfs("/dev/shm")
            if shm.f_bavail * shm.f_frsize > 2 * need:
                base = "/dev/shm"
        with tempfile.TemporaryDirectory(prefix="arrayckpt-get-", dir=base) as tmp:
            for name, entry in names.items():
                self._fetch_file(name, entry, Path(tmp, name.rpartition("/")[2]))
            yield Path(tmp)

    def _fetch_file(self, name: str, entry: Mapping[str, Any], dest: Path) -> None:
        """Ranged gets straight into a mapping of ``dest``: no second copy in memory."""
        size = int(entry["size"])
        with open(dest, "xb+") as f:
            if size:
                f.truncate(size)
                with mmap.mmap(f.fileno(), size) as mapped:
                    view = memoryview(mapped)
                    try:
                        self.read_ranges(name, [(0, size)], view)
                        crc = format.checksum(view)
                    finally:
                        view.release()
            else:
                crc = format.checksum(b"")
        if f"{crc:08x}" != entry["crc32c"]:
            raise CorruptCheckpointError(
                f"{self.url}/{name} does not match its commit object (CRC32C): it was changed "
                "after the commit; restore another step"
            )


class RemoteShardFile(ShardFile):
    """A saved safetensors object read by byte ranges: only its header is fetched up front."""

    def __init__(self, step: RemoteStep, name: str) -> None:
        # The readers only put ``path`` into messages (see ObjectPath).
        self.path = cast(Path, step.path / name)
        self.step, self.name = step, name
        head, size = step.read_head(name)
        self.header = format.parse_header(self.path, head, size)

    def _fill(self, ranges: Sequence[tuple[int, int]], out: memoryview) -> None:
        self.step.read_ranges(self.name, ranges, out)


class RemoteRank(SavedRank):
    """One saved rank of a `RemoteStep`: ``rank_{r}/`` objects listed by its commit object."""

    def __init__(self, step: RemoteStep, rank: int) -> None:
        super().__init__(rank, cast(Path, step.path / rank_dir_name(rank)))
        self.step = step
        self.prefix = rank_dir_name(rank)

    @property
    def model(self) -> ShardFile:
        if self._model is None:
            self._model = RemoteShardFile(self.step, f"{self.prefix}/{MODEL_FILE}")
        return self._model

    @property
    def optimizer(self) -> ShardFile | None:
        name = f"{self.prefix}/{OPTIMIZER_FILE}"
        if self._optimizer is None and name in self.step.files:
            self._optimizer = RemoteShardFile(self.step, name)
        return self._optimizer

    def training_state(self, metadata: Mapping[str, str] | None = None) -> TrainingState:
        name = f"{self.prefix}/{TRAINING_STATE_FILE}"
        data = self.step.read_small(name, MAX_STATE_BYTES)
        return TrainingState.checked(data, source=f"{self.step.url}/{name}", metadata=metadata)

    def load(self, **options: Any) -> Any:
        """The rank's own files are all needed: fetched whole, then loaded as a local
        checkpoint (mapped: the arrays share its pages, which outlive its removal)."""
        from ..load import load_checkpoint

        with self.step.local_files(self.prefix) as copy:
            return load_checkpoint(copy, **{**options, "mmap": True})

    def extra_file(self) -> ShardFile | None:
        name = f"{self.prefix}/{EXTRA_FILE}"
        return RemoteShardFile(self.step, name) if name in self.step.files else None

    def extra(self, **options: Any) -> Any:
        """Fetched whole (it is all needed) and loaded as a local file, mapped."""
        from ..load import load_state_file

        name = f"{self.prefix}/{EXTRA_FILE}"
        entry = self.step.files.get(name)
        if entry is None:
            return None
        with tempfile.TemporaryDirectory(prefix="arrayckpt-get-") as tmp:
            copy = Path(tmp, EXTRA_FILE)
            self.step._fetch_file(name, entry, copy)
            return load_state_file(copy, **{**options, "mmap": True})


@contextlib.contextmanager
def open_step(location: str, options: Mapping[str, Any] | None) -> Iterator[RemoteStep]:
    """The committed distributed step at ``location``; logs what was fetched from it."""
    step = RemoteStep(location, options)
    try:
        yield step
    finally:
        log.debug(
            "read %s: %d bytes of tensor data in %d ranged gets, %d other bytes in %d gets",
            step.url,
            step.data_bytes,
            step.data_gets,
            step.other_bytes,
            step.other_gets,
        )


# ---------------------------------------------------------------------------- consolidate


def consolidate(
    source: Any,
    output: Any,
    options: Mapping[str, Any] | None,
    *,
    verify: bool,
    progress: Any,
) -> Path | str:
    """`consolidate_checkpoint` where the source or the output (or both) is a URL."""
    from ..distributed.consolidate import _check_apart, merge, open_local

    if is_url(source) and is_url(output):
        a, b = parse_url(source), parse_url(output)
        inside = (a.prefix + "/").startswith(b.prefix + "/") or (b.prefix + "/").startswith(
            a.prefix + "/"
        )
        if (a.scheme, a.bucket) == (b.scheme, b.bucket) and inside:
            raise InvalidInputError(
                f"consolidate_checkpoint: output {b} overlaps the distributed checkpoint {a} "
                f"it reads; write the merged checkpoint outside it, e.g. {a}-merged"
            )
    with contextlib.ExitStack() as stack:
        if is_url(source):
            step = stack.enter_context(open_step(source, options))
            meta = step.meta()
            ranks: Sequence[SavedRank] = step.ranks(meta.world_size)
        else:
            root = Path(local_path(source))
            if not is_url(output):
                _check_apart(root, Path(local_path(output)))
            meta, ranks = open_local(root)
        if not is_url(output):
            return merge(meta, ranks, Path(local_path(output)), verify=verify, progress=progress)
        # No rename on a store: merge into a private directory, then upload and commit it.
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="arrayckpt-merge-")))
        merged = merge(meta, ranks, tmp / "merged", verify=verify, progress=progress)
        names = sorted(p.name for p in merged.iterdir())
        return objects.save_files(str(output), {n: _chunks(merged / n) for n in names}, options)


def _chunks(path: Path) -> Iterator[memoryview]:
    """A local file read part by part as the upload sends it: memory stays bounded."""
    with open(path, "rb") as f:
        while chunk := f.read(transfer.PART_BYTES):
            yield memoryview(chunk)
