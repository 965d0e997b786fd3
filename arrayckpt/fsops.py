"""Every file-system operation arrayckpt performs, behind one swappable object.

Tests install a subclass (`use`) to record the order of operations or inject faults,
without monkeypatching the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import libc
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
)
from .writeback import Writeback

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = libc.function(
    "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
)


class FileSystem:
    """The real file system. Each method is one durable step of a save or a read."""

    def makedirs(self, path: Path) -> None:
        os.makedirs(path, exist_ok=True)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def write_safetensors(
        self,
        path: Path,
        specs: Mapping[str, Any],
        metadata: Mapping[str, str],
        *,
        borrowed: bool = False,
    ) -> bool:
        """Create the safetensors file ``path`` holding ``specs`` (`staging.HostTensor` by
        name) and ``metadata``, streamed from their host buffers (see `write_image`).

        Args:
            borrowed: the buffers are the caller's own arrays, which may change meanwhile.

        Returns:
            Whether the checksums are certainly those of the bytes written (see
            `write_image`); if not, a borrowed save reads the file back to check.
        """
        from . import format  # format imports this module: imported on the first write

        return write_image(path, format.file_image(specs, metadata), private=borrowed)

    def write_bytes(self, path: Path, data: bytes) -> None:
        with open(path, "xb") as f:
            f.write(data)

    def fsync_file(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def exchange(self, a: Path, b: Path) -> None:
        """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

        Raises:
            NotImplementedError: where the platform or file system cannot exchange.
        """
        if _renameat2 is None:
            raise NotImplementedError("renameat2 is not available")
        if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                raise NotImplementedError(os.strerror(err))
            raise OSError(err, os.strerror(err), str(a), None, str(b))

    def remove_tree(self, path: Path) -> None:
        shutil.rmtree(path)

    def remove_file(self, path: Path) -> None:
        os.unlink(path)

    def size(self, path: Path) -> int:
        fd = self.open_regular(path)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def open_regular(self, path: Path) -> int:
        """Open ``path`` for reading and return its descriptor: every read starts here.

        Only a regular file is accepted. ``O_NONBLOCK`` makes opening a FIFO return at once
        (instead of waiting forever for a writer) so that fstat can refuse it; on a
        regular file the flag changes nothing.

        Raises:
            CheckpointError: a subclass naming ``path`` and the fix (see `read_error`).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise read_error(path, exc) from exc
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            os.close(fd)
            raise read_error(path, exc) from exc
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(mode) else _KINDS.get(stat.S_IFMT(mode), "special")
            raise CorruptCheckpointError(
                f"{path} is {kind}, not a regular file; arrayckpt reads only regular files "
                "(replace it with the checkpoint file it should be)"
            )
        return fd

    def read_ranges(self, path: Path, ranges: Iterable[tuple[int, int]], out: memoryview) -> None:
        """Read each ``(offset, length)`` of ``path`` in turn into consecutive bytes of ``out``.

        Partial reads of large files (headers, one rank's slice of a tensor) without
        mapping or reading the whole file.
        """
        fd = self.open_regular(path)
        try:
            self.read_into(fd, path, ranges, out)
        finally:
            os.close(fd)

    def read_into(
        self, fd: int, path: Path, ranges: Iterable[tuple[int, int]], out: memoryview
    ) -> None:
        """`read_ranges` from a descriptor `open_regular` returned: every read's last step.

        Raises:
            EOFError: the file ends first (it was truncated after its size was read).
        """
        pos = 0
        for offset, length in ranges:
            done = 0
            while done < length:
                n = os.preadv(fd, [out[pos + done : pos + length]], offset + done)
                if n == 0:
                    raise EOFError(f"{path}: {length} bytes at {offset} run past the end")
                done += n
            pos += length

    def write_chunks(self, path: Path, chunks: Iterable[Any]) -> None:
        """Create ``path`` and write the buffers ``chunks`` yields, in order (streaming)."""
        with open(path, "xb") as f:
            early = Writeback(f.fileno())
            for chunk in chunks:
                f.write(chunk)
                early.written(f.tell())
                del chunk  # let the producer free it before making the next one

    def write_at(self, path: Path, offset: int, data: bytes) -> None:
        """Overwrite bytes of an existing file in place."""
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read_bytes(self, path: Path, limit: int) -> bytes:
        """Read a small regular file whole, refusing one larger than ``limit`` bytes.

        Every reader of arrayckpt's JSON files uses this, so each is bounded by its limit
        (from `arrayckpt.limits`) and never blocks on a FIFO.

        Raises:
            CheckpointError: the file is missing, not a regular file, or unreadable.
            ValueError: the file is larger than ``limit``.
        """
        fd = self.open_regular(path)
        try:
            size = os.fstat(fd).st_size
            if size > limit:  # sizes first: a huge (or sparse) file costs nothing to refuse
                raise ValueError(f"{size} bytes, larger than the {limit}-byte limit")
            # one byte more than the size said, to notice a file that grew meanwhile
            data = os.read(fd, size + 1)
            # os.read(n) allocates n bytes first: ask in small steps, never for the limit
            while len(data) <= limit and (more := os.read(fd, min(1 << 16, limit + 1 - len(data)))):
                data += more
        except OSError as exc:
            raise read_error(path, exc) from exc
        finally:
            os.close(fd)
        if len(data) > limit:
            raise ValueError(f"larger than the {limit}-byte limit")
        return data


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}

_READ_FIXES = {
    errno.ELOOP: "a symbolic link loop; point the link at the real file",
    errno.ENXIO: "not a regular file (a socket?); replace it with the checkpoint file",
    errno.EMFILE: "too many open files in this process; raise the limit (ulimit -n) or close files",
    errno.ENFILE: "too many open files on this system; close files and retry",
    errno.ENOMEM: "out of memory; free memory or raise the address-space limit",
    errno.EACCES: "permission denied; fix the file's permissions",
    errno.EPERM: "operation not permitted; fix the file's permissions",
}


def read_error(path: Path, exc: OSError) -> CheckpointError:
    """The `CheckpointError` for an ``OSError`` raised while reading ``path``.

    Missing files become `CheckpointNotFoundError`; a link loop, a directory or a socket
    (what the file itself is) `CorruptCheckpointError`; everything about the environment
    (open-file limit, memory, permissions, I/O) `CheckpointReadError`, keeping the errno.
    """
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return CheckpointNotFoundError(f"{path} does not exist")
    if code == errno.EISDIR:
        return CorruptCheckpointError(f"{path} is a directory, not a file")
    problem = _READ_FIXES.get(code or 0, f"reading failed ({exc.strerror or exc})")
    if code in (errno.ELOOP, errno.ENXIO):
        return CorruptCheckpointError(f"{path}: {problem}")
    error = CheckpointReadError(f"{path}: {problem}")
    error.errno = code
    return error


#: Bytes checksummed and then written at a time: small enough that the write finds them
#: still in the core's cache after the checksum read them.
CHUNK_BYTES = 1 << 20
#: Buffers one ``writev`` takes (Linux's ``IOV_MAX``).
_IOV_MAX = 1024


def write_image(path: Path, image: Any, *, private: bool = False) -> bool:
    """Create ``path`` and write a `format.FileImage` into it, in one pass.

    Tensors are streamed in file order, each chunk's CRC32C computed just before it is
    written; both the checksum and the write release the GIL. A file `direct.wanted`
    picks (large, of large tensors) is written with direct writes (`direct.DirectSink`:
    the header last, padded to a block); any other, or one on a file system without
    them, through the page cache (`_Buffered`: the header first, with placeholder
    checksums filled in last, and writeback started as the data goes out, so the
    ``fsync`` after finds little left to do). A failed write removes the partial file.

    Args:
        private: the buffers may change while they are written (a synchronous save of
            the caller's own arrays); a direct write then checksums a private copy.

    Returns:
        Whether every checksum was taken of the bytes written (a private copy), so the
        file cannot disagree with its checksums.
    """
    from . import direct, format

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    crc = format.crc32c_function()
    try:
        if direct.wanted(image.nbytes, len(image.sizes)) and direct.enable(fd):
            header = image.header.aligned(direct.BLOCK)
            with direct.DirectSink(fd, len(header.head), crc, private=private) as sink:
                sink.finish(header.with_checksums(_stream(image, _Direct(sink))))
            copied = private
        else:
            out = _Buffered(fd, Writeback(fd, image.nbytes), crc)
            out.write([image.header.head], len(image.header.head))
            table = image.header.checksum_table(_stream(image, out))
            if os.pwrite(fd, table, image.header.table_at) != len(table):
                raise OSError(errno.EIO, "short write of the checksum table", str(path))
            copied = False
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return copied


def _stream(image: Any, out: _Buffered | _Direct) -> list[int]:
    """Write ``image``'s tensors to ``out`` in file order; return their CRC32Cs."""
    crcs: list[int] = []
    # Tensors written in place from the caller's memory (a save within a staging budget)
    # are reported as soon as their bytes are out, so the caller is released early.
    written = image.written or [None] * len(image.sizes)
    # Tensors still being copied into staging (the write starts before the snapshot's
    # copies end) are waited for one by one.
    ready = image.ready or [None] * len(image.sizes)
    for data, n, seed, report, wait in zip(
        image.buffers, image.sizes, image.seeds, written, ready, strict=True
    ):
        if wait is not None:
            out.flush()  # what is ready goes out first: the disk keeps busy meanwhile
            wait()
        if n <= CHUNK_BYTES:
            crcs.append(out.small(data, n, seed, report))
            continue
        crcs.append(out.large(data, n, seed, report))
        if report is not None:
            report()
    out.flush()
    return crcs


class _Buffered:
    """Writes through the page cache: small tensors gathered into one ``writev``, large
    ones in `CHUNK_BYTES` pieces."""

    def __init__(self, fd: int, early: Writeback, crc: Callable[[Any, int], int]) -> None:
        from .format import flat_bytes

        self.fd, self.early, self.crc, self.flat, self.end = fd, early, crc, flat_bytes, 0
        self.batch: list[Any] = []
        self.size = 0
        self.done: list[Callable[[], None]] = []  # reports of the gathered tensors

    def small(self, data: Any, n: int, seed: int, report: Callable[[], None] | None) -> int:
        seed = self.crc(data, seed)
        self.batch.append(data)
        self.size += n
        if report is not None:
            self.done.append(report)
        if self.size >= CHUNK_BYTES or len(self.batch) == _IOV_MAX:
            self.flush()
        return seed

    def large(self, data: Any, n: int, seed: int, report: Callable[[], None] | None) -> int:
        self.flush()  # the small tensors before this one go first, in file order
        data = self.flat(data)
        for at in range(0, n, CHUNK_BYTES):
            piece = data[at : at + CHUNK_BYTES]
            seed = self.crc(piece, seed)
            self.write([piece], len(piece))
        return seed

    def flush(self) -> None:
        """Write the small tensors gathered so far; report those written in place."""
        if self.batch:
            self.write(self.batch, self.size)
            self.batch, self.size = [], 0
        for report in self.done:
            report()
        self.done.clear()

    def write(self, buffers: list[Any], nbytes: int) -> None:
        """``writev`` ``buffers``, finishing short writes."""
        left = nbytes
        done = os.writev(self.fd, buffers)
        while done < left:  # a short write (a signal, a nearly full disk): go on from there
            if done == 0:
                raise OSError(errno.EIO, "write made no progress")
            left -= done
            buffers = [self.flat(b) for b in buffers]
            while done >= len(buffers[0]):
                done -= len(buffers[0])
                buffers = buffers[1:]
            buffers = [buffers[0][done:], *buffers[1:]]
            done = os.writev(self.fd, buffers)
        self.end += nbytes
        self.early.written(self.end)


class _Direct:
    """Feeds a `direct.DirectSink`: every tensor's bytes are out (written, or copied into
    its bounce buffer) when `small` or `large` returns."""

    def __init__(self, sink: Any) -> None:
        from .format import flat_bytes

        self.sink, self.flat = sink, flat_bytes

    def small(self, data: Any, n: int, seed: int, report: Callable[[], None] | None) -> int:
        seed = self.sink.put(self.flat(data), seed, borrowed=report is not None)
        if report is not None:
            report()
        return int(seed)

    def large(self, data: Any, n: int, seed: int, report: Callable[[], None] | None) -> int:
        return int(self.sink.put(self.flat(data), seed, borrowed=report is not None))

    def flush(self) -> None:
        self.sink.drain()


_current = FileSystem()


def fs() -> FileSystem:
    """The file system in use (the real one unless a test installed another)."""
    return _current


@contextmanager
def use(filesystem: FileSystem) -> Iterator[FileSystem]:
    """Route every arrayckpt file operation through ``filesystem`` inside the block.

    Process-wide on purpose: the background writer thread must see it too.
    """
    global _current
    previous, _current = _current, filesystem
    try:
        yield filesystem
    finally:
        _current = previous
