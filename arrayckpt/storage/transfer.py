"""Parallel transfers between an object store and host memory: ranged reads straight into
the buffers a load's arrays view, and multipart uploads streamed from a save's buffers."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PosixPath
from typing import Any

import numpy as np

from .. import aliases, format
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
)
from .url import StorageURL

#: Multipart part size and parts in flight: memory held by one upload is their product.
PART_BYTES = 16 << 20
PARTS_IN_FLIGHT = 8
#: Ranged reads of a load, and how many run at once. A range is one part of the upload:
#: SeaweedFS serves a range that straddles two parts slower (loads went from about 0.35x
#: to 0.5x of a plain get when ranges were aligned).
RANGE_BYTES = PART_BYTES
RANGES_IN_FLIGHT = 8
#: The first get of a file: its header (one request for all usual headers), and all of a
#: small file.
HEAD_BYTES = 1 << 20
#: Attempts of one ranged read. obstore retries failed requests; this also covers a
#: response cut off mid-body. Safe: a committed object never changes (its ETag is pinned).
READ_ATTEMPTS = 4
#: Pieces a response is copied in as it arrives (with the reads in flight, all a load holds
#: beyond its arrays). Measured on 256 MiB loads: 256 KiB
#: matched a plain parallel get; 64 KiB paid per-piece overhead, and whole ranges
#: collected first (fresh memory, copied again) took 1.7x as long.
STREAM_PIECE_BYTES = 256 << 10
BACKOFF_S = 0.2


class ObjectPath(PosixPath):
    """The URL of an object, for the messages of the format reader (which names files by
    `Path`): a `Path` would print ``s3://b/k`` as ``s3:/b/k``. Never opened."""

    _url: str

    def __str__(self) -> str:
        return getattr(self, "_url", None) or super().__str__()

    def __repr__(self) -> str:
        return repr(str(self))


def object_path(url: StorageURL) -> ObjectPath:
    path = ObjectPath(str(url))
    path._url = str(url)
    return path


def describe(exc: BaseException) -> str:
    """obstore's message, first line only (its later lines can echo request details)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def permanent(exc: BaseException) -> bool:
    """Whether retrying ``exc`` cannot help: the object is gone or changed, or access is
    refused (obstore's retries already covered throttling and server errors)."""
    if isinstance(exc, FileNotFoundError | CheckpointError):
        return True
    return type(exc).__name__ in {
        "PreconditionError",
        "PermissionDeniedError",
        "UnauthenticatedError",
        "InvalidPathError",
        "NotSupportedError",
    }


@dataclass
class _Remote:
    """One object of a committed step, its header fetched; ``spans`` are the byte ranges
    to fetch, each with the buffer it lands in."""

    key: str
    path: ObjectPath
    size: int
    etag: str | None
    prefix: memoryview  # the file's first bytes, as the first get returned them
    header: format.Header | None = None
    spans: list[tuple[int, np.ndarray]] = field(default_factory=list)
    #: All tensor data (a full load: the arrays view it), or None (``keys``: ``data``).
    buf: np.ndarray | None = None
    #: Tensors to checksum as their bytes arrive: ``_starts`` sorted, remaining byte counts.
    _entries: list[format.Entry] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)
    _left: dict[str, int] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    data: dict[str, np.ndarray] = field(default_factory=dict)


class Fetch:
    """Parallel ranged reads of some objects of one step, straight into numpy buffers."""

    def __init__(self, store: Any, url: StorageURL) -> None:
        self.store = store
        self.url = url
        self._lock = threading.Lock()

    def _get(self, obj: _Remote | None, key: str, start: int, end: int) -> tuple[Any, Any]:
        """One ranged get (its bytes and the object's metadata), retried where safe."""
        import obstore

        options: Any = {"range": (start, end)}  # obstore's GetOptions
        if obj is not None and obj.etag:
            options["if_match"] = obj.etag  # a replaced object fails instead of mixing
        for attempt in range(READ_ATTEMPTS):
            try:
                got = obstore.get(self.store, key, options=options)
                return got.bytes(), got.meta
            except Exception as exc:
                if permanent(exc) or attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _read_into(self, obj: _Remote, start: int, dest: np.ndarray) -> None:
        """Fill ``dest`` with the object's bytes from ``start``, copying each piece of the
        response as it arrives: small pieces, which the client recycles while they are in
        cache, rather than a whole range collected in fresh memory and copied again.
        A failed attempt resumes where it stopped (retried where safe)."""
        import obstore

        done, attempt = 0, 0
        while done < dest.nbytes:
            options: Any = {"range": (start + done, start + dest.nbytes)}  # GetOptions
            if obj.etag:
                options["if_match"] = obj.etag  # a replaced object fails instead of mixing
            try:
                got = obstore.get(self.store, obj.key, options=options)
                for piece in got.stream(min_chunk_size=STREAM_PIECE_BYTES):
                    n = len(piece)
                    if done + n > dest.nbytes:
                        raise CorruptCheckpointError(
                            f"{obj.path}: bytes {start}-{start + dest.nbytes} came back longer: "
                            "the object differs from its commit object; restore another step"
                        )
                    dest[done : done + n] = np.frombuffer(piece, np.uint8)
                    done += n
            except Exception as exc:
                attempt += 1
                if permanent(exc) or attempt >= READ_ATTEMPTS:
                    raise
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
                continue
            if done < dest.nbytes:  # ended early without an error: the object is shorter
                raise CorruptCheckpointError(
                    f"{obj.path}: bytes {start}-{start + dest.nbytes} came back as {done}: the "
                    "object is shorter than its commit object lists; restore another step"
                )

    def _failed(self, name: str, exc: Exception) -> CheckpointError:
        where = self.url.child(name)
        if isinstance(exc, CheckpointError):
            return exc
        if isinstance(exc, FileNotFoundError):
            return CheckpointNotFoundError(
                f"{where} disappeared while it was read (deleted by retention?)"
            )
        if type(exc).__name__ == "PreconditionError":
            return CorruptCheckpointError(
                f"{where} was replaced while it was read; it no longer matches its commit "
                "object: restore another step"
            )
        return CheckpointReadError(f"reading {where} failed: {describe(exc)}")

    def open(self, name: str, size: int, *, safetensors: bool) -> _Remote:
        """Get the first bytes of object ``name`` (all of a small one); parse its header."""
        import obstore

        key = self.url.key(name)
        path = object_path(self.url.child(name))
        try:
            if size == 0:  # no byte to get: its size and ETag from a head
                head, meta = b"", obstore.head(self.store, key)
            else:
                head, meta = self._get(None, key, 0, min(size, HEAD_BYTES))
        except Exception as exc:
            raise self._failed(name, exc) from exc
        if int(meta["size"]) != size:
            raise CorruptCheckpointError(
                f"{path} does not match its commit object ({meta['size']} bytes, not the "
                f"{size} listed): it was changed after the commit; restore another step"
            )
        obj = _Remote(key, path, size, meta.get("e_tag"), memoryview(head))
        if not safetensors:
            return obj
        prefix: bytes | memoryview = obj.prefix
        if size >= 8:
            need = 8 + format.header_length(path, bytes(prefix[:8]), size)
            if need > len(prefix):  # a header over HEAD_BYTES: one more get for the rest
                try:
                    rest, _ = self._get(obj, key, len(prefix), need)
                except Exception as exc:
                    raise self._failed(name, exc) from exc
                prefix = bytes(prefix) + bytes(rest)
        obj.header = format.parse_header(path, bytearray(prefix), size)
        return obj

    def plan(self, obj: _Remote, keys: Iterable[str] | None, *, verify: bool) -> None:
        """Choose the bytes to fetch: all tensors into one buffer (their arrays view it),
        or only ``keys`` (and the tensors they alias), each into its own buffer."""
        header = obj.header
        assert header is not None
        entries = header.entries
        if keys is None:
            chosen = list(entries.values())
            obj.buf = np.empty(obj.size - header.data_start, np.uint8)
            obj.spans.append((header.data_start, obj.buf))
            for e in chosen:
                off = e.start - header.data_start
                obj.data[e.name] = obj.buf[off : off + e.end - e.start]
        else:
            tied = aliases.read(header.metadata, entries, source=str(obj.path))
            stored = {tied.get(k, k) for k in keys}  # unknown names: the loader names them
            chosen = sorted((entries[n] for n in stored if n in entries), key=lambda e: e.start)
            for e in chosen:
                buf = np.empty(e.end - e.start, np.uint8)
                obj.spans.append((e.start, buf))
                obj.data[e.name] = buf
        if verify and header.checksums is not None and header.checksum_problem is None:
            obj._entries = sorted((e for e in chosen if e.end > e.start), key=lambda e: e.start)
            obj._starts = [e.start for e in obj._entries]
            obj._left = {e.name: e.end - e.start for e in obj._entries}

    def plan_whole(self, obj: _Remote) -> None:
        """Fetch all of ``obj`` (a small file: the first get has most or all of it)."""
        obj.buf = np.empty(obj.size, np.uint8)
        obj.spans.append((0, obj.buf))

    def whole(self, obj: _Remote) -> bytes:
        assert obj.buf is not None
        return obj.buf.tobytes()

    def _land(self, obj: _Remote, start: int, end: int, dest: np.ndarray) -> None:
        """Fetch ``[start, end)`` into ``dest``; checksum the tensors it completes."""
        done = max(0, min(end, len(obj.prefix)) - start)  # already in the first get's bytes
        if done:
            dest[:done] = np.frombuffer(obj.prefix, np.uint8, done, start)
        if start + done < end:
            self._read_into(obj, start + done, dest[done:])
        if not obj._entries:
            return
        complete = []
        with self._lock:
            i = max(0, bisect.bisect_right(obj._starts, start) - 1)
            while i < len(obj._entries) and obj._entries[i].start < end:
                e = obj._entries[i]
                overlap = min(end, e.end) - max(start, e.start)
                if overlap > 0:
                    obj._left[e.name] -= overlap
                    if obj._left[e.name] == 0:
                        complete.append(e)
                i += 1
        for e in complete:  # crc32c releases the GIL: the workers checksum in parallel
            crc = format.tensor_checksum(e.dtype.code, e.shape, obj.data[e.name].data)
            with self._lock:
                obj.computed[e.name] = crc

    def run(self, objs: Mapping[str, _Remote]) -> None:
        """Fetch every planned span of ``objs`` (name -> object) with at most
        `RANGES_IN_FLIGHT` ranged reads at once, across all of them."""
        jobs = []
        for name, obj in objs.items():
            for start, buf in obj.spans:
                # cut at multiples of RANGE_BYTES in the object (= PART_BYTES): each read
                # is one part of the upload, which stores serve from one piece
                lo, end = start, start + buf.nbytes
                while lo < end:
                    hi = min(end, (lo // RANGE_BYTES + 1) * RANGE_BYTES)
                    jobs.append((name, obj, lo, hi, buf[lo - start : hi - start]))
                    lo = hi
        if not jobs:
            return

        def one(job: tuple[str, _Remote, int, int, np.ndarray]) -> None:
            name, obj, start, end, dest = job
            try:
                self._land(obj, start, end, dest)
            except Exception as exc:
                raise self._failed(name, exc) from exc

        with ThreadPoolExecutor(min(RANGES_IN_FLIGHT, len(jobs)), "arrayckpt-get") as pool:
            for _ in pool.map(one, jobs):  # the first failure propagates (pending ones stop)
                pass

    def reader(self, obj: _Remote) -> format.SafetensorsReader:
        """A reader over the fetched bytes (checksums taken while fetching are kept)."""
        header = obj.header
        assert header is not None
        if obj.buf is not None:
            return format.SafetensorsReader.fetched(
                obj.path, header, obj.computed, buf=obj.buf, base=header.data_start
            )
        return format.SafetensorsReader.fetched(obj.path, header, obj.computed, pending=obj.data)


def upload(store: Any, key: str, parts: Iterable[memoryview]) -> tuple[int, int]:
    """Stream ``parts`` to ``key`` as a parallel multipart upload; return size and CRC32C.

    obstore cuts the stream into `PART_BYTES` parts as it goes, with `PARTS_IN_FLIGHT`
    uploading at once: the memory it holds is their product, never the whole file.
    """
    import obstore

    size, crc = 0, 0

    def counted() -> Iterator[memoryview]:
        nonlocal size, crc
        for part in parts:
            crc = format.checksum(part, crc)
            size += part.nbytes
            yield part

    obstore.put(store, key, counted(), chunk_size=PART_BYTES, max_concurrency=PARTS_IN_FLIGHT)
    return size, crc
