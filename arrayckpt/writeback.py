"""Early writeback: start the disk on a file's pages while the file is still being written.

Linux leaves freshly written pages dirty in the page cache until ``fsync`` (or until the
dirty-memory thresholds, gigabytes on a training machine), so a save writes the whole
file to memory first and only then waits for the disk: the two run one after the other.
Asking the kernel to *start* writeback of each stretch just written
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``) overlaps them. Measured on the benchmark
machine with an earlier flusher, a thread asking every 10 ms (512 MiB,
``safetensors.serialize_file`` + fsync, median of 7): 0.34 s without, 0.24 s with. The
writer now asks itself, on its own descriptor, after every `STEP_BYTES` it writes, as
the ``raw_write_overlapped`` limit of ``bench/measure.py`` does.

This is only a hint: durability still comes from the ``fsync`` that follows, which also
reports any write error (``SYNC_FILE_RANGE_WRITE`` does not wait, so it neither reports
nor consumes one). Where ``sync_file_range`` does not exist, nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os

from . import libc

log = logging.getLogger("arrayckpt")

#: Files smaller than this are written without early writeback: there is nothing to overlap.
MIN_BYTES = 32 << 20
#: Writeback starts on every stretch of this many bytes once it is written (the limit
#: measured in ``bench/measure.py``'s ``raw_write_overlapped`` uses the same step).
STEP_BYTES = 32 << 20

#: ``flags`` of `sync_file_range`: start writeback of the range's dirty pages, do not wait.
SYNC_FILE_RANGE_WRITE = 2

#: ``sync_file_range(fd, offset, nbytes, flags)``, or None where the platform lacks it.
sync_file_range = libc.function(
    "sync_file_range", [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
)


class Writeback:
    """Starts writeback of a file's pages as a writer appends to it.

    The writer reports how far the file is written (`written`); every `STEP_BYTES`, the
    kernel is asked to start writing the new stretch to disk.

    Args:
        fd: the file being written, open for writing.
        nbytes: about how many bytes will be written (None: unknown); below `MIN_BYTES`
            nothing happens.
    """

    def __init__(self, fd: int, nbytes: int | None = None) -> None:
        self.fd = fd
        self.started = 0  # writeback was asked for every byte before this offset
        self.enabled = sync_file_range is not None and (nbytes is None or nbytes >= MIN_BYTES)

    def written(self, end: int) -> None:
        """The file now holds its bytes up to offset ``end``."""
        if not self.enabled or end - self.started < STEP_BYTES:
            return
        start_writeback = sync_file_range
        if start_writeback is not None and start_writeback(
            self.fd, self.started, end - self.started, SYNC_FILE_RANGE_WRITE
        ):
            log.debug("sync_file_range: %s", os.strerror(ctypes.get_errno()))
        self.started = end
