"""The exception hierarchy: one root, one subclass per thing the user must do about it."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base of every error arrayckpt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint, or a file it needs, is not there: check the path or save first."""


class CorruptCheckpointError(CheckpointError):
    """A file is malformed, truncated or fails its checksum: restore from another checkpoint."""


class InvalidInputError(CheckpointError, ValueError):
    """An argument cannot be saved as given (bad key, bad training state, bad option)."""


class UnsupportedArrayError(InvalidInputError, TypeError):
    """A value is not an array arrayckpt can read, or its dtype has no safetensors code."""


class TopologyError(CheckpointError):
    """Ranks, world sizes or sharding do not match what was saved: reshard or fix the launch."""


class CheckpointReadError(CheckpointError, OSError):
    """Reading failed for a reason outside the file's contents (open-file limit, memory,
    permissions, I/O): fix the environment named in the message and read again."""


class CheckpointWriteError(CheckpointError):
    """Writing or committing failed; the previous checkpoint at the path is left intact."""
