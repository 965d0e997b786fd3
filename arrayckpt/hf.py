"""Hugging Face model directories: ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, with no ``training_state.json``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import format
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .layout import EXTRA_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE

INDEX_FILE = "model.safetensors.index.json"


def is_model_dir(root: Path) -> bool:
    """True for a Hugging Face model directory, not an arrayckpt or boostr checkpoint.

    An arrayckpt checkpoint that lost its ``training_state.json`` is damaged, not a model
    directory: its files are recognised by arrayckpt's own ``__metadata__`` keys.
    """
    if any((root / f).exists() for f in (TRAINING_STATE_FILE, OPTIMIZER_FILE, EXTRA_FILE)):
        return False
    if (root / INDEX_FILE).is_file():
        return True
    if not (root / MODEL_FILE).is_file():
        return False
    try:
        metadata = format.SafetensorsReader(root / MODEL_FILE, ranges=True).header.metadata
    except CheckpointError:
        return False  # the load reports what is wrong with the file
    return format.FORMAT_KEY not in metadata


def weight_map(root: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index; every shard is inside ``root``."""
    index = root / INDEX_FILE
    try:
        doc = json.loads(index.read_bytes())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{index}: not readable JSON: {exc}") from exc
    mapping = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise CorruptCheckpointError(f"{index}: 'weight_map' must map tensor names to files")
    for shard in set(mapping.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CorruptCheckpointError(
                f"{index}: shard {shard!r} is not a file name in {root}; fix the index"
            )
    return mapping


def load_model_dir(
    root: Path, load: Callable[..., Any], keys: Iterable[str] | None
) -> dict[str, Any]:
    """The model tensors of a Hugging Face directory, opening only the shards needed.

    ``load(path, keys=...)`` reads one safetensors file (see `load.load_state_file`).
    """
    if not (root / INDEX_FILE).is_file():
        return dict(load(root / MODEL_FILE, keys=keys))
    mapping = weight_map(root)
    wanted = list(mapping) if keys is None else list(keys)
    missing = [k for k in wanted if k not in mapping]
    if missing:
        raise CheckpointNotFoundError(
            f"{root / INDEX_FILE}: no tensors named {missing[:5]}; its 'weight_map' lists them"
        )
    by_shard: dict[str, list[str]] = {}
    for name in wanted:
        by_shard.setdefault(mapping[name], []).append(name)
    out: dict[str, Any] = {}
    for shard, names in by_shard.items():
        out.update(load(root / shard, keys=names))
    return {name: out[name] for name in wanted}
