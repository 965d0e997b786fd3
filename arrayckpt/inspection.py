"""What `arrayckpt inspect` and `arrayckpt verify` report, as plain JSON-able dicts."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import aliases, fsops, nested, storage
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidInputError,
)
from .format import SafetensorsReader, read_header
from .layout import (
    EXTRA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDING_META_FILE,
    TRAINING_STATE_FILE,
    PathLike,
    is_complete,
    misnamed_step_dir,
    rank_dirs,
    settled_scan,
)
from .limits import MAX_SHARDING_META_BYTES
from .training_state import TrainingState


def kind_of(path: Path) -> str:
    """``"file"``, ``"checkpoint"``, ``"distributed"`` or ``"root"`` (a manager's steps).

    Raises:
        CheckpointNotFoundError: ``path`` is none of these.
    """
    if path.is_file():
        if path.suffix == ".json":  # its first 8 bytes would read as an absurd header length
            raise InvalidInputError(
                f"{path} is a JSON file, not a safetensors file: inspect the checkpoint "
                f"directory instead (`arrayckpt inspect {path.parent}`)"
            )
        return "file"
    if not path.is_dir():
        if path.exists():  # a FIFO, socket or device: never opened
            os.close(fsops.fs().open_regular(path))  # raises, naming what it is
        raise CheckpointNotFoundError(f"{path} does not exist")
    if (path / SHARDING_META_FILE).is_file():
        return "distributed"
    if (path / MODEL_FILE).exists() or (path / TRAINING_STATE_FILE).exists():
        return "checkpoint"
    if any(e.step is not None for e in settled_scan(path)):
        return "root"
    try:
        misnamed = sorted(p.name for p in path.iterdir() if misnamed_step_dir(p.name))
    except OSError:  # removed since the checks above (retention): nothing to hint at
        misnamed = []
    hint = (
        f"; {', '.join(misnamed[:3])} are not step names the manager reads "
        f"(`arrayckpt ls {path}` shows how to rename them)"
        if misnamed
        else ""
    )
    raise CheckpointNotFoundError(
        f"{path} is not a checkpoint (no {MODEL_FILE}, {SHARDING_META_FILE} or step_* dirs){hint}"
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):  # a NumPy scalar kept in the tree
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def describe_file(path: Path) -> dict[str, Any]:
    """Tensors (name, dtype, shape, bytes) and non-array leaves of one safetensors file."""
    header = read_header(path)  # nothing past the header is read
    entries = header.entries.values()
    tree = nested.tree_text(header.metadata, source=str(path))
    values = nested.leaves(tree, source=str(path)) if tree is not None else {}
    return {
        "path": str(path),
        "nested": tree is not None,
        "checksums": header.checksums is not None,
        "nbytes": sum(e.end - e.start for e in entries),
        "tensors": [
            {
                "name": e.name,
                "dtype": e.dtype.code,
                "shape": list(e.shape),
                "nbytes": e.end - e.start,
            }
            for e in entries
        ],
        "values": {k: _jsonable(v) for k, v in values.items()},
    }


def describe(path: PathLike) -> dict[str, Any]:
    """Everything `arrayckpt inspect` shows about a file, checkpoint or sharded checkpoint
    (``path`` may be an object-store URL of a file or a committed step).

    Raises:
        CheckpointNotFoundError: nothing to inspect at ``path``.
        CorruptCheckpointError: a header or training state is malformed.
    """
    if storage.is_url(path):
        return _remote(str(path), describe)
    path = Path(storage.local_path(path))
    kind = kind_of(path)
    out: dict[str, Any] = {"path": str(path), "kind": kind}
    if kind == "file":
        out["files"] = [describe_file(path)]
    elif kind == "checkpoint":
        state = TrainingState.read(path / TRAINING_STATE_FILE)
        out["training_state"] = {
            "version": state.version,
            "step": state.step,
            "epoch": state.epoch,
            "learning_rate": state.learning_rate,
            "metadata": state.metadata,
        }
        files = [path / MODEL_FILE, path / OPTIMIZER_FILE, path / EXTRA_FILE]
        out["files"] = [describe_file(f) for f in files if f.exists() or f.name == MODEL_FILE]
    elif kind == "distributed":
        meta = path / SHARDING_META_FILE
        _check_distributed(meta)  # strict and size-capped before the plain parse below
        try:
            out["sharding"] = json.loads(fsops.fs().read_bytes(meta, MAX_SHARDING_META_BYTES))
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{meta}: not JSON: {exc}") from exc
        out["ranks"] = [describe(rank) for rank in rank_dirs(path)]
    else:
        raise CheckpointNotFoundError(
            f"{path} holds steps, not one checkpoint: run `arrayckpt ls {path}` and inspect "
            "one step (`arrayckpt verify` takes the whole root)"
        )
    return out


def _remote(location: str, report: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``report`` of a local copy of the file or committed step at ``location``, naming
    URLs; a root of steps is refused as `kind_of` refuses a local one."""
    from .storage import fetch, objects
    from .storage.steps import list_steps

    if location.endswith(".safetensors"):
        with fetch.local_file(location) as copy:
            return fetch.as_urls(report(copy), copy, location)
    try:
        with objects.local_copy(location) as step:
            return fetch.as_urls(report(step), step, location)
    except CheckpointNotFoundError:
        url = storage.parse_url(location)
        if not any(list_steps(objects.open_store(url), url)):
            raise
    raise CheckpointNotFoundError(
        f"{location} holds steps, not one checkpoint: run `arrayckpt ls {location}` and "
        "inspect one step (`arrayckpt verify` takes the whole root)"
    )


def _verify_remote(location: str, advance: Callable[[int], None]) -> dict[str, Any]:
    """`verify` of an object-store URL: a file, a committed step, or a root's complete
    steps (a step retention deletes meanwhile is skipped, not reported corrupt)."""
    from .storage import objects
    from .storage.steps import CommitCache, complete_steps

    def one(path: Path) -> dict[str, Any]:
        return verify(path, advance)

    def step_report(step: str) -> list[dict[str, Any]]:
        try:
            return list(_remote(step, one)["files"])
        except CorruptCheckpointError as exc:  # an object differs from its commit object
            return [
                {"path": step, "tensors": 0, "nbytes": 0, "checksums": None, "errors": [str(exc)]}
            ]

    url = storage.parse_url(location)
    store = objects.open_store(url)
    if location.endswith(".safetensors"):
        files = step_report(location)
    else:
        try:
            objects.read_commit(store, url)
            files = step_report(location)
        except CheckpointNotFoundError:
            files = []
            for step in complete_steps(store, url, CommitCache()):
                try:
                    files += step_report(str(step.url))
                except CheckpointNotFoundError:  # deleted by retention since the listing
                    continue
            if not files:
                raise CheckpointNotFoundError(
                    f"{location}: no complete step to verify (see `arrayckpt ls`)"
                ) from None
    return {"path": location, "ok": not any(e["errors"] for e in files), "files": files}


def _check_distributed(meta: Path) -> None:
    """Parse ``sharding_meta.json`` as the loader does and check every rank it names is there.

    Raises:
        CheckpointError: the meta is malformed, or a rank's directory or files are missing.
    """
    from .distributed.shards import check_ranks_present
    from .distributed.types import ShardingMeta

    check_ranks_present(meta.parent, ShardingMeta.read(meta).world_size)


def files_to_verify(path: Path) -> list[Path]:
    """Every file a verification reads under ``path``, tensor files first."""
    kind = kind_of(path)
    if kind == "file":
        return [path]
    if kind == "root":
        files = []
        for step in [e.path for e in settled_scan(path) if e.status == "complete"]:
            with contextlib.suppress(CheckpointNotFoundError):  # deleted since the scan
                files += files_to_verify(step)
        return files
    if kind == "distributed":
        ranks = [f for rank in rank_dirs(path) for f in files_to_verify(rank)]
        return [*ranks, path / SHARDING_META_FILE]
    optional = [f for f in (path / OPTIMIZER_FILE, path / EXTRA_FILE) if f.exists()]
    return [path / MODEL_FILE, *optional, path / TRAINING_STATE_FILE]


def verify(path: PathLike, advance: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Validate every header and JSON file and check every tensor's CRC32C under ``path``.

    ``advance(nbytes)`` is called as tensor bytes are checked (for a progress bar).
    Every problem is collected; nothing stops at the first.

    Returns:
        ``{"path", "ok", "files": [{"path", "tensors", "nbytes", "checksums", "errors"}]}``.

    Raises:
        CheckpointNotFoundError: nothing to verify at ``path`` (e.g. a root of only
            incomplete steps).
    """
    if storage.is_url(path):
        return _verify_remote(str(path), advance)
    path = Path(storage.local_path(path))
    report: list[dict[str, Any]] = []
    if kind_of(path) != "root":
        report = _verify_files(files_to_verify(path), advance)
        return {"path": str(path), "ok": not any(e["errors"] for e in report), "files": report}
    tried: set[Path] = set()
    while not report:  # rescan while every step we chose was deleted under us
        listing = settled_scan(path)
        steps = [e.path for e in listing if e.status == "complete" and e.path not in tried]
        if not steps:
            break
        for step in steps:
            tried.add(step)
            try:
                entries = _verify_files(files_to_verify(step), advance)
            except CheckpointNotFoundError:
                entries = None
            if (entries is None or any(e["errors"] for e in entries)) and not is_complete(step):
                continue  # deleted (by retention) while we read it: not corruption
            report += entries or []
    if not report:
        raise CheckpointNotFoundError(f"{path}: no complete step to verify (see `arrayckpt ls`)")
    return {"path": str(path), "ok": not any(e["errors"] for e in report), "files": report}


def _verify_files(files: list[Path], advance: Callable[[int], None]) -> list[dict[str, Any]]:
    report = []
    for f in files:
        entry: dict[str, Any] = {
            "path": str(f),
            "tensors": 0,
            "nbytes": 0,
            "checksums": None,
            "errors": [],
        }
        report.append(entry)
        try:
            if f.suffix == ".json":
                if f.name == TRAINING_STATE_FILE:
                    TrainingState.read(f, metadata=_model_metadata(f.parent))
                else:
                    _check_distributed(f)
                continue
            reader = SafetensorsReader(f)
            _check_tree(reader)
        except (CheckpointError, OSError, ValueError, RecursionError) as exc:
            entry["errors"].append(str(exc))
            continue
        entry["checksums"] = reader.header.checksums is not None
        problem = reader.header.checksum_problem
        if problem is not None:  # no tensor can be verified: say so once, not per tensor
            entry["errors"].append(f"{f}: {problem}")
        for e in reader.header.entries.values():
            try:
                if problem is None:
                    reader.verify(e.name)
            except CorruptCheckpointError as exc:
                entry["errors"].append(str(exc))
            entry["tensors"] += 1
            entry["nbytes"] += e.end - e.start
            advance(e.end - e.start)
    return report


def _check_tree(reader: SafetensorsReader) -> None:
    """The nested-state tree, as every loader checks it: checksum, grammar, tensor names."""
    source = str(reader.path)
    tree = nested.tree_text(reader.header.metadata, source=source)
    tied = aliases.read(reader.header.metadata, reader.header.entries, source=source)
    if tree is not None:
        names = {*reader.names, *tied}
        nested.check_names(nested.parse(tree, source=source), names, source=source)


def _model_metadata(checkpoint: Path) -> dict[str, str] | None:
    """The model file's ``__metadata__`` (where the training state's checksum is), if readable;
    an unreadable model file is reported on its own."""
    try:
        return SafetensorsReader(checkpoint / MODEL_FILE).header.metadata
    except (CheckpointError, OSError):
        return None


def total_tensor_bytes(path: PathLike) -> int | None:
    """Bytes of tensor data a verification will checksum (headers only are read);
    ``None`` for an object-store URL (known only once each step is fetched)."""
    if storage.is_url(path):
        return None
    path = Path(storage.local_path(path))
    total = 0
    for f in files_to_verify(path):
        if f.suffix == ".safetensors":
            with contextlib.suppress(CheckpointError, OSError):  # verify reports these
                total += sum(e.end - e.start for e in read_header(f).entries.values())
    return total
