"""Direct writes (``O_DIRECT``): a large file's bytes go from memory to the disk, not
through the page cache.

Why: a buffered write copies every byte into the page cache and leaves the disk to the
kernel's writeback, which on the benchmark machine's virtual disk is the slow part: 4 GiB
written and fsynced took 5.4-14 s buffered and 1.5-1.9 s with ``O_DIRECT`` in 8 MiB
requests (``bench/measure.py``'s ``raw_write`` and ``raw_write_direct`` limits). The kernel
also copies nothing (CPU a training loop keeps), a save no longer fills the page cache
with a file nobody reads soon, and on a virtual machine that returns freed memory to its
host it touches no cold page-cache pages (`MIN_BYTES`).

``O_DIRECT`` wants every write's memory address, file offset and length to be multiples of
the device's logical block size; `BLOCK` (4096) is one for every common device. The file
is written as one stream (`DirectSink`): the header is written last, its length padded
with spaces (JSON whitespace, which every safetensors reader skips) to a multiple of
`BLOCK`, so the data starts on a block. A tensor whose memory lies on a block where the
stream does (the staging pool's page-aligned buffers, `aligned_empty`) is written from
where it is; other bytes are copied through an aligned bounce buffer first, and their
checksums are taken of that copy, the bytes the disk gets. The last block is padded with
zeros and the file truncated to its length after.

Where the file system refuses ``O_DIRECT`` (tmpfs, some network file systems) the file is
written through the page cache as before (`enable`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from . import env, pool
from .commit import interrupts_deferred

#: Alignment of every direct write's address, offset and length.
BLOCK = 4096
#: Bytes per write request: large enough that the disk sees few requests (8 MiB reached
#: the disk's rate in the measurement above; 1 MiB did not), small enough to keep the
#: bounce buffer small.
REQUEST_BYTES = 8 << 20
#: Bounce buffers of `REQUEST_BYTES` per file: one being filled while the others are
#: written.
BOUNCE_BUFFERS = 3
#: Files smaller than this go through the page cache. On a virtual machine that hands
#: freed memory back to its host (virtio-balloon free page reporting, as on the machine
#: the benchmarks ran on), a buffered write fills the page cache with memory the host has
#: to fault in again, a 4 KiB page at a time: written and fsynced 3 s apart (a training
#: loop's saves are minutes apart), 16 / 64 / 256 / 512 MiB took 0.066 / 0.244 / 0.549 /
#: 0.78 s buffered and 0.014 / 0.051 / 0.187 / 0.25 s direct. Only saves back to back,
#: whose page cache reuses the pages of the file just deleted, favour the page cache
#: (512 MiB: 0.28 s buffered, 0.24 s direct here; 0.29 s and 0.39 s on another machine).
#: The same holds for a synchronous save, whose direct write copies every byte through
#: bounce buffers (fresh memory too): 16 / 64 / 256 MiB 3 s apart took 0.066 / 0.235 /
#: 0.748 s buffered and 0.043 / 0.073 / 0.209 s direct (``bench/direct_writes.py``).
MIN_BYTES = 16 << 20
#: ``ARRAYCKPT_DIRECT_WRITES=0`` writes every file through the page cache.
ENV_VAR = "ARRAYCKPT_DIRECT_WRITES"

_O_DIRECT = getattr(os, "O_DIRECT", 0)


#: Files whose tensors are smaller than this on average go through the page cache: each
#: small tensor costs a copy into a bounce buffer here (W2, 20,000 tensors of 4 KiB: the
#: writer's CPU time 0.109 s direct, 0.068 s gathered by ``writev``).
MIN_MEAN_BYTES = 256 << 10


def wanted(nbytes: int, tensors: int) -> bool:
    """Whether a file of ``nbytes`` in ``tensors`` tensors should be written directly
    (where the file system allows)."""
    return (
        bool(_O_DIRECT)
        and nbytes >= MIN_BYTES
        and nbytes >= tensors * MIN_MEAN_BYTES
        and env.switch(ENV_VAR, True)
    )


def enable(fd: int) -> bool:
    """Switch ``fd`` (open for writing, nothing written yet) to direct writes; False where
    its file system does not support them (the file is then written buffered)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


def aligned_empty(nbytes: int) -> np.ndarray:
    """A flat uint8 array of ``nbytes`` starting on a page (anonymous memory), so a direct
    write can take it as it is."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(_anonymous(nbytes), np.uint8)


#: Anonymous memory this large is advised to use transparent huge pages, as NumPy's own
#: allocator does for large arrays: first touch of 1 GiB took 0.26-0.55 s so and 0.94-1.3 s
#: in 4 KiB pages here (with ``MAP_POPULATE``: 0.64-0.81 s).
_HUGE_MIN = 4 << 20


def _anonymous(nbytes: int) -> mmap.mmap:
    memory = mmap.mmap(-1, nbytes)
    if nbytes >= _HUGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).ctypes.data)


class DirectSink:
    """Writes a file's data as a stream of block-aligned direct writes, starting at
    ``start`` (a multiple of `BLOCK`: the header's length), and the header last.

    `put` hands over one tensor's bytes and returns their CRC32C; an I/O thread issues
    the writes one at a time, so the next bytes are copied and checksummed while the disk
    takes the last ones (at most `BOUNCE_BUFFERS` - 1 bounce buffers queued for it). A
    context manager: leaving it waits for the I/O thread, whatever happened.

    Args:
        private: the buffers may change while they are written (a synchronous save of
            the caller's own arrays): every byte is copied through a bounce buffer and
            checksummed there, so each checksum is of the bytes written.
    """

    def __init__(
        self, fd: int, start: int, crc: Callable[[Any, int], int], *, private: bool
    ) -> None:
        assert start % BLOCK == 0
        self.fd, self.crc, self.private = fd, crc, private
        self.at = start  # file offset of the next write (block-aligned)
        self.end = start  # bytes of the file streamed so far
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(BOUNCE_BUFFERS - 1):
            self._free.put(memoryview(_anonymous(REQUEST_BYTES)))
        self._bounce = memoryview(_anonymous(REQUEST_BYTES))
        self._fill = 0  # bytes waiting in the bounce buffer
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        # The I/O thread: None until the first write, then True while it runs, False once
        # it has ended or where none could start (at exit: each write waits).
        self._threaded: bool | None = None
        self._io_done: Future[None] | None = None

    def __enter__(self) -> DirectSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._threaded and self._io_done is not None:
            self._jobs.put(None)
            self._io_done.result()
        self._threaded = False  # what is written from here on (the header) waits

    def _io_thread(self) -> bool:
        """Whether writes go to the I/O thread, which starts here, on the first write:
        inside the sink's ``with`` block, so that leaving the block always ends it (a
        Ctrl-C that came while it started is delivered once it is recorded)."""
        if self._threaded is None:
            with interrupts_deferred():
                self._io_done = pool.on_spare_thread(self._io, "arrayckpt-direct")
                self._threaded = self._io_done is not None
        return self._threaded

    def put(self, data: memoryview, seed: int, *, borrowed: bool = False) -> int:
        """Write the flat bytes ``data`` next; return their CRC32C continued from ``seed``.

        Args:
            borrowed: the caller's memory, which it may change once this returns: copied
                into a bounce buffer (as everything is, where the sink is private).
        """
        n = len(data)
        self.end += n
        if not (self.private or borrowed) and n >= 2 * BLOCK:
            head = -self._fill % BLOCK  # bytes that finish the bounce buffer's last block
            if (_address(data) + head) % BLOCK == 0:
                if head:
                    seed = self._copy(data[:head], seed)
                    data = data[head:]
                self.drain()
                bulk = len(data) - len(data) % BLOCK
                for at in range(0, bulk, REQUEST_BYTES):
                    piece = data[at : min(at + REQUEST_BYTES, bulk)]
                    seed = self.crc(piece, seed)
                    self._submit(piece, None)
                data = data[bulk:]
        return self._copy(data, seed) if len(data) else seed

    def _copy(self, data: memoryview, seed: int) -> int:
        """Copy ``data`` into the bounce buffer (handing it to the disk each time it
        fills) and checksum the copy."""
        while len(data):
            take = min(len(data), REQUEST_BYTES - self._fill)
            into = self._bounce[self._fill : self._fill + take]
            _copy_into(into, data[:take])
            seed = self.crc(into, seed)
            self._fill += take
            data = data[take:]
            if self._fill == REQUEST_BYTES:
                self.drain()
        return seed

    def drain(self) -> None:
        """Hand the bounce buffer's whole blocks to the disk; a partial last block moves to
        the next bounce buffer."""
        whole = self._fill - self._fill % BLOCK
        if not whole:
            return
        full, rest = self._bounce, self._fill - whole
        if self._io_thread():
            self._bounce = self._free.get()
            self._bounce[:rest] = full[whole : self._fill]
            self._submit(full[:whole], full)
        else:
            self._submit(full[:whole], None)  # written before the partial block moves
            full[:rest] = full[whole : self._fill]
        self._fill = rest

    def _submit(self, data: memoryview, bounce: memoryview | None) -> None:
        """Write ``data`` at the next offset: on the I/O thread, which then gives
        ``bounce`` back for reuse."""
        if self._error is not None:
            raise self._error
        if self._io_thread():
            self._jobs.put((data, self.at, bounce))
        else:
            _pwrite_all(self.fd, data, self.at)
        self.at += len(data)

    def _io(self) -> None:
        while (job := self._jobs.get()) is not None:
            data, offset, bounce = job
            if self._error is None:  # after an error, only give the buffers back
                try:
                    _pwrite_all(self.fd, data, offset)
                except BaseException as exc:  # raised in the writing thread (`_submit`)
                    self._error = exc
            if bounce is not None:
                self._free.put(bounce)

    def finish(self, header: bytes) -> None:
        """Write what is left, zero-padded to a block, then ``header`` (the file's first
        bytes, a multiple of `BLOCK` long) at offset 0, and cut the padding off."""
        if self._fill:
            padded = self._fill + (-self._fill % BLOCK)
            self._bounce[self._fill : padded] = bytes(padded - self._fill)
            self._fill = padded
            self.drain()
        self.__exit__()  # every write is done (or failed) once the I/O thread has ended
        if self._error is not None:
            raise self._error
        assert len(header) % BLOCK == 0
        self.at = 0
        for at in range(0, len(header), REQUEST_BYTES):
            piece = header[at : at + REQUEST_BYTES]
            self._bounce[: len(piece)] = piece
            self._submit(self._bounce[: len(piece)], None)
        os.ftruncate(self.fd, self.end)


#: A write for the I/O thread: bytes, file offset, and the bounce buffer to give back.
_Job = tuple[memoryview, int, "memoryview | None"]


def _copy_into(into: memoryview, data: memoryview) -> None:
    """``into[:] = data`` without the GIL where it is long (NumPy's copy releases it; a
    memoryview's does not), so the I/O thread gets on with the previous request."""
    if len(data) < _GIL_FREE_COPY:
        into[:] = data
    else:
        np.copyto(np.frombuffer(into, np.uint8), np.frombuffer(data, np.uint8))


#: Copies this long go through NumPy, which releases the GIL (`_copy_into`).
_GIL_FREE_COPY = 64 << 10


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset``; a short direct write (a nearly full disk)
    goes on from where it stopped, which stays block-aligned as the kernel writes whole
    blocks."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n
