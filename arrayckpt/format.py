"""The safetensors byte layout: writing from host buffers, strict header validation, reading.

This is the only module that knows how a safetensors file is laid out. arrayckpt adds its
own facts (format version, per-tensor CRC32C) to the header's ``__metadata__`` map, so the
files stay readable by every safetensors reader.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import math
import mmap as mmap_module
import operator
import os
import re
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from . import collector, dtypes, fsops, limits, pool
from .dtypes import BY_CODE, DType
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
    InvalidInputError,
    UnsupportedArrayError,
)
from .staging import HostTensor
from .strict_json import reject_constant, unique_keys

log = logging.getLogger("arrayckpt")

FORMAT_KEY = "arrayckpt.format"
FORMAT_VERSION = "1"
CHECKSUMS_KEY = "arrayckpt.crc32c"
#: Hugging Face's (and DCP's) framework tag; transformers refuses files without one.
HF_FORMAT_KEY = "format"
HF_FORMAT = "pt"
_OWN_PREFIX = "arrayckpt."

_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


@functools.cache
def _crc32c() -> Callable[..., int]:
    """The CRC32C function, imported on first use: importing ``crc32c`` loads
    ``importlib.metadata`` (20-40 ms), which ``import arrayckpt`` should not pay."""
    import crc32c

    return crc32c.crc32c


def import_writer_modules() -> None:
    """Import the native module a write needs (crc32c; the writer is arrayckpt's own, so
    safetensors' bindings are not needed), in the calling (training) thread.

    Every save calls this before it is queued. Imported first on the writer thread while
    the interpreter exits (the drain of a pending save after Ctrl-C), an import resets
    CPython's record of the unhandled KeyboardInterrupt, and the process would exit with
    status 1 instead of by SIGINT.
    """
    _crc32c()


def checksum(data: memoryview | bytes, start: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``start`` (hardware-accelerated; releases the GIL
    on large buffers)."""
    return int(_crc32c()(data, start))


def json_checksum(text: str | bytes) -> str:
    """The CRC32C recorded for a JSON document arrayckpt covers (a nested-state tree,
    ``training_state.json``, ``sharding_meta.json``), as 8 hex digits."""
    data = text.encode() if isinstance(text, str) else text
    return f"{checksum(data):08x}"


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


def _checksum_all(items: list[tuple[Any, int]]) -> list[int]:
    crc: Any = _crc32c()  # typed for bytes; any C-contiguous buffer works
    return [crc(data, seed) for data, seed in items]


def _checksums_parallel(items: list[tuple[Any, int]], sizes: Sequence[int]) -> list[int]:
    """CRC32Cs of ``items`` (each a buffer and the CRC it continues from; ``sizes``: their
    byte sizes), spread across the helper threads and this one.

    crc32c releases the GIL; items go in one batch per thread of about equal bytes,
    since a hand-off per tensor would cost more than the checksum of a small one.
    """
    workers = pool.threads()
    share = sum(sizes) / workers
    batches: list[list[tuple[Any, int]]] = [[]]
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


# A header entry's text beside its name and numbers:
# `"":{"dtype":"","shape":[],"data_offsets":[,]},`
_ENTRY_TEXT = 50
# Longest dtype code, digits of a 64-bit offset, and a CRC table entry's text beside its name.
_CODE_MAX, _DIGITS_MAX, _CRC_TEXT = 11, 20, 18


def check_writable(
    what: str,
    layout: Sequence[tuple[str, DType, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Refuse a file every reader would refuse (`limits`), before anything is written.

    ``layout`` lists each tensor's name, dtype and shape; ``metadata`` the caller's own
    ``__metadata__`` entries (arrayckpt's version and checksum table are added here).
    The header size is bounded cheaply first (a name's character is at most 6 bytes in
    the header, 7 in the checksum table); only a state near the cap is measured exactly.

    Raises:
        InvalidInputError: naming ``what`` and the limit exceeded.
    """
    meta = dict(metadata or {})
    if len(layout) > limits.MAX_TENSORS:
        raise InvalidInputError(
            f"{what}: {len(layout)} tensors, more than the {limits.MAX_TENSORS} one file "
            "may hold; split the state or merge small tensors"
        )
    if len(meta) + 2 > limits.MAX_METADATA_ENTRIES:
        raise InvalidInputError(
            f"{what}: {len(meta)} __metadata__ entries, more than {limits.MAX_METADATA_ENTRIES}"
        )
    # C-level passes over the columns: this runs in the caller's thread, on every save
    names, _, shapes = zip(*layout, strict=True) if layout else ((), (), ())
    dims = list(map(len, shapes))
    if dims and max(dims) > limits.MAX_NDIM:
        for name, shape in zip(names, shapes, strict=True):
            if len(shape) > limits.MAX_NDIM:
                raise InvalidInputError(
                    f"{what}: tensor {name!r} has {len(shape)} dimensions, more than the "
                    f"{limits.MAX_NDIM} a reader accepts; reshape it"
                )
    chars = sum(map(len, names))
    ndims = sum(dims)
    per_tensor = _ENTRY_TEXT + _CODE_MAX + 2 * _DIGITS_MAX + _CRC_TEXT
    meta_chars = sum(len(k) + len(v) + 6 for k, v in meta.items())
    bound = 13 * chars + len(layout) * per_tensor + ndims * (_DIGITS_MAX + 1) + 6 * meta_chars
    if bound + 256 <= limits.MAX_HEADER_BYTES:
        return
    size = _header_bytes(layout, meta)
    if size > limits.MAX_HEADER_BYTES:
        raise InvalidInputError(
            f"{what}: its safetensors header would be {size} bytes, over the "
            f"{limits.MAX_HEADER_BYTES}-byte limit every reader applies; use fewer or "
            "shorter tensor names, or less non-array state"
        )


def _stamped(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``metadata`` with the entries every file arrayckpt writes carries: the format
    version, and ``"format": "pt"``, which transformers requires of a safetensors file."""
    meta = dict(metadata or {})
    meta[HF_FORMAT_KEY] = HF_FORMAT
    meta[FORMAT_KEY] = FORMAT_VERSION
    return meta


def _header_bytes(
    layout: Sequence[tuple[str, DType, tuple[int, ...]]], meta: Mapping[str, str]
) -> int:
    """The exact size of the header `write_file` writes for ``layout`` and ``meta``."""
    shapes = tuple(tuple(shape) for _, _, shape in layout)
    key = (
        tuple(name for name, _, _ in layout),
        tuple(d.code for _, d, _ in layout),
        shapes,
        tuple(d.nbytes(shape) or 0 for (_, d, _), shape in zip(layout, shapes, strict=True)),
    )
    return len(_header(_layout_text(key), _stamped(meta)).head) - 8


@dataclass(frozen=True)
class _LayoutText:
    """The parts of a header that depend only on the tensors' names, dtypes and shapes."""

    #: The tensor entries, ``,"name":{...},"name":{...}`` (empty for no tensors).
    entries: bytes
    #: The checksum table's text as a %-format of one ``%08x`` per CRC, escaped as the
    #: JSON string it is in the header: ``{\"a\":\"%08x\",\"b\":\"%08x\"}``.
    table: str
    #: ``table`` with placeholders: zeros, the width of the real values, so that
    #: patching them in moves nothing.
    placeholder: bytes


#: A layout: the tensors' names, dtype codes, shapes and byte sizes, in file order.
_Layout = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, ...], ...], tuple[int, ...]]


@functools.lru_cache(maxsize=32)
def _layout_text(layout: _Layout) -> _LayoutText:
    """Header text for ``layout``, cached: saves of one model repeat the same layout, and
    building the text costs microseconds per tensor."""
    quote = json.encoder.encode_basestring
    entries = []
    table: list[str] = []
    cursor = 0
    for name, code, shape, nbytes in zip(*layout, strict=True):
        q = quote(name)
        entries.append(
            f',{q}:{{"dtype":"{code}","shape":[{",".join(map(str, shape))}],'
            f'"data_offsets":[{cursor},{cursor + nbytes}]}}'
        )
        cursor += nbytes
        table.append(("{" if not table else '",') + q + ':"')
    table.append('"}' if table else "{}")
    escaped = [quote(t)[1:-1].replace("%", "%%") for t in table]
    text = "%08x".join(escaped)
    return _LayoutText("".join(entries).encode(), text, (text % ((0,) * (len(table) - 1))).encode())


@dataclass(frozen=True)
class HeaderImage:
    """A file's first bytes, header length included, with placeholder checksums."""

    head: bytes
    #: Offset in the file of the checksum table's text (`checksum_table` fills it in).
    table_at: int
    layout: _LayoutText

    def checksum_table(self, crcs: Sequence[int]) -> bytes:
        """The checksum table's text with ``crcs`` (one per tensor, in file order): the
        bytes to put at `table_at`, as long as the placeholders they replace."""
        return (self.layout.table % tuple(crcs)).encode()

    def with_checksums(self, crcs: Sequence[int]) -> bytes:
        """`head` with ``crcs`` in place of the placeholders."""
        table = self.checksum_table(crcs)
        return self.head[: self.table_at] + table + self.head[self.table_at + len(table) :]

    def aligned(self, alignment: int) -> HeaderImage:
        """This header padded with spaces so the data after it starts at a multiple of
        ``alignment`` (a direct write's block): trailing JSON whitespace, which every
        safetensors reader skips, as it skips safetensors' own padding to 8 bytes."""
        pad = -len(self.head) % alignment
        if not pad:
            return self
        size = len(self.head) - 8 + pad
        head = struct.pack("<Q", size) + self.head[8:] + b" " * pad
        return HeaderImage(head, self.table_at, self.layout)


def _header(layout: _LayoutText, meta: Mapping[str, str]) -> HeaderImage:
    """The header for ``layout`` and ``__metadata__`` ``meta`` (without the checksum table,
    which goes last in it), padded so the data starts 8-byte aligned as safetensors does."""
    own = {k: v for k, v in meta.items() if k != CHECKSUMS_KEY}
    pairs = json.dumps(own, separators=(",", ":"), ensure_ascii=False)[1:-1]
    before = (
        '{"__metadata__":{' + (pairs + "," if pairs else "") + f'"{CHECKSUMS_KEY}":"'
    ).encode()
    size = len(before) + len(layout.placeholder) + 2 + len(layout.entries) + 1
    pad = -size % 8
    head = b"".join(
        (struct.pack("<Q", size + pad), before, layout.placeholder, b'"}', layout.entries, b"}")
    )
    return HeaderImage(head + b" " * pad, 8 + len(before), layout)


@dataclass(frozen=True)
class FileImage:
    """Everything needed to write one safetensors file, in file order: the header with
    placeholder checksums, then each tensor's bytes and the seed of its CRC32C."""

    header: HeaderImage
    names: tuple[str, ...]
    #: Each tensor's C-contiguous host array (any buffer: crc32c and writev take them as
    #: they are), its byte size, and the CRC its checksum starts from.
    buffers: list[Any]
    sizes: tuple[int, ...]
    seeds: list[int]
    #: Per tensor, what to call once its bytes are written (`HostTensor.written`), or
    #: ``None`` when no tensor has such a callback.
    written: list[Callable[[], None] | None] | None = None
    #: Per tensor, what to call before reading its bytes (`HostTensor.ready`), or ``None``
    #: when every tensor is in memory already.
    ready: list[Callable[[], None] | None] | None = None

    @property
    def nbytes(self) -> int:
        return len(self.header.head) + sum(self.sizes)


def flat_bytes(data: Any) -> memoryview:
    """A C-contiguous array's bytes as a flat memoryview (``len`` is its size), no copy."""
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError):  # ml_dtypes arrays export no buffer format
        return data.reshape(-1).view(np.uint8).data


_CODE = operator.attrgetter("dtype.code")
_ITEMSIZE = operator.attrgetter("dtype.itemsize")
_SHAPE = operator.attrgetter("data.shape")
_DATA = operator.attrgetter("data")
_NBYTES = operator.attrgetter("data.nbytes")
_WRITTEN = operator.attrgetter("written")
_READY = operator.attrgetter("ready")


@functools.lru_cache(maxsize=32)
def _file_order(names: tuple[str, ...], itemsizes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The tensors' order in the file, as safetensors orders them: by item size, larger
    first (so every tensor stays aligned), then by name; None if that is the order given.
    Cached with the layout text: sorting 20,000 names is the costliest step of a header."""
    order = sorted(range(len(names)), key=lambda i: (-itemsizes[i], names[i]))
    return None if order == list(range(len(names))) else tuple(order)


def file_image(specs: Mapping[str, HostTensor], metadata: Mapping[str, str]) -> FileImage:
    """The `FileImage` of the host tensors ``specs`` with ``__metadata__`` ``metadata``.

    Per tensor this is a few C-level attribute reads: the order and the header text come
    from caches (`_file_order`, `_layout_text`).
    """
    names = tuple(specs)
    values = list(specs.values())
    order = _file_order(names, tuple(map(_ITEMSIZE, values)))
    if order is not None:
        names = tuple(names[i] for i in order)
        values = [values[i] for i in order]
    codes, shapes = tuple(map(_CODE, values)), tuple(map(_SHAPE, values))
    sizes = tuple(map(_NBYTES, values))
    written = list(map(_WRITTEN, values))
    ready = list(map(_READY, values))
    return FileImage(
        _header(_layout_text((names, codes, shapes, sizes)), metadata),
        names,
        list(map(_DATA, values)),
        sizes,
        list(map(checksum_seed, codes, shapes)),
        written if any(written) else None,
        ready if any(ready) else None,
    )


def file_order(names: tuple[str, ...], itemsizes: tuple[int, ...]) -> tuple[int, ...]:
    """The indices of ``names`` in the order `file_image` writes them (the order a save
    within a staging budget needs: it stages the tensors written last)."""
    order = _file_order(names, itemsizes)
    return tuple(range(len(names))) if order is None else order


def crc32c_function() -> Callable[[Any, int], int]:
    """crc32c's ``crc32c(buffer, start)``: any C-contiguous buffer; releases the GIL on
    large ones."""
    return _crc32c()


def write_file(
    path: Path,
    tensors: Mapping[str, HostTensor],
    metadata: Mapping[str, str] | None = None,
    *,
    borrowed: bool = False,
) -> None:
    """Write ``tensors`` to a safetensors file at ``path`` and fsync it.

    The file is one `FileSystem.write_safetensors` step (the durability tests record and
    replay those steps): the header goes first, then each tensor's bytes are streamed
    from the host buffers, which ``tensors`` keeps alive, each chunk checksummed while it
    is in cache; the CRC32Cs land in the header's placeholders last.

    Args:
        borrowed: the buffers are the caller's own arrays (a synchronous, zero-copy save),
            which another thread may change while they are checksummed and written. The
            file is then read back and checksummed; if its bytes are not those its
            checksums were taken of, it is written again from a private copy. Either way
            the checksums recorded are those of the bytes in the file.
    """
    check_writable(
        str(path), [(name, t.dtype, t.data.shape) for name, t in tensors.items()], metadata
    )
    meta = _stamped(metadata)
    fs = fsops.fs()
    # True where a private copy was checksummed and written (a direct write of borrowed
    # buffers): then there is nothing to read back.
    consistent = fs.write_safetensors(path, tensors, meta, borrowed=borrowed)
    if borrowed and not consistent and not _file_consistent(path):
        log.warning(
            "%s: tensors changed while they were being saved; writing a copy instead "
            "(synchronous saves read the arrays in place: stop changing them during the "
            "save, or use AsyncCheckpointer, which snapshots them first)",
            path,
        )
        fs.remove_file(path)
        tensors = {
            name: HostTensor(np.array(t.data, copy=True), t.dtype) for name, t in tensors.items()
        }
        fs.write_safetensors(path, tensors, meta)
    fs.fsync_file(path)
    # The written callbacks (see `HostTensor.written`) normally run as the bytes go out;
    # a file system that writes differently (the durability tests') still releases them.
    for tensor in tensors.values():
        if tensor.written is not None:
            tensor.written()


def _file_consistent(path: Path) -> bool:
    """Whether the tensors in the file at ``path`` match the checksums its header records
    (read back from the page cache, just written)."""
    try:
        reader = SafetensorsReader(path)
    except CheckpointReadError as exc:
        if isinstance(exc.__cause__, OSError):  # an I/O error of the save, as when writing
            raise exc.__cause__ from None
        raise
    entries = list(reader.header.entries.values())
    items = [(reader.raw(e.name), checksum_seed(e.dtype.code, e.shape)) for e in entries]
    sums = _checksums_parallel(items, [e.end - e.start for e in entries])
    return dict(zip(reader.header.entries, sums, strict=True)) == reader.header.checksums


@dataclass(slots=True)
class Entry:
    """One tensor's header entry, validated. Offsets are relative to the file start.

    Slotted: a header may list a million tensors, and each entry's memory counts.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]
    #: Recorded CRC32C by tensor name; ``None`` for another tool's file (nothing to verify).
    checksums: dict[str, int] | None
    data_start: int
    #: Why the checksum table cannot vouch for the file (damaged, or lists other tensors
    #: than the file): raised by verification only, so ``verify=False`` still loads.
    checksum_problem: str | None = None


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


def _entries_hook(data_start: int) -> Callable[[list[tuple[str, Any]]], Any]:
    """``object_pairs_hook`` turning each well-formed tensor entry into an `Entry` at once.

    The JSON parser then never holds a header's worth of per-entry dicts and lists (a
    99 MB header cost 2.6 GB that way). Anything unusual stays a dict, for `_parse_entry`
    to report with the tensor's name.
    """

    def hook(pairs: list[tuple[str, Any]]) -> Any:
        if len(pairs) == 3:
            (k0, v0), (k1, v1), (k2, v2) = pairs
            entry = None
            if k0 == "dtype" and k1 == "shape" and k2 == "data_offsets":  # as writers order them
                entry = _fast_entry(v0, v1, v2, data_start)
            elif {k0, k1, k2} == _ENTRY_FIELDS:
                fields = dict(pairs)
                entry = _fast_entry(
                    fields["dtype"], fields["shape"], fields["data_offsets"], data_start
                )
            if entry is not None:
                return entry
        return unique_keys(pairs)

    return hook


@functools.lru_cache(maxsize=4096)
def _entry_layout(code: str, shape: tuple[int, ...]) -> tuple[DType, int | None]:
    """A tensor's dtype and byte size, cached: headers repeat a few shapes many times."""
    dtype = BY_CODE.get(code) or dtypes.unknown(code)
    return dtype, dtype.nbytes(shape)


def _fast_entry(code: Any, shape: Any, offsets: Any, data_start: int) -> Entry | None:
    # `type() is`, not isinstance: a bool is an int, and `true` is no dimension
    if type(code) is not str or type(shape) is not list or type(offsets) is not list:
        return None
    if len(offsets) != 2:
        return None
    for d in shape:
        if type(d) is not int or d < 0:
            return None
    start, end = offsets
    if type(start) is not int or type(end) is not int or not 0 <= start <= end:
        return None
    dims = tuple(shape)
    dtype, nbytes = _entry_layout(code, dims)
    if dtype.known and nbytes != end - start:
        return None
    return Entry("", dtype, dims, start + data_start, end + data_start)


def parse_header(path: Path, prefix: bytes | bytearray, file_size: int) -> Header:
    """Validate a safetensors header before anything is allocated for its tensors.

    ``prefix`` holds at least the first ``8 + header length`` bytes of the file.
    Stricter than the safetensors library: duplicate keys, unknown fields, holes,
    trailing bytes and non-UTF-8 names are all rejected. A dtype code this build does
    not know is accepted here and refused only when that tensor is read (`array`).

    Headers in the compact form arrayckpt and safetensors write take a faster path
    (`_parse_compact`) that accepts exactly what the general one does; any other header,
    and every malformed one, is parsed (and its problem reported) by the general path.
    """
    if file_size < 8:
        _fail(path, f"file is {file_size} bytes, shorter than the 8-byte header length")
    n = header_length(path, prefix[:8], file_size)
    if len(prefix) < 8 + n:
        _fail(path, f"header length {n} runs past the end of the {len(prefix)} bytes read")
    # Count entries before parsing, so a header of millions of tiny entries allocates nothing.
    count = prefix.count(b'"data_offsets"', 8, 8 + n)
    if count > limits.MAX_TENSORS:
        _fail(path, f"header declares more than {limits.MAX_TENSORS} tensors")
    # The collector scanned the header's new objects: 45 % of parsing W2's 20,000 entries.
    with collector.paused():
        return _parse_text(path, prefix, count, 8 + n, file_size)


def _parse_text(
    path: Path, prefix: bytes | bytearray, count: int, data_start: int, file_size: int
) -> Header:
    try:
        text = str(memoryview(prefix)[8:data_start], "utf-8")  # decoded without a copy
    except UnicodeDecodeError as exc:
        _fail(path, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    compact = _parse_compact(path, text, count, data_start, file_size)
    if compact is not None:
        return compact
    hooks: dict[str, Any] = {}
    # Without a minus sign anywhere no number can be negative, and the parser need not hand
    # each integer to `_strict_int` (W2's header: 60,000 of them).
    if prefix.find(b"-", 8, data_start) != -1:
        hooks["parse_int"] = _strict_int
    try:
        top = json.loads(
            text,
            object_pairs_hook=_entries_hook(data_start),
            parse_constant=reject_constant,
            parse_float=_reject_float,
            **hooks,
        )
    except RecursionError:
        _fail(path, "header JSON is nested too deeply")
    except ValueError as exc:
        _fail(path, f"header is not valid JSON: {exc}")
    del text
    if not isinstance(top, dict):
        _fail(path, f"header must be a JSON object, not {type(top).__name__}")
    metadata = _parse_metadata(path, top.pop("__metadata__", {}))
    if len(top) > limits.MAX_TENSORS:  # the byte count above misses keys spelled with escapes
        _fail(path, f"header declares more than {limits.MAX_TENSORS} tensors")
    # `top` becomes the entries map in place: no second map of a million entries.
    names_ok = _names_valid(top)
    for name, raw_entry in top.items():
        if type(raw_entry) is Entry:
            if not names_ok:
                _check_name(path, name)
            raw_entry.name = name
        else:
            top[name] = _parse_entry(path, name, raw_entry, data_start)
    entries: dict[str, Entry] = top
    _check_coverage(path, entries.values(), data_start, file_size)
    sums, problem = _parse_checksums(path, metadata, entries)
    return Header(entries, metadata, sums, data_start, problem)


# ------------------------------------------------------------- compact headers, fast
#
# arrayckpt and safetensors write headers without whitespace, each entry's fields in one
# order: `{"__metadata__":{...},"name":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},...}`.
# Such a header is cut apart by one regular expression per megabyte of text and its
# entries built column by column (C-level passes over lists), instead of by the JSON
# parser calling back into Python for each of them: W2's 20,000 entries went from 5.8 us
# to 2.1-2.8 us each, 0.4 us when the layout is cached (`_ParsedLayout`), on a shared
# 2-core machine. What the expression does not match exactly (a name with an escape,
# a leading zero, a space, an unknown field, an error of any kind) goes to the general
# parser, which then reports it: both accept the same headers, with the same result.

#: A header number as the writers spell it: no sign, no leading zero, at most 20 digits.
_NUM = r"(?:0|[1-9][0-9]{0,19})"
#: One compact entry with the comma before it. Groups: the name (holding no quote,
#: backslash or control character: JSON would escape those), its kind (dtype code and
#: dims: `F32","shape":[2,3`, one string, as tensors repeat a few kinds), the offsets.
#: The kind is matched loosely here and exactly (`_COMPACT_KIND`) once per distinct kind:
#: the exact form's nested repetition took half of this expression's time on W2's header.
_COMPACT_ENTRY = re.compile(
    r',"([^"\\\x00-\x1f]+)":\{"dtype":"([A-Z0-9_]+","shape":\[[0-9,]*)\],"data_offsets":\[('
    + _NUM
    + r"),("
    + _NUM
    + r")\]\}"
)
#: A kind (`_COMPACT_ENTRY`'s second group) as the writers spell it.
_COMPACT_KIND = re.compile(r'[A-Z0-9_]{1,32}","shape":\[(?:' + _NUM + r"(?:," + _NUM + r")*)?")
_KIND_DIMS = len(',"shape":[')  # where a kind's dims start, after its code and quote
_GROUPS = _COMPACT_ENTRY.groups + 1  # items per entry in `re.split`'s list
_META_OPEN = '{"__metadata__":'
_JSON_SPACE = " \t\n\r"  # what JSON allows after a document: writers pad with spaces
#: Header text cut apart at a time: bounds the temporary strings of a huge header.
_COMPACT_CHUNK = 1 << 20
_metadata_decoder = json.JSONDecoder(
    object_pairs_hook=unique_keys,
    parse_constant=reject_constant,
    parse_float=_reject_float,
    parse_int=_strict_int,
)
_FIRST, _SECOND, _THIRD = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)


class _ParsedLayout:
    """The parsed entries of one compact header's tensor part, shared by every header
    with the same text, data start and file size (saves of one model, repeated loads).

    Its `Entry` objects are shared by those headers' entry maps: nothing changes them.
    """

    __slots__ = ("_table", "entries")

    def __init__(self, entries: dict[str, Entry]) -> None:
        self.entries = entries
        self._table: tuple[np.ndarray, np.ndarray] | None = None

    def checksums(self, text: str) -> dict[str, int] | None:
        """The CRCs of a checksum table ``text`` written for these entries, in their order
        (`_layout_text`'s form: ``{"name":"<8 hex digits>",...}``); ``None`` for a table
        of any other form, which `_parse_checksums` then reads."""
        if not self.entries:
            return {} if text == "{}" else None
        if self._table is None:
            # the table with NULs for its digits (no name holds a NUL), and where they are
            hole = '":"' + "\x00" * 8
            joined = ('{"' + (hole + '","').join(self.entries) + hole + '"}').encode()
            skeleton = np.frombuffer(joined, np.uint8)
            self._table = skeleton, np.flatnonzero(skeleton == 0)
        skeleton, at = self._table
        data = np.frombuffer(text.encode(), np.uint8)
        if data.shape != skeleton.shape:
            return None
        digits = _HEX_VALUE[data[at]]
        blanked = data.copy()
        blanked[at] = 0
        if not np.array_equal(blanked, skeleton) or (digits > 15).any():
            return None
        pairs = digits.reshape(-1, 2)
        crcs = ((pairs[:, 0] << 4) | pairs[:, 1]).view(">u4")
        return dict(zip(self.entries, crcs.tolist(), strict=True))


#: Each byte's value as a hex digit (either case, as `int(x, 16)` reads it), 255 if none.
_HEX_VALUE = np.full(256, 255, np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_VALUE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)

_parsed_layouts: dict[tuple[str, int, int], _ParsedLayout] = {}  # insertion order: oldest first
_parsed_lock = threading.Lock()
#: Entries the layout cache holds at most (in all its layouts: some 40 MB of entries and
#: their text at most, ~0.3 KB each), and layouts. A larger header is parsed each time.
_LAYOUT_CACHE_ENTRIES = 1 << 17
_LAYOUT_CACHE_SIZE = 16


def _parse_compact(
    path: Path, text: str, count: int, data_start: int, file_size: int
) -> Header | None:
    """`parse_header` of a compact header of ``count`` entries; ``None`` for any other
    header, or a malformed one."""
    meta: Any = {}
    at = 0  # where the entries start: after the metadata, or after the opening brace
    if text.startswith(_META_OPEN):
        try:
            meta, at = _metadata_decoder.raw_decode(text, len(_META_OPEN))
        except (ValueError, RecursionError):
            return None
        if (
            type(meta) is not dict
            or len(meta) > limits.MAX_METADATA_ENTRIES
            or not all(type(v) is str for v in meta.values())
        ):
            return None
    elif not text.startswith("{"):
        return None
    end = _json_end(text)
    if end <= at or text[end - 1] != "}":
        return None
    end -= 1  # the closing brace
    key = None
    if count <= _LAYOUT_CACHE_ENTRIES:  # small enough to keep: look it up by its text
        key = (text[at:end], data_start, file_size)
        layout = _parsed_layouts.get(key)
        if layout is not None:
            return _compact_header(path, dict(layout.entries), meta, data_start, layout)
    entries = _compact_entries(path, text, at, end, data_start, file_size)
    if entries is None:
        return None
    layout = _ParsedLayout(entries)
    if key is None:
        return _compact_header(path, entries, meta, data_start, layout)
    _remember(key, layout)
    return _compact_header(path, dict(entries), meta, data_start, layout)


def _json_end(text: str) -> int:
    """Where ``text`` ends without the whitespace after it (padding of any length)."""
    end = len(text)
    while end:
        tail = text[max(0, end - 4096) : end]
        kept = tail.rstrip(_JSON_SPACE)
        end -= len(tail) - len(kept)
        if kept:
            break
    return end


def _compact_header(
    path: Path,
    entries: dict[str, Entry],
    meta: dict[str, str],
    data_start: int,
    layout: _ParsedLayout,
) -> Header:
    table = meta.get(CHECKSUMS_KEY)
    sums = None if table is None else layout.checksums(table)
    if sums is not None:
        return Header(entries, meta, sums, data_start, None)
    sums, problem = _parse_checksums(path, meta, entries)
    return Header(entries, meta, sums, data_start, problem)


def forget_parsed_layouts() -> None:
    """Empty the layout cache: the next header of every layout is parsed cold (how the
    benchmarks time a first load, and the tests reach the cold path)."""
    with _parsed_lock:
        _parsed_layouts.clear()


def _remember(key: tuple[str, int, int], layout: _ParsedLayout) -> None:
    """Keep ``layout`` for the next header of the same text, the oldest going first."""
    with _parsed_lock:
        _parsed_layouts[key] = layout
        total = sum(len(v.entries) for v in _parsed_layouts.values())
        while total > _LAYOUT_CACHE_ENTRIES or len(_parsed_layouts) > _LAYOUT_CACHE_SIZE:
            total -= len(_parsed_layouts.pop(next(iter(_parsed_layouts))).entries)


def _compact_entries(
    path: Path, text: str, at: int, end: int, data_start: int, file_size: int
) -> dict[str, Entry] | None:
    """The entries in ``text[at:end]`` (compact entries, each after a comma; the first
    after the header's opening brace when ``at`` is 0), validated as `_fast_entry` and
    `_check_coverage` do; ``None`` where anything differs from the compact form or is
    wrong (the general parser then reports it)."""
    names: list[str] = []
    kinds: list[tuple[DType, tuple[int, ...], int | None]] = []
    starts: list[int] = []
    ends: list[int] = []
    by_text: dict[str, tuple[DType, tuple[int, ...], int | None]] = {}
    pos = at
    while pos < end:
        # cut after an entry: `},"` occurs only there (a name holds no quote)
        cut = text.find('},"', pos + _COMPACT_CHUNK, end) + 1 if end - pos > _COMPACT_CHUNK else 0
        if cut <= 0:
            cut = end
        piece = text[pos:cut]
        if pos == 0:  # the header's opening brace, where the first entry has no comma
            piece = "," + piece[1:] if piece[1:2] == '"' else piece
        parts = _COMPACT_ENTRY.split(piece)
        if any(parts[::_GROUPS]):  # text between, before or after the entries
            return None
        names += parts[1::_GROUPS]
        kind_texts = parts[2::_GROUPS]
        for kind in set(kind_texts).difference(by_text):
            if _COMPACT_KIND.fullmatch(kind) is None:
                return None
            code, _, rest = kind.partition('"')
            dims = rest[_KIND_DIMS:]
            shape = tuple(map(int, dims.split(","))) if dims else ()
            dtype, nbytes = _entry_layout(code, shape)
            if dtype.known and nbytes is None:  # packed, off a byte boundary
                return None
            by_text[kind] = (dtype, shape, nbytes if dtype.known else None)
        kinds += map(by_text.__getitem__, kind_texts)
        first, last = parts[3::_GROUPS], parts[4::_GROUPS]
        offsets = list(map(int, first))
        starts += offsets
        # Written in order, each tensor ends where the next starts: the same text (no
        # leading zeros), so the same int; parse the ends only when they differ.
        if first[1:] == last[:-1]:
            del offsets[0]
            offsets.append(int(last[-1]))
            ends += offsets
        else:
            ends += map(int, last)
        pos = cut
    sizes = list(map(operator.sub, ends, starts))
    if sizes != list(map(_THIRD, kinds)) and not all(
        s == k[2] or (k[2] is None and s >= 0) for s, k in zip(sizes, kinds, strict=True)
    ):
        return None  # a size that does not match its shape, or reversed offsets
    del sizes
    contiguous = starts[1:] == ends[:-1]
    begin = list(map(data_start.__add__, starts))
    if contiguous and starts:  # each end is the next start: the same int objects
        finish = begin[1:]
        finish.append(data_start + ends[-1])
    else:
        finish = list(map(data_start.__add__, ends))
    entries = dict(
        zip(
            names,
            map(Entry, names, map(_FIRST, kinds), map(_SECOND, kinds), begin, finish),
            strict=True,
        )
    )
    if len(entries) != len(names) or "__metadata__" in entries:
        return None  # a duplicate name
    in_order = (
        starts[0] == 0 and ends[-1] == file_size - data_start and contiguous
        if starts
        else file_size == data_start
    )
    if not in_order:  # raises on a hole, an overlap or trailing bytes
        _check_coverage(path, entries.values(), data_start, file_size)
    return entries


def header_length(path: Path, head: bytes | bytearray, file_size: int) -> int:
    """The header length the first 8 bytes declare, checked against the cap and the file."""
    (n,) = struct.unpack("<Q", head)
    if n > limits.MAX_HEADER_BYTES:
        _fail(path, f"header length {n} exceeds the {limits.MAX_HEADER_BYTES}-byte cap")
    if n > file_size - 8:
        _fail(path, f"header length {n} runs past the end of the {file_size}-byte file")
    return int(n)


def read_header(path: Path, fd: int | None = None) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (or open ``fd``).

    Sizes come first: the 8-byte length is checked against the cap and the file's size
    before the header itself is read, and nothing past the header is read.
    """
    own = fd is None
    fd = fsops.fs().open_regular(path) if fd is None else fd
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
        head = bytearray(8)
        fs = fsops.fs()
        fs.read_into(fd, path, [(0, 8)], memoryview(head))
        prefix = bytearray(8 + header_length(path, head, size))
        prefix[:8] = head
        fs.read_into(fd, path, [(8, len(prefix) - 8)], memoryview(prefix)[8:])
    except EOFError as exc:
        _fail(path, f"file shrank while its header was read ({exc})")
    except OSError as exc:
        raise fsops.read_error(path, exc) from exc
    finally:
        if own:
            os.close(fd)
    return parse_header(path, prefix, size)


def _parse_metadata(path: Path, meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail(path, "__metadata__ must map strings to strings")
    if len(meta) > limits.MAX_METADATA_ENTRIES:
        _fail(path, f"__metadata__ has more than {limits.MAX_METADATA_ENTRIES} entries")
    return meta


def _names_valid(names: Mapping[str, Any]) -> bool:
    """Whether every key of ``names`` passes `_check_name`, checked over all at once (the
    per-name check then runs only to find and name a bad one)."""
    if "" in names:
        return False
    joined = "".join(names)
    if "\x00" in joined:
        return False
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(path: Path, name: str) -> None:
    where = f"tensor {name!r}"
    if not name or "\x00" in name:
        _fail(path, f"{where}: tensor names must be non-empty and contain no NUL")
    try:  # JSON escapes can spell a lone surrogate, which no UTF-8 reader accepts
        name.encode("utf-8")
    except UnicodeEncodeError:
        _fail(path, f"{where}: tensor name holds a lone surrogate (not valid UTF-8)")


def _parse_entry(path: Path, name: str, entry: Any, data_start: int) -> Entry:
    where = f"tensor {name!r}"
    _check_name(path, name)
    if not isinstance(entry, dict):
        _fail(path, f"{where}: entry must be an object")
    if set(entry) != _ENTRY_FIELDS:
        extra = sorted(set(entry) - _ENTRY_FIELDS)
        missing = sorted(_ENTRY_FIELDS - set(entry))
        _fail(path, f"{where}: unknown fields {extra}, missing fields {missing}")
    code = entry["dtype"]
    if not isinstance(code, str):
        _fail(path, f"{where}: unknown dtype {code!r} (a dtype must be a string)")
    dtype = BY_CODE.get(code) or dtypes.unknown(code)
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        _fail(path, f"{where}: shape {shape!r} must be a list of non-negative integers")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        _fail(path, f"{where}: data_offsets {offsets!r} must be two non-negative integers")
    start, end = offsets
    if start > end:
        _fail(path, f"{where}: data_offsets {offsets} are reversed")
    expected = dtype.nbytes(tuple(shape))
    if expected is None and dtype.known:
        _fail(path, f"{where}: shape {shape} of {code} does not end on a byte boundary")
    if dtype.known and end - start != expected:
        _fail(
            path,
            f"{where}: shape {shape} of {code} needs {expected} bytes but data_offsets "
            f"span {end - start}",
        )
    return Entry(name, dtype, tuple(shape), start + data_start, end + data_start)


def _check_coverage(path: Path, entries: Iterable[Entry], data_start: int, size: int) -> None:
    ordered = list(entries)
    # Files are usually written in offset order: sort (a second list of keys) only if not.
    if any(
        a.start > b.start or (a.start == b.start and a.end > b.end)
        for a, b in itertools.pairwise(ordered)
    ):
        ordered.sort(key=lambda e: (e.start, e.end))
    cursor = data_start
    for e in ordered:
        if e.start < cursor:
            _fail(path, f"tensor {e.name!r}: data_offsets overlap the previous tensor")
        if e.start > cursor:
            _fail(path, f"tensor {e.name!r}: {e.start - cursor} unused bytes before its data")
        cursor = e.end
    if cursor > size:
        _fail(
            path,
            f"tensor data ends at {cursor - data_start} but the file holds only "
            f"{size - data_start} data bytes",
        )
    if cursor < size:
        _fail(path, f"{size - cursor} trailing bytes after the last tensor")


def _crc_pairs(pairs: list[tuple[str, Any]]) -> dict[str, int]:
    # Straight to ints: a million-entry table never exists as hex strings too.
    out: dict[str, int] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = int(value, 16)
    return out


def _parse_checksums(
    path: Path, metadata: Mapping[str, str], entries: Mapping[str, Entry]
) -> tuple[dict[str, int] | None, str | None]:
    """The recorded checksums, and why they cannot vouch for the file (if they cannot)."""
    text = metadata.get(CHECKSUMS_KEY)
    if text is None:
        if any(key.startswith(_OWN_PREFIX) for key in metadata):
            # arrayckpt always writes the table: without it, it was damaged or removed.
            return None, f"__metadata__ is arrayckpt's but lacks its {CHECKSUMS_KEY!r} table"
        return None, None  # written by another tool: nothing to verify
    try:
        parsed = json.loads(text, object_pairs_hook=_crc_pairs)
        if not isinstance(parsed, dict):
            raise TypeError("not a map")
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None, f"__metadata__[{CHECKSUMS_KEY!r}] is not a map of tensor names to hex CRCs"
    if parsed.keys() != entries.keys():
        return parsed, f"__metadata__[{CHECKSUMS_KEY!r}] does not list exactly the file's tensors"
    return parsed, None


def verify_bytes(path: Path, header: Header, name: str, data: Any, crc: int | None = None) -> None:
    """Check tensor ``name``'s bytes ``data`` (or their CRC32C ``crc``, computed while
    reading) against the CRC32C recorded in ``header``.

    A no-op for another tool's file (no table). Every reader verifies through this.

    Raises:
        CorruptCheckpointError: the bytes or the checksum table are damaged.
    """
    sums = header.checksums
    if sums is None and header.checksum_problem is None:
        return
    hint = "restore another checkpoint (or load with verify=False to inspect it)"
    if sums is None or header.checksum_problem is not None:
        _fail(path, f"tensor {name!r} cannot be verified: {header.checksum_problem}; {hint}")
    e = header.entries[name]
    if crc is None:
        crc = tensor_checksum(e.dtype.code, e.shape, data)
    if crc != sums[name]:
        _fail(path, f"tensor {name!r} fails its CRC32C checksum: the file is corrupt; {hint}")


def _unreadable(path: Path, name: str, problem: str) -> NoReturn:
    others = "load the other tensors with keys=[...] (they are unaffected)"
    raise UnsupportedArrayError(f"{path}: tensor {name!r}: {problem}; {others}")


#: Eager reads go in pieces of this size, spread across threads; each piece's checksums
#: are computed right after it is read, while its bytes are still in cache.
_READ_CHUNK = 4 << 20

#: CRC32C's polynomial, bit-reflected (crc32c and this module's combination agree).
_CRC32C_POLY = 0x82F63B78


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo CRC32C's polynomial, reflected (zlib's ``multmodp``); ``a != 0``."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1


@functools.cache
def _x2n_table() -> tuple[int, ...]:
    """``x^(2^k)`` modulo the polynomial for k = 0..31."""
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return tuple(table)


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32C of ``A + B`` from ``crc1`` (that of A, or of what A continues) and
    ``crc2`` (that of B alone, from 0), ``len2`` being B's length in bytes.

    Lets threads checksum pieces of one tensor at once (zlib's ``crc32_combine``).
    """
    return _multmodp(_crc_shift(len2), crc1) ^ crc2


@functools.lru_cache(maxsize=256)
def _crc_shift(n: int) -> int:
    """``x^(8n)`` modulo the polynomial: what appending ``n`` bytes multiplies a CRC by.

    Cached: an eager read combines parts of whole pieces (`_READ_CHUNK` bytes) and the
    last parts of tensors, which repeat one length per tensor shape; each new length
    costs tens of microseconds in Python.
    """
    table = _x2n_table()
    p, k = 1 << 31, 3  # x^0; n bytes are 8n bits: start at x^(2^3)
    while n:
        if n & 1:
            p = _multmodp(table[k & 31], p)
        n >>= 1
        k += 1
    return p


#: One piece of an eager read: its file range, and the part of each tensor it holds
#: (name, start, end, the CRC its checksum continues from, whether it is the whole tensor).
_Piece = tuple[int, int, list[tuple[str, int, int, int, bool]]]


def _plan_pieces(entries: Iterable[Entry], start: int, size: int, step: int) -> list[_Piece]:
    """Cut the data bytes ``[start, size)`` into pieces of at most ``step`` bytes, and each
    tensor (``entries`` in file order, covering the range, or none) into its parts in them.

    Small tensors share pieces; a larger one is cut from its own start, so its parts are
    whole steps and one rest, whose lengths repeat from tensor to tensor (their CRCs'
    `crc32c_combine` then costs a cached shift: `_crc_shift`).
    """
    pieces: list[_Piece] = []
    lo = start  # the piece being filled: where it starts, and its parts
    parts: list[tuple[str, int, int, int, bool]] = []
    for e in entries:
        seed = checksum_seed(e.dtype.code, e.shape)
        if e.end - lo <= step:  # fits in the piece being filled
            parts.append((e.name, e.start, e.end, seed, True))
            continue
        if parts:  # the piece so far ends where this tensor starts
            pieces.append((lo, e.start, parts))
            lo, parts = e.start, []
        at = e.start
        while e.end - at > step:  # its whole steps, from its own start
            pieces.append(
                (at, at + step, [(e.name, at, at + step, seed if at == e.start else 0, False)])
            )
            at += step
        lo, parts = (
            at,
            [(e.name, at, e.end, 0, False)] if at > e.start else [(e.name, at, e.end, seed, True)],
        )
    if parts:
        pieces.append((lo, size, parts))
    elif not pieces:  # no tensors to checksum: plain steps
        bounds = [*range(start, size, step), size] if size > start else [start, size]
        pieces = [(a, b, []) for a, b in itertools.pairwise(bounds)]
    return pieces


#: The kernel copies a file's cached pages into a read buffer fastest when both are at
#: the same offset within a page.
_PAGE = mmap_module.PAGESIZE
_ALIGNED_MIN = 1 << 20


def _empty_like_file(nbytes: int, offset: int) -> np.ndarray:
    """An uninitialised byte buffer for the file bytes at ``offset``, placed so that its
    address and ``offset`` agree modulo the page size.

    NumPy's own buffers start 16 bytes into a page; read into them, the data of a file
    written 4096-aligned (direct writes) came 25-35 % slower than into a buffer aligned as
    the file is (W1: 156 vs 116 ms for 512 MiB). Each tensor then also sits as aligned in
    memory as in the file. Costs one page more: only for buffers of `_ALIGNED_MIN` bytes
    or more (a lazy load of 4 KiB tensors would double its memory).
    """
    if nbytes < _ALIGNED_MIN:
        return np.empty(nbytes, np.uint8)
    raw = np.empty(nbytes + _PAGE, np.uint8)
    skip = (offset - raw.ctypes.data) % _PAGE
    return raw[skip : skip + nbytes]


class SafetensorsReader:
    """An open, validated safetensors file; arrays are views into its mapping.

    Only the header is read when it opens (sizes first, see `read_header`). With
    ``mmap=True`` (the default, best on local disks) the file is mapped copy-on-write:
    arrays are zero-copy, writable, and writes never reach the file; where the whole file
    cannot be mapped (larger than memory + swap, or an address-space limit) each tensor
    is mapped on its own when it is read. With ``mmap=False`` the tensor data is read in
    one parallel pass into one buffer the arrays view (best on network file systems);
    ``verify_while_reading`` checksums it during that pass, so `verify` is free later. With
    ``ranges=True`` each tensor's byte range is read, the same way, when it is asked for
    (for loading a few tensors of a large file eagerly, or into arrays that exist: see
    `read_into`), so memory holds only the tensors asked for.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        ranges: bool = False,
        verify_while_reading: bool = False,
    ) -> None:
        self._start(Path(path))
        self._verify_while_reading = verify_while_reading
        fd = fsops.fs().open_regular(self.path)
        try:
            self.header = read_header(self.path, fd)
            if ranges:
                return
            if mmap:
                self._map(fd)
            else:
                self._read_data(fd, verify_while_reading)
        finally:
            if self._fd != fd:
                os.close(fd)

    @classmethod
    def fetched(
        cls,
        path: Path,
        header: Header,
        computed: dict[str, int],
        *,
        buf: np.ndarray | None = None,
        base: int = 0,
        pending: dict[str, np.ndarray] | None = None,
    ) -> SafetensorsReader:
        """A reader over bytes fetched from elsewhere (an object store) with ``header``
        parsed by `parse_header`: all tensor data in ``buf`` (file offset ``base``), or
        some tensors' bytes each on its own in ``pending``. ``computed``: the CRC32Cs taken
        while fetching, by tensor name."""
        self = cls.__new__(cls)
        self._start(path)
        self.header = header
        self._computed, self._pending = computed, dict(pending or {})
        self._buf, self._base = buf, base
        return self

    def _start(self, path: Path) -> None:
        """Every attribute a reader has, before its data is read (both constructors)."""
        self.path = path
        #: CRC32Cs computed while the data was read (``mmap=False``), by tensor name.
        self._computed: dict[str, int] = {}
        self._pending: dict[str, np.ndarray] = {}  # read ahead of array() (ranges, per-tensor maps)
        self._buf: Any = None  # the whole-file map, or the eager data buffer
        self._base = 0  # file offset of self._buf's first byte
        self._address: int | None = None  # self._buf's address in memory, once asked
        self._memview: memoryview | None = None
        self._fd: int | None = None  # kept only for per-tensor maps
        self._verify_while_reading = False  # checksum each read (`_read_parallel`)

    def _map(self, fd: int) -> None:
        try:
            self._buf = mmap_module.mmap(fd, 0, access=mmap_module.ACCESS_COPY)
        except OSError as exc:
            if exc.errno not in (errno.ENOMEM, errno.EOVERFLOW, errno.EAGAIN):
                raise fsops.read_error(self.path, exc) from exc
            # Copy-on-write maps count against memory + swap (or RLIMIT_AS) in full:
            # map each tensor when it is read instead, so the rest of the file stays usable.
            self._fd = fd
            weakref.finalize(self, os.close, fd)

    def _read_data(self, fd: int, checksum: bool) -> None:
        """Read all tensor data into one buffer the arrays will view (`_read_parallel`)."""
        start = self.header.data_start
        size = os.fstat(fd).st_size
        try:
            self._buf = _empty_like_file(size - start, start)
        except MemoryError as exc:
            raise CheckpointReadError(
                f"{self.path}: {size - start} bytes of tensor data do not fit in memory; "
                "load fewer tensors with keys=[...], or with mmap=True"
            ) from exc
        self._base = start
        entries = self.header.entries.values() if self._checksums(checksum) else ()
        self._read_parallel(fd, self._buf.data, start, size, entries)

    def _checksums(self, wanted: bool) -> bool:
        """Whether to checksum while reading: asked for, and the file has a usable table."""
        header = self.header
        return wanted and header.checksums is not None and header.checksum_problem is None

    def _read_parallel(
        self, fd: int, view: memoryview, start: int, end: int, entries: Iterable[Entry]
    ) -> None:
        """Read the file's bytes ``[start, end)`` into ``view``: pieces of `_READ_CHUNK`
        bytes read by the helper threads and this one at once (``preadv`` releases the
        GIL), each piece straight into its place. Each thread checksums a piece's parts of
        ``entries`` (tensors inside the range) right after reading it, so verification
        costs no second pass over cold memory; a tensor split across pieces gets its
        checksum from those of its parts (`crc32c_combine`). The checksums go to
        `_computed`."""
        fs, path, crc = fsops.fs(), self.path, _crc32c()
        if end - start <= _READ_CHUNK and len(entries := list(entries)) <= 1:
            # one piece (a small tensor read on its own): no threads to plan for
            try:
                fs.read_into(fd, path, [(start, end - start)], view)
            except EOFError:
                _fail(self.path, "file shrank while it was being read")
            except OSError as exc:
                raise fsops.read_error(self.path, exc) from exc
            for e in entries:
                part = view[e.start - start : e.end - start]
                self._computed[e.name] = crc(part, checksum_seed(e.dtype.code, e.shape))
            return
        ordered = sorted(entries, key=lambda e: e.start)
        pieces = _plan_pieces(ordered, start, end, _READ_CHUNK)
        claim = iter(range(len(pieces)))  # each piece read once, by whichever thread is free
        lock = threading.Condition()
        busy = [0]  # pieces being read now
        errors: list[BaseException] = []
        split: list[tuple[str, int, int, int]] = []  # parts of tensors split across pieces
        computed: dict[str, int] = {}

        def read_pieces() -> None:
            while True:
                with lock:
                    i = None if errors else next(claim, None)
                    if i is None:
                        return
                    busy[0] += 1
                try:
                    lo, hi, parts = pieces[i]
                    fs.read_into(fd, path, [(lo, hi - lo)], view[lo - start : hi - start])
                    for name, a, b, seed, whole in parts:
                        value = crc(view[a - start : b - start], seed)
                        if whole:
                            computed[name] = value
                        else:
                            split.append((name, a, b, value))
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                finally:
                    with lock:
                        busy[0] -= 1
                        lock.notify_all()

        helper = pool.executor()
        for _ in range(min(pool.threads(), len(pieces)) - 1):
            # Not waited for: a helper that starts late (its core busy with another
            # process) finds every piece taken and returns; only pieces being read are
            # waited for, so a busy machine costs no more than reading on this thread.
            helper.submit(read_pieces)
        try:
            try:
                read_pieces()
            except BaseException as exc:  # an interrupt: the helpers stop at their next piece
                with lock:
                    errors.append(exc)
                raise
            finally:
                with lock:
                    lock.wait_for(lambda: busy[0] == 0)  # nothing writes to `view` after this
            if errors:
                raise errors[0]
        except EOFError:
            _fail(self.path, "file shrank while it was being read")
        except OSError as exc:
            if isinstance(exc, CheckpointError):  # open_regular's, already explained
                raise
            raise fsops.read_error(self.path, exc) from exc
        split.sort(key=lambda part: part[1])  # file order: each tensor's parts in turn
        for name, a, b, value in split:
            got = computed.get(name)
            computed[name] = value if got is None else crc32c_combine(got, value, b - a)
        self._computed.update(computed)

    @property
    def names(self) -> list[str]:
        return list(self.header.entries)

    def _bytes(self, name: str) -> np.ndarray:
        """Tensor ``name``'s bytes as a flat ``uint8`` array: a view, or its own read."""
        e = self.header.entries[name]
        if self._buf is not None:
            return np.frombuffer(
                self._buf, np.uint8, count=e.end - e.start, offset=e.start - self._base
            )
        if name not in self._pending:  # read once, for verify() and array() alike
            self._pending[name] = self._map_one(e) if self._fd is not None else self._read_one(e)
        return self._pending[name]

    def _read_one(self, e: Entry, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``e``'s bytes read on their own (`_read_parallel`), into ``out`` (a flat
        ``uint8`` array of their size) when given."""
        buf = _empty_like_file(e.end - e.start, e.start) if out is None else out
        try:
            fd = fsops.fs().open_regular(self.path)
        except OSError as exc:
            if isinstance(exc, CheckpointError):  # open_regular's, already explained
                raise
            raise fsops.read_error(self.path, exc) from exc
        try:
            entries = [e] if self._checksums(self._verify_while_reading) else []
            self._read_parallel(fd, buf.data, e.start, e.end, entries)
        finally:
            os.close(fd)
        return buf

    def _map_one(self, e: Entry) -> np.ndarray:
        assert self._fd is not None
        lo = e.start - e.start % mmap_module.ALLOCATIONGRANULARITY
        try:
            m = mmap_module.mmap(self._fd, e.end - lo, access=mmap_module.ACCESS_COPY, offset=lo)
        except OSError as exc:
            raise CheckpointReadError(
                f"{self.path}: tensor {e.name!r} ({e.end - e.start} bytes) cannot be mapped "
                f"({exc.strerror}): free memory or raise the address-space limit, or load "
                "the other tensors with keys=[...]"
            ) from exc
        return np.frombuffer(m, np.uint8, count=e.end - e.start, offset=e.start - lo)

    def _view(self) -> memoryview:
        """``self._buf`` as bytes (slices of it cost less than arrays)."""
        if self._memview is None:
            self._memview = memoryview(self._buf).cast("B")
        return self._memview

    def _buf_address(self) -> int:
        if self._address is None:
            self._address = np.frombuffer(self._buf, np.uint8).__array_interface__["data"][0]
        return self._address

    def raw(self, name: str) -> memoryview:
        return self._bytes(name).data

    def verify(self, name: str) -> None:
        """Check ``name`` against its recorded CRC32C (a no-op for files without them)."""
        header = self.header
        if header.checksum_problem is not None:
            verify_bytes(self.path, header, name, None, 0)  # raises: it cannot be verified
        sums = header.checksums
        if sums is None:
            return  # another tool's file: nothing recorded
        # Straight-line code: a mapped load of 20,000 small tensors runs this 20,000 times.
        data: Any = None
        if self._buf is None:
            data = self._bytes(name)  # read (and checksummed while read) once, kept for array()
        crc = self._computed.get(name)
        if crc is None:
            e = header.entries[name]
            if data is None:
                view = self._memview if self._memview is not None else self._view()
                data = view[e.start - self._base : e.end - self._base]
            crc = _crc32c()(data, checksum_seed(e.dtype.code, e.shape))
        if sums[name] != crc:
            verify_bytes(self.path, header, name, None, crc)  # raises, naming the tensor

    def array(self, name: str, *, verify: bool = True) -> np.ndarray:
        """Tensor ``name`` as a NumPy array (ml_dtypes for BF16/F8), sharing the mapping.

        Tensors of dtypes no framework has (F4, F6_*) come back as their raw bytes
        (``uint8``, see `DType.raw_shape`).

        Raises:
            UnsupportedArrayError: this tensor (only) cannot be read here: a dtype this
                build does not know, or more dimensions than NumPy supports.
            CorruptCheckpointError: it fails its checksum.
        """
        e = self.header.entries[name]
        if not e.dtype.known:
            _unreadable(
                self.path,
                name,
                f"unknown dtype {e.dtype.code!r} (from a newer "
                "safetensors?); upgrade arrayckpt to read it",
            )
        if len(e.shape) > limits.MAX_NDIM:
            _unreadable(
                self.path,
                name,
                f"{len(e.shape)} dimensions, more than the {limits.MAX_NDIM} NumPy supports",
            )
        if verify:
            self.verify(name)
        dtype = e.dtype.numpy
        shape = e.shape if e.dtype.name else e.dtype.raw_shape(e.shape)
        if e.end == e.start:
            return np.empty(shape, dtype)
        if self._buf is not None:  # a view of the whole file's map or data, if aligned
            offset = e.start - self._base
            address = self._address if self._address is not None else self._buf_address()
            if (address + offset) % dtype.itemsize == 0:
                # one call: np.frombuffer(...).reshape(...) costs four times as much
                return np.ndarray(shape, dtype, self._buf, offset)
        arr = self._bytes(name)
        self._pending.pop(name, None)  # the array owns its buffer now; the reader lets go
        if arr.ctypes.data % dtype.itemsize:
            arr = arr.copy()  # misaligned (another tool's file): frameworks want aligned data
        return arr.view(dtype).reshape(shape)

    @property
    def mapped(self) -> bool:
        """Whether the arrays are views of one map of the whole file."""
        return isinstance(self._buf, mmap_module.mmap)

    def release(self, name: str) -> None:
        """Drop from this process the mapped pages wholly inside tensor ``name``, once its
        array was copied elsewhere (to a device, or by a framework that does not view
        host memory), so a load does not hold the mapped file beside the copies. The
        pages stay in the page cache: a later access maps them again, unchanged (nothing
        wrote to them: the map is copy-on-write and no view of them was handed out)."""
        if not self.mapped or not hasattr(mmap_module, "MADV_DONTNEED"):
            return
        e = self.header.entries[name]
        page = mmap_module.PAGESIZE
        lo = -(-(e.start - self._base) // page) * page
        hi = (e.end - self._base) // page * page
        if hi > lo:
            self._buf.madvise(mmap_module.MADV_DONTNEED, lo, hi - lo)

    def read_into(self, name: str, out: np.ndarray, *, verify: bool = True) -> None:
        """Put tensor ``name``'s bytes into ``out`` (a flat, writable ``uint8`` array of
        their size, e.g. a view of the caller's array), then check them when ``verify``.

        A reader opened with ``ranges=True`` reads them from the file straight into
        ``out``: nothing else is allocated for them. ``out`` may be left holding corrupt
        bytes when the check fails.

        Raises:
            CorruptCheckpointError: it fails its checksum.
        """
        e = self.header.entries[name]
        if self._buf is None and self._fd is None and name not in self._pending:
            self._read_one(e, out)
            if verify:
                self._pending[name] = out  # what verify() checks, if not checksummed already
                try:
                    self.verify(name)
                finally:
                    del self._pending[name]
            return
        if verify:
            self.verify(name)
        out[...] = self._bytes(name)
        self._pending.pop(name, None)

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

    The checksums go in the header, which comes first: they are computed first, in
    parallel.
    """
    image = file_image(tensors, _stamped(metadata))
    for wait in image.ready or ():  # the checksums come first: every copy must be done
        if wait is not None:
            wait()
    sums = _checksums_parallel(list(zip(image.buffers, image.seeds, strict=True)), image.sizes)
    head = bytearray(image.header.head)
    table = image.header.checksum_table(sums)
    at = image.header.table_at
    head[at : at + len(table)] = table
    return [memoryview(bytes(head)), *map(flat_bytes, image.buffers)]


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
    check_writable(str(path), layout, metadata)
    sizes = {name: math.prod(shape) * dtype.itemsize for name, dtype, shape in layout}
    names = tuple(name for name, _, _ in layout)
    codes = tuple(d.code for _, d, _ in layout)
    shapes = tuple(tuple(shape) for _, _, shape in layout)
    header = _header(
        _layout_text((names, codes, shapes, tuple(sizes.values()))), _stamped(metadata)
    )
    crcs: list[int] = []

    def chunks() -> Iterator[Any]:
        yield header.head
        for name, dtype, shape in layout:
            written, crc = 0, checksum_seed(dtype.code, tuple(shape))
            view: Any = None
            for chunk in produce(name):
                view = _byte_view(chunk)
                crc = _crc32c()(view, crc)
                written += view.nbytes
                yield view
            chunk = view = None  # drop this tensor before the next one is produced
            if written != sizes[name]:
                raise ValueError(
                    f"tensor {name!r}: produced {written} bytes, expected {sizes[name]}"
                )
            crcs.append(crc)

    fs = fsops.fs()
    fs.write_chunks(path, chunks())
    fs.write_at(path, header.table_at, header.checksum_table(crcs))
    fs.fsync_file(path)


def _byte_view(chunk: Any) -> memoryview:
    if isinstance(chunk, np.ndarray):  # ml_dtypes arrays do not export a buffer format
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data
    return memoryview(chunk).cast("B")
