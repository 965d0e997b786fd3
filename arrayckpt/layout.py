"""File names of a checkpoint directory (boostr's layout) and how to recognise one."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from .errors import CheckpointError

#: A local path; every entry point that takes a directory accepts one.
PathLike = str | os.PathLike[str]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINING_STATE_FILE = "training_state.json"
SHARDING_META_FILE = "sharding_meta.json"

_STEP_DIR = re.compile(r"step_([0-9]{8,})")
_RANK_DIR = re.compile(r"rank_(0|[1-9][0-9]*)")
_CHECKPOINT_FILES = frozenset({MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE})
TEMP_MARKER = ".arrayckpt-tmp-"
OLD_MARKER = ".arrayckpt-old-"


def rank_dir_name(rank: int) -> str:
    return f"rank_{rank}"


def is_rank_dir_name(name: str) -> bool:
    return _RANK_DIR.fullmatch(name) is not None


def is_temporary_name(name: str) -> bool:
    """True for the siblings a save creates and removes (and a crash may leave)."""
    return TEMP_MARKER in name or OLD_MARKER in name


def replaceable(path: Path) -> bool:
    """True when ``path`` is empty or holds only what a (distributed) checkpoint holds.

    A save replaces such a directory whole; anything else is the user's and is refused.
    """
    for entry in path.iterdir():
        name = entry.name
        if name in _CHECKPOINT_FILES or name == SHARDING_META_FILE:
            continue
        if is_rank_dir_name(name) and entry.is_dir() and replaceable(entry):
            continue
        return False
    return True


def step_dir_name(step: int) -> str:
    """``step_00000100`` for step 100 (eight digits at least, so names sort by step)."""
    return f"step_{step:08d}"


def parse_step_dir_name(name: str) -> int | None:
    """The step of a step directory's name, or ``None`` for any other name."""
    m = _STEP_DIR.fullmatch(name)
    if m is None or step_dir_name(int(m[1])) != name:
        return None
    return int(m[1])


def _single_complete(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / TRAINING_STATE_FILE).is_file()


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a whole checkpoint: a single one, or every rank of a sharded one.

    A commit renames a directory into place only once it is whole, so this is what a
    reader can trust; it does not read the tensors (``arrayckpt verify`` does).
    """
    meta = path / SHARDING_META_FILE
    if not meta.is_file():
        return _single_complete(path)
    # distributed/ owns sharding_meta.json (size cap, strict parse) and the rank check;
    # imported here, not at the top, because it builds on this module.
    from .distributed.shards import rank_files_missing
    from .distributed.types import ShardingMeta

    try:
        world_size = ShardingMeta.read(meta).world_size
    except (CheckpointError, OSError):
        return False
    return rank_files_missing(path, world_size) == ([], 0)


class StepEntry(NamedTuple):
    """One entry of a manager root, as `scan` finds it."""

    name: str
    path: Path
    #: The step number; ``None`` for a temporary.
    step: int | None
    #: ``"complete"``, ``"incomplete"`` or ``"temporary"``.
    status: str


def scan(root: PathLike) -> list[StepEntry]:
    """Every step directory and temporary under ``root``, complete or not, by step.

    Other entries (the user's own files) are not listed. A missing root lists nothing.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    steps, temporaries = [], []
    for entry in root.iterdir():
        if is_temporary_name(entry.name):
            temporaries.append(StepEntry(entry.name, entry, None, "temporary"))
            continue
        step = parse_step_dir_name(entry.name)
        if step is not None and entry.is_dir():
            status = "complete" if is_complete(entry) else "incomplete"
            steps.append(StepEntry(entry.name, entry, step, status))
    steps.sort(key=lambda e: e.step or 0)
    temporaries.sort(key=lambda e: e.name)
    return steps + temporaries


def temporary_owner(name: str) -> int | None:
    """The pid a temporary's name records (``.<target>.arrayckpt-tmp-<pid>-<id>``)."""
    for marker in (TEMP_MARKER, OLD_MARKER):
        if marker in name:
            pid = name.split(marker, 1)[1].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


#: Scans `settled_scan` makes at most while a root without a complete step keeps changing.
_SETTLE_SCANS = 100


def settled_scan(root: PathLike) -> list[StepEntry]:
    """`scan`, trusted also while retention deletes steps under it.

    A listing is a snapshot: the one step it saw can be deleted before its completeness
    is checked, while the step that replaced it was committed too late to be listed, so
    one scan can show no complete step though one existed at every instant. When a scan
    shows none, scan again until two scans list the same names.
    """
    previous: list[str] | None = None
    entries: list[StepEntry] = []
    for _ in range(_SETTLE_SCANS):
        entries = scan(root)
        names = [e.name for e in entries]
        if any(e.status == "complete" for e in entries) or names == previous:
            break
        previous = names
    return entries
