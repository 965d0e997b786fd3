"""Synchronous save of one checkpoint directory (boostr's layout)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from . import aliases, format, fsops, nested, pool, storage
from .commit import commit_directory, interrupts_deferred
from .layout import EXTRA_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE, PathLike
from .snapshot import Snapshot, take_snapshot
from .training_state import STATE_CHECKSUM_KEY, TrainingState, state_checksum

log = logging.getLogger("arrayckpt")


def _file_metadata(snap: Snapshot) -> tuple[dict[str, str], dict[str, str], bytes]:
    """The model and optimizer files' ``__metadata__`` and ``training_state.json``'s bytes:
    the same for a directory and an object-store upload."""
    state_bytes = snap.training_state.to_json().encode()
    # The JSON file stays boostr's; its checksum goes where boostr never looks.
    model_meta = {
        **(nested.tree_metadata(snap.model_tree) or {}),
        **aliases.metadata(snap.model_aliases),
        STATE_CHECKSUM_KEY: state_checksum(state_bytes),
    }
    optimizer_meta = {
        **(nested.tree_metadata(snap.optimizer_tree) or {}),
        **aliases.metadata(snap.optimizer_aliases),
    }
    return model_meta, optimizer_meta, state_bytes


def _extra_metadata(snap: Snapshot) -> dict[str, str]:
    return {
        **(nested.tree_metadata(snap.extra_tree) or {}),
        **aliases.metadata(snap.extra_aliases),
    }


def write_files(directory: Path, snap: Snapshot) -> None:
    """Write and fsync a checkpoint's files into an (uncommitted) directory.

    Two threads write at once: this one the model file, a second one the optimizer
    file, the extra file and ``training_state.json``. Overlapping one file's fsync with
    the other's writing finished sooner than one file after the other
    (``bench/writer_variants.py``).
    """
    model_meta, optimizer_meta, state_bytes = _file_metadata(snap)

    def other_files() -> None:
        if snap.optimizer or snap.optimizer_tree is not None:
            format.write_file(
                directory / OPTIMIZER_FILE, snap.optimizer, optimizer_meta, borrowed=snap.borrowed
            )
        if snap.extra is not None:
            format.write_file(
                directory / EXTRA_FILE,
                snap.extra,
                _extra_metadata(snap),
                borrowed=snap.borrowed,
            )
        state_path = directory / TRAINING_STATE_FILE
        fs = fsops.fs()
        fs.write_bytes(state_path, state_bytes)
        fs.fsync_file(state_path)

    # Never return (and let the commit remove the directory) while the second thread
    # still writes, not even on Ctrl-C: it is started and joined with Ctrl-C held back.
    others: Future[None] | None = None
    error: BaseException | None = None
    try:
        with interrupts_deferred():
            others = pool.in_own_thread(other_files, "arrayckpt-second-writer")
        format.write_file(directory / MODEL_FILE, snap.model, model_meta, borrowed=snap.borrowed)
    finally:
        if others is not None:
            with interrupts_deferred():
                error = others.exception()
    if error is not None:
        raise error


def object_files(snap: Snapshot) -> dict[str, list[memoryview]]:
    """The files `write_files` writes, as buffers for an object-store upload."""
    model_meta, optimizer_meta, state_bytes = _file_metadata(snap)
    files = {MODEL_FILE: format.file_parts(snap.model, model_meta)}
    if snap.optimizer or snap.optimizer_tree is not None:
        files[OPTIMIZER_FILE] = format.file_parts(snap.optimizer, optimizer_meta)
    if snap.extra is not None:
        files[EXTRA_FILE] = format.file_parts(snap.extra, _extra_metadata(snap))
    files[TRAINING_STATE_FILE] = [memoryview(state_bytes)]
    return files


def write_snapshot(
    directory: PathLike, snap: Snapshot, storage_options: Mapping[str, Any] | None = None
) -> Path | str:
    """Atomically commit ``snap`` as the checkpoint at ``directory`` (a path or URL)."""
    started = time.perf_counter()
    target: Path | str
    if storage.is_url(directory):
        from .storage import objects  # the object-store client is imported only here

        target = objects.save_files(str(directory), object_files(snap), storage_options)
    else:
        target = commit_directory(storage.local_path(directory), lambda tmp: write_files(tmp, snap))
    if log.isEnabledFor(logging.INFO):  # the sizes of 20,000 tensors take a while to add up
        log.info(
            "saved %s: %d tensors, %.1f MiB in %.3f s",
            target,
            len(snap.model) + len(snap.optimizer) + len(snap.extra or {}),
            snap.nbytes / 2**20,
            time.perf_counter() - started,
        )
    return target


def save_checkpoint(
    directory: PathLike,
    model_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    training_state: TrainingState | None = None,
    *,
    extra: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Save a checkpoint directory atomically and durably, and return its path.

    Writes ``model.safetensors``, ``optimizer.safetensors`` (only when non-empty) and
    ``training_state.json`` into a temporary sibling, fsyncs them, and swaps the
    directory into place: ``directory`` holds the complete previous checkpoint or the
    complete new one at every instant.

    Args:
        directory: where the checkpoint goes; must be new, empty, or a checkpoint. An
            ``s3://``, ``gs://`` or ``az://`` URL saves to an object store (data objects,
            then a commit object; see docs/storage.md); ``file://`` is a local path.
        model_state: ``str -> array`` of any supported framework (mixed is fine).
        optimizer_state: as ``model_state``; ``None`` or empty writes no optimizer file.
        training_state: step, epoch, learning rate and metadata; default ``step=0``.
        extra: anything else exact resume needs (LR scheduler and data loader state,
            `get_rng_state`), nested like ``optimizer_state``: arrays and JSON values
            (ints of any size, floats incl. inf/nan, str, bool, None, lists, tuples, dicts
            with str or int keys). Written to ``extra.safetensors``; loaded as
            ``Checkpoint.extra``. ``None`` writes no extra file.
        storage_options: object-store settings (``endpoint``, ``access_key_id``, ...)
            over those from the environment; unused for local paths.

    Raises:
        InvalidInputError: a key, value or training-state field cannot be saved
            (`UnsupportedArrayError` for arrays and dtypes); nothing is written.
        CheckpointWriteError: I/O failed; the previous checkpoint is intact.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = ac.save_checkpoint(f"{d}/step_1", {"w": np.ones(3, np.float32)},
        ...                        training_state=ac.TrainingState(step=1))
        >>> ac.load_checkpoint(f"{d}/step_1").model["w"]
        array([1., 1., 1.], dtype=float32)
    """
    snap = take_snapshot(model_state, optimizer_state, training_state, staging=None, extra=extra)
    return write_snapshot(directory, snap, storage_options)
