"""Every file-system operation arrayckpt performs, behind one swappable object.

Tests install a subclass (`use`) to record the order of operations or inject faults,
without monkeypatching the standard library.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors

from . import libc
from .writeback import early_writeback

_AT_FDCWD = -100
_OS_ERROR = re.compile(r"\(os error ([0-9]+)\)")
_RENAME_EXCHANGE = 2
_renameat2 = libc.function(
    "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` alone must set one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Not Linux: set and restore. Another thread creating a file in between would get 077.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class FileSystem:
    """The real file system. Each method is one durable step of a save or a read."""

    def makedirs(self, path: Path) -> None:
        os.makedirs(path, exist_ok=True)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def write_safetensors(
        self, path: Path, specs: Mapping[str, Any], metadata: Mapping[str, str]
    ) -> None:
        # The Rust writer releases the GIL and writes straight from our host buffers; the
        # flusher has the disk write its pages meanwhile, so the fsync after is short.
        nbytes = sum(spec.data_len for spec in specs.values())
        try:
            with early_writeback(path.parent, nbytes):
                safetensors.serialize_file(dict(specs), str(path), metadata=dict(metadata))
        except safetensors.SafetensorError as exc:
            # Its I/O errors arrive as text ("... (os error 28)"): give callers the errno.
            found = _OS_ERROR.search(str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc
        # safetensors writes through a 0600 temporary file; give the file the mode every
        # other file we create gets (0644 under umask 022), so teammates can read weights.
        os.chmod(path, 0o666 & ~current_umask())

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
        return os.stat(path).st_size

    def read_ranges(self, path: Path, ranges: Iterable[tuple[int, int]], out: memoryview) -> None:
        """Read each ``(offset, length)`` of ``path`` in turn into consecutive bytes of ``out``.

        Partial reads of large files (headers, one rank's slice of a tensor) without
        mapping or reading the whole file.
        """
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = 0
            for offset, length in ranges:
                done = 0
                while done < length:
                    n = os.preadv(fd, [out[pos + done : pos + length]], offset + done)
                    if n == 0:
                        raise EOFError(f"{path}: {length} bytes at {offset} run past the end")
                    done += n
                pos += length
        finally:
            os.close(fd)

    def write_chunks(self, path: Path, chunks: Iterable[Any]) -> None:
        """Create ``path`` and write the buffers ``chunks`` yields, in order (streaming)."""
        with early_writeback(path.parent), open(path, "xb") as f:
            for chunk in chunks:
                f.write(chunk)
                del chunk  # let the producer free it before making the next one

    def write_at(self, path: Path, offset: int, data: bytes) -> None:
        """Overwrite bytes of an existing file in place."""
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read_bytes(self, path: Path, limit: int) -> bytes:
        """Read a small file whole, refusing one larger than ``limit`` bytes."""
        with open(path, "rb") as f:
            # read(n) allocates n bytes up front: ask for what the file holds, not the cap
            data = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
        if len(data) > limit:
            raise ValueError(f"larger than {limit} bytes")
        return data


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
