"""The safetensors byte layout: writing from host buffers, strict header validation, reading.

This is the only module that knows how a safetensors file is laid out. arrayckpt adds its
own facts (format version, per-tensor CRC32C) to the header's ``__metadata__`` map, so the
files stay readable by every safetensors reader.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import mmap as mmap_module
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import crc32c
import numpy as np
import safetensors

from . import fsops, pool
from .dtypes import BY_CODE, DType
from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .staging import HostTensor
from .strict_json import reject_constant, unique_keys

log = logging.getLogger("arrayckpt")

#: Largest header accepted (the safetensors library's own cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Most tensors accepted in one file.
MAX_TENSORS = 1 << 20

FORMAT_KEY = "arrayckpt.format"
FORMAT_VERSION = "1"
CHECKSUMS_KEY = "arrayckpt.crc32c"
_OWN_PREFIX = "arrayckpt."

_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def checksum(data: memoryview | bytes, start: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``start`` (hardware-accelerated; releases the GIL
    on large buffers)."""
    return int(crc32c.crc32c(data, start))


def tensor_checksum(code: str, shape: tuple[int, ...], data: memoryview | bytes) -> int:
    """CRC32C of a tensor's dtype code, shape and bytes.

    Covering dtype and shape too means a header damaged into another valid header (``U8``
    read as ``I8``, an empty ``[0, 4]`` read as ``[0, 1]``) fails verification like
    damaged data does.
    """
    return checksum(data, checksum_seed(code, shape))


@functools.lru_cache(maxsize=4096)
def checksum_seed(code: str, shape: tuple[int, ...]) -> int:
    """The CRC32C a tensor's checksum starts from: that of ``"<code>:<dim>,<dim>..."``.

    Cached: state dicts repeat a few shapes many times (20,000 tensors of one shape in W2).
    """
    return checksum(f"{code}:{','.join(map(str, shape))}".encode())


def _checksums_json(crcs: Mapping[str, int]) -> str:
    return json.dumps(
        {name: f"{crc:08x}" for name, crc in crcs.items()},
        separators=(",", ":"),
        ensure_ascii=False,
    )


#: One tensor to checksum: its dtype code, shape and bytes (any C-contiguous buffer).
_Checksummable = tuple[str, tuple[int, ...], Any]


def _checksum_all(items: list[_Checksummable]) -> list[int]:
    crc: Any = crc32c.crc32c  # typed for bytes; any C-contiguous buffer works
    return [crc(data, checksum_seed(code, shape)) for code, shape, data in items]


def _checksums_parallel(items: list[_Checksummable], sizes: list[int]) -> list[int]:
    """Checksums of ``items`` (``sizes``: their byte sizes), spread across the helper
    threads and this one.

    crc32c releases the GIL; items go in one batch per thread of about equal bytes,
    since a hand-off per tensor would cost more than the checksum of a small one.
    """
    workers = pool.threads()
    share = sum(sizes) / workers
    batches: list[list[_Checksummable]] = [[]]
    filled = 0.0
    for item, size in zip(items, sizes, strict=True):
        if filled >= share * len(batches) and len(batches) < workers:
            batches.append([])
        batches[-1].append(item)
        filled += size
    helper = pool.executor()
    futures = [helper.submit(_checksum_all, batch) for batch in batches[1:]]
    try:
        first = _checksum_all(batches[0])
    finally:
        rest = [c for f in futures for c in f.result()]
    return first + rest


def checksums(tensors: Mapping[str, HostTensor]) -> dict[str, int]:
    """Every tensor's CRC32C, computed in parallel."""
    # `t.data` itself, not `t.bytes()`: a C-contiguous array exports its bytes as a buffer,
    # and skipping the flat uint8 view saves a microsecond per tensor.
    items = [(t.dtype.code, t.data.shape, t.data) for t in tensors.values()]
    sizes = [t.data.nbytes for t in tensors.values()]
    return dict(zip(tensors, _checksums_parallel(items, sizes), strict=True))


def write_file(
    path: Path,
    tensors: Mapping[str, HostTensor],
    metadata: Mapping[str, str] | None = None,
    *,
    borrowed: bool = False,
) -> None:
    """Write ``tensors`` to a safetensors file at ``path`` and fsync it.

    Each tensor's CRC32C goes into ``__metadata__``; the bytes are written by safetensors'
    Rust serializer straight from the host buffers, which ``tensors`` keeps alive. The
    whole file is one `FileSystem.write_safetensors` step (the durability tests record
    and replay those steps), so the checksums are computed first, in parallel.

    Args:
        borrowed: the buffers are the caller's own arrays (a synchronous, zero-copy save),
            which another thread may change while they are checksummed and written. The
            file is then read back and checksummed; if its bytes are not those the
            checksums were taken of, it is written again from a private copy. Either way
            the checksums recorded are those of the bytes in the file.
    """
    meta = dict(metadata or {})
    meta[FORMAT_KEY] = FORMAT_VERSION
    crcs = checksums(tensors)
    _write(path, tensors, meta, crcs)
    if borrowed and _file_checksums(path, list(tensors)) != crcs:
        log.warning(
            "%s: tensors changed while they were being saved; writing a copy instead "
            "(synchronous saves read the arrays in place: stop changing them during the "
            "save, or use AsyncCheckpointer, which snapshots them first)",
            path,
        )
        fsops.fs().remove_file(path)
        tensors = {
            name: HostTensor(np.array(t.data, copy=True), t.dtype) for name, t in tensors.items()
        }
        _write(path, tensors, meta, checksums(tensors))
    fsops.fs().fsync_file(path)


def _write(
    path: Path, tensors: Mapping[str, HostTensor], meta: dict[str, str], crcs: dict[str, int]
) -> None:
    meta[CHECKSUMS_KEY] = _checksums_json(crcs)
    specs = {
        name: safetensors.TensorSpec(
            dtype=t.dtype.name,
            shape=list(t.data.shape),
            data_ptr=t.data.__array_interface__["data"][0] if t.address is None else t.address,
            data_len=t.data.nbytes,
        )
        for name, t in tensors.items()
    }
    fsops.fs().write_safetensors(path, specs, meta)


def _file_checksums(path: Path, names: list[str]) -> dict[str, int]:
    """The checksums of the tensors as the file at ``path`` holds them (read back from the
    page cache, just written)."""
    reader = SafetensorsReader(path)
    entries = [reader.header.entries[name] for name in names]
    items = [(e.dtype.code, e.shape, reader.raw(e.name)) for e in entries]
    sums = _checksums_parallel(items, [e.end - e.start for e in entries])
    return dict(zip(names, sums, strict=True))


@dataclass(frozen=True)
class Entry:
    """One tensor's header entry, validated. Offsets are relative to the file start."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]
    checksums: dict[str, int] | None
    data_start: int


def _fail(path: Path, problem: str) -> NoReturn:
    raise CorruptCheckpointError(f"{path}: {problem}")


def _reject_float(token: str) -> Any:
    raise ValueError(f"unexpected number {token} (a safetensors header holds only integers)")


def _strict_int(token: str) -> int:
    if token.startswith("-"):
        raise ValueError(f"negative number {token}")
    return int(token)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(path: Path, prefix: bytes, file_size: int) -> Header:
    """Validate a safetensors header before anything is allocated for its tensors.

    ``prefix`` holds at least the first ``8 + header length`` bytes of the file.
    Stricter than the safetensors library: duplicate keys, unknown fields, holes,
    trailing bytes and non-UTF-8 names are all rejected.
    """
    if file_size < 8:
        _fail(path, f"file is {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if n > file_size - 8:
        _fail(path, f"header length {n} runs past the end of the {file_size}-byte file")
    raw = prefix[8 : 8 + n]
    # Count entries before parsing, so a header of millions of tiny entries allocates nothing.
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        _fail(path, f"header declares more than {MAX_TENSORS} tensors")
    try:
        text = raw.decode("utf-8")
        top = json.loads(
            text,
            object_pairs_hook=unique_keys,
            parse_constant=reject_constant,
            parse_float=_reject_float,
            parse_int=_strict_int,
        )
    except UnicodeDecodeError as exc:
        _fail(path, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    except RecursionError:
        _fail(path, "header JSON is nested too deeply")
    except ValueError as exc:
        _fail(path, f"header is not valid JSON: {exc}")
    if not isinstance(top, dict):
        _fail(path, f"header must be a JSON object, not {type(top).__name__}")
    metadata = _parse_metadata(path, top.pop("__metadata__", {}))
    if len(top) > MAX_TENSORS:  # the byte count above misses keys spelled with escapes
        _fail(path, f"header declares more than {MAX_TENSORS} tensors")
    data_start = 8 + n
    data_len = file_size - data_start
    entries = {name: _parse_entry(path, name, raw_entry) for name, raw_entry in top.items()}
    _check_coverage(path, entries.values(), data_len)
    entries = {
        name: Entry(e.name, e.dtype, e.shape, e.start + data_start, e.end + data_start)
        for name, e in entries.items()
    }
    return Header(entries, metadata, _parse_checksums(path, metadata, entries), data_start)


def _parse_metadata(path: Path, meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail(path, "__metadata__ must map strings to strings")
    return meta


def _parse_entry(path: Path, name: str, entry: Any) -> Entry:
    where = f"tensor {name!r}"
    if not name or "\x00" in name:
        _fail(path, f"{where}: tensor names must be non-empty and contain no NUL")
    try:  # JSON escapes can spell a lone surrogate, which no UTF-8 reader accepts
        name.encode("utf-8")
    except UnicodeEncodeError:
        _fail(path, f"{where}: tensor name holds a lone surrogate (not valid UTF-8)")
    if not isinstance(entry, dict):
        _fail(path, f"{where}: entry must be an object")
    if set(entry) != _ENTRY_FIELDS:
        extra = sorted(set(entry) - _ENTRY_FIELDS)
        missing = sorted(_ENTRY_FIELDS - set(entry))
        _fail(path, f"{where}: unknown fields {extra}, missing fields {missing}")
    code = entry["dtype"]
    if not isinstance(code, str) or code not in BY_CODE:
        _fail(path, f"{where}: unknown dtype {code!r}")
    dtype = BY_CODE[code]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        _fail(path, f"{where}: shape {shape!r} must be a list of non-negative integers")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
    ):
        _fail(path, f"{where}: data_offsets {offsets!r} must be two non-negative integers")
    start, end = offsets
    if start > end:
        _fail(path, f"{where}: data_offsets {offsets} are reversed")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if end - start != expected:
        _fail(
            path,
            f"{where}: shape {shape} of {code} needs {expected} bytes but data_offsets "
            f"span {end - start}",
        )
    return Entry(name, dtype, tuple(shape), start, end)


def _check_coverage(path: Path, entries: Iterable[Entry], data_len: int) -> None:
    cursor = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start < cursor:
            _fail(path, f"tensor {e.name!r}: data_offsets overlap the previous tensor")
        if e.start > cursor:
            _fail(path, f"tensor {e.name!r}: {e.start - cursor} unused bytes before its data")
        cursor = e.end
    if cursor > data_len:
        _fail(path, f"tensor data ends at {cursor} but the file holds only {data_len} data bytes")
    if cursor < data_len:
        _fail(path, f"{data_len - cursor} trailing bytes after the last tensor")


def _parse_checksums(
    path: Path, metadata: Mapping[str, str], entries: Mapping[str, Entry]
) -> dict[str, int] | None:
    text = metadata.get(CHECKSUMS_KEY)
    if text is None:
        if any(key.startswith(_OWN_PREFIX) for key in metadata):
            # arrayckpt always writes the table: without it, it was damaged or removed.
            _fail(path, f"__metadata__ is arrayckpt's but lacks its {CHECKSUMS_KEY!r} table")
        return None  # written by another tool: nothing to verify
    try:
        table = json.loads(text, object_pairs_hook=unique_keys)
        parsed = {str(k): int(v, 16) for k, v in table.items()}
    except (ValueError, TypeError, AttributeError, RecursionError):
        _fail(path, f"__metadata__[{CHECKSUMS_KEY!r}] is not a map of tensor names to hex CRCs")
    if set(parsed) != set(entries):
        _fail(path, f"__metadata__[{CHECKSUMS_KEY!r}] does not list exactly the file's tensors")
    return parsed


class SafetensorsReader:
    """An open, validated safetensors file; arrays are views into its mapping.

    With ``mmap=True`` (the default, best on local disks) the file is mapped copy-on-write:
    arrays are zero-copy, writable, and writes never reach the file. With ``mmap=False``
    the file is read in one sequential pass (best on network file systems). With
    ``ranges=True`` only the header is read up front and each tensor's byte range when it
    is asked for, through `fsops` (for loading a few tensors of a large file eagerly).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, mmap: bool = True, ranges: bool = False
    ) -> None:
        self.path = Path(path)
        self._ranges: dict[str, np.ndarray] | None = None
        if ranges:
            self._read_header_only()
            return
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    _fail(self.path, f"file is {size} bytes, shorter than the 8-byte header length")
                if mmap:
                    self._buf: Any = mmap_module.mmap(
                        f.fileno(), 0, access=mmap_module.ACCESS_COPY
                    )
                    prefix = self._buf
                else:
                    self._buf = np.empty(size, np.uint8)
                    if f.readinto(memoryview(self._buf)) != size:
                        _fail(self.path, "file shrank while it was being read")
                    prefix = self._buf.data
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self.path} does not exist") from exc
        except IsADirectoryError as exc:
            raise CorruptCheckpointError(f"{self.path} is a directory, not a file") from exc
        head = bytes(prefix[:8])
        (n,) = struct.unpack("<Q", head)
        limit = 8 + min(n, MAX_HEADER_BYTES, size - 8)
        self.header = parse_header(self.path, bytes(prefix[:limit]), size)

    def _read_header_only(self) -> None:
        fs = fsops.fs()
        try:
            size = fs.size(self.path)
            if size < 8:
                _fail(self.path, f"file is {size} bytes, shorter than the 8-byte header length")
            head = bytearray(8)
            fs.read_ranges(self.path, [(0, 8)], memoryview(head))
            (n,) = struct.unpack("<Q", head)
            rest = bytearray(min(n, MAX_HEADER_BYTES, size - 8))
            fs.read_ranges(self.path, [(8, len(rest))], memoryview(rest))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self.path} does not exist") from exc
        except IsADirectoryError as exc:
            raise CorruptCheckpointError(f"{self.path} is a directory, not a file") from exc
        self.header = parse_header(self.path, bytes(head + rest), size)
        self._ranges = {}

    @property
    def names(self) -> list[str]:
        return list(self.header.entries)

    def _bytes(self, name: str) -> Any:
        """Tensor ``name``'s bytes: a view of the whole file, or (``ranges``) its own read."""
        e = self.header.entries[name]
        if self._ranges is None:
            return self._buf
        if name not in self._ranges:  # read once, for verify() and array() alike
            buf = np.empty(e.end - e.start, np.uint8)
            try:
                fsops.fs().read_ranges(self.path, [(e.start, e.end - e.start)], buf.data)
            except (OSError, EOFError) as exc:  # e.g. truncated after the header was read
                _fail(self.path, f"reading tensor {name!r} failed: {exc}")
            self._ranges[name] = buf
        return self._ranges[name]

    def raw(self, name: str) -> memoryview:
        e = self.header.entries[name]
        if self._ranges is not None:
            return memoryview(self._bytes(name))
        return memoryview(self._buf)[e.start : e.end]

    def verify(self, name: str) -> None:
        """Check ``name`` against its recorded CRC32C (a no-op for files without them)."""
        sums = self.header.checksums
        if sums is None:
            return
        e = self.header.entries[name]
        if tensor_checksum(e.dtype.code, e.shape, self.raw(name)) != sums[name]:
            _fail(
                self.path,
                f"tensor {name!r} fails its CRC32C checksum: the file is corrupt; "
                "restore another checkpoint (or load with verify=False to inspect it)",
            )

    def array(self, name: str, *, verify: bool = True) -> np.ndarray:
        """Tensor ``name`` as a NumPy array (ml_dtypes for BF16/F8), sharing the mapping."""
        if verify:
            self.verify(name)
        e = self.header.entries[name]
        dtype = e.dtype.numpy
        count = e.end - e.start
        if count == 0:
            return np.empty(e.shape, dtype)
        if self._ranges is not None:
            arr = self._bytes(name)
            del self._ranges[name]  # the array owns the buffer now; the reader lets go
            return arr.view(dtype).reshape(e.shape)  # np.empty is aligned
        arr = np.frombuffer(self._buf, dtype=np.uint8, count=count, offset=e.start)
        if e.start % e.dtype.itemsize:
            arr = arr.copy()  # misaligned (another tool's file): frameworks want aligned data
        return arr.view(dtype).reshape(e.shape)

    def arrays(
        self, keys: Iterable[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        names = self.names if keys is None else list(keys)
        missing = [k for k in names if k not in self.header.entries]
        if missing:
            raise CheckpointNotFoundError(f"{self.path}: no tensors named {missing}")
        return {name: self.array(name, verify=verify) for name in names}


def file_parts(
    tensors: Mapping[str, HostTensor], metadata: Mapping[str, str] | None = None
) -> list[memoryview]:
    """The bytes of the safetensors file `write_file` would write, as buffers: the header,
    then views of each host buffer (no copy), for uploads that stream a file.

    Larger items first, as safetensors orders them, so every tensor stays aligned.
    """
    meta = dict(metadata or {})
    meta[FORMAT_KEY] = FORMAT_VERSION
    meta[CHECKSUMS_KEY] = _checksums_json(checksums(tensors))
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    doc: dict[str, Any] = {"__metadata__": meta}
    cursor = 0
    views = []
    for name in order:
        t = tensors[name]
        view = t.bytes()
        doc[name] = {
            "dtype": t.dtype.code,
            "shape": list(t.data.shape),
            "data_offsets": [cursor, cursor + view.nbytes],
        }
        cursor += view.nbytes
        views.append(view)
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors does
    return [memoryview(struct.pack("<Q", len(raw)) + raw), *views]


def write_file_streaming(
    path: Path,
    layout: Sequence[tuple[str, DType, tuple[int, ...]]],
    produce: Callable[[str], Iterable[Any]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor, holding at most one tensor's bytes.

    ``layout`` lists each tensor's name, dtype and shape in file order; ``produce(name)``
    yields that tensor's bytes as buffers (any split). Checksums have a fixed width, so the
    header is written first with placeholders and patched in place once the data is out.
    The file is fsynced.

    Raises:
        ValueError: ``produce`` yielded a different number of bytes than the shape needs.
    """
    sizes = {name: math.prod(shape) * dtype.itemsize for name, dtype, shape in layout}
    crcs = {name: 0 for name in sizes}
    seeds = {name: checksum_seed(dtype.code, shape) for name, dtype, shape in layout}

    def header() -> bytes:
        meta = dict(metadata or {})
        meta[FORMAT_KEY] = FORMAT_VERSION
        meta[CHECKSUMS_KEY] = _checksums_json(crcs)
        doc: dict[str, Any] = {"__metadata__": meta}
        cursor = 0
        for name, dtype, shape in layout:
            end = cursor + sizes[name]
            doc[name] = {"dtype": dtype.code, "shape": list(shape), "data_offsets": [cursor, end]}
            cursor = end
        raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors does
        return struct.pack("<Q", len(raw)) + raw

    def chunks() -> Iterator[Any]:
        yield header()
        for name in sizes:
            written, crc = 0, seeds[name]
            view: Any = None
            for chunk in produce(name):
                view = _byte_view(chunk)
                crc = crc32c.crc32c(view, crc)
                written += view.nbytes
                yield view
            chunk = view = None  # drop this tensor before the next one is produced
            if written != sizes[name]:
                raise ValueError(
                    f"tensor {name!r}: produced {written} bytes, expected {sizes[name]}"
                )
            crcs[name] = crc

    fs = fsops.fs()
    fs.write_chunks(path, chunks())
    fs.write_at(path, 0, header())
    fs.fsync_file(path)


def _byte_view(chunk: Any) -> memoryview:
    if isinstance(chunk, np.ndarray):  # ml_dtypes arrays do not export a buffer format
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data
    return memoryview(chunk).cast("B")
