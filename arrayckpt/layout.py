"""File names of a checkpoint directory (boostr's layout) and how to recognise one."""

from __future__ import annotations

import re
from pathlib import Path

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINING_STATE_FILE = "training_state.json"
SHARDING_META_FILE = "sharding_meta.json"

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
