"""Hugging Face model directories: ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, with no ``training_state.json``."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import commit, format, fsops, nested
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidInputError,
)
from .layout import (
    EXTRA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDING_META_FILE,
    TRAINING_STATE_FILE,
)

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
    # export_hf's files carry arrayckpt's checksums and say they are a model directory's
    return format.FORMAT_KEY not in metadata or metadata.get(EXPORT_KEY) == EXPORT_VALUE


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


#: ``__metadata__`` key marking a file `export_hf` wrote: a model directory's file, though
#: it carries arrayckpt's checksums.
EXPORT_KEY = "arrayckpt.export"
EXPORT_VALUE = "hf"
#: transformers' default ``max_shard_size``.
DEFAULT_MAX_SHARD_SIZE = "5GB"
#: Files beside the weights that ``from_pretrained`` reads, copied into the export.
_CONFIG_FILES = ("config.json", "generation_config.json")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"5GB"`` / ``"500MiB"`` as transformers writes them
    (KB, MB, GB are powers of 10; KiB, MiB, GiB powers of 2).

    Raises:
        InvalidInputError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.fullmatch(str(size))
        unit = m.group(2).upper() if m else ""
        if m is None or unit not in _UNITS:
            raise InvalidInputError(
                f"max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB or 2GiB"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise InvalidInputError(f"max_shard_size {size!r} must be positive")
    return n


def shard_name(i: int, n: int) -> str:
    """``model-00001-of-00003.safetensors``, transformers' shard name."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _sources(root: Path) -> dict[str, format.SafetensorsReader]:
    """Each stored tensor of ``root``'s model -> the reader of the file holding it.

    Tied tensors are stored once (aliases are metadata, not entries), which is what
    transformers' ``save_pretrained`` writes and ``from_pretrained`` re-ties.
    """
    if (root / SHARDING_META_FILE).exists() and not (root / MODEL_FILE).exists():
        raise InvalidInputError(
            f"{root} is a distributed checkpoint: run `arrayckpt consolidate {root} DST` and "
            "export DST"
        )
    if (root / INDEX_FILE).is_file() and not (root / MODEL_FILE).exists():
        files = sorted(set(weight_map(root).values()))
    elif (root / MODEL_FILE).is_file():
        files = [MODEL_FILE]
    else:
        raise CheckpointNotFoundError(f"no checkpoint at {root}: {MODEL_FILE} is missing")
    out: dict[str, format.SafetensorsReader] = {}
    for name in files:
        # ranges=True: each tensor's bytes are read when asked for, so memory holds one.
        reader = format.SafetensorsReader(root / name, ranges=True)
        tree = nested.tree_text(reader.header.metadata, source=str(reader.path))
        values = {} if tree is None else nested.leaves(tree, source=str(reader.path))
        if values:
            raise InvalidInputError(
                f"{reader.path}: non-array values {sorted(values)[:5]} have no place in a "
                "Hugging Face model file; save them with extra= instead"
            )
        out.update(dict.fromkeys(reader.names, reader))
    return out


def _plan(sizes: Mapping[str, int], limit: int) -> list[list[str]]:
    """Tensors grouped into shards of at most ``limit`` bytes, in order, as transformers
    does: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def export_hf(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    config: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a checkpoint's model as a Hugging Face model directory ``from_pretrained`` loads.

    The model tensors go to ``model.safetensors`` when they fit in one shard, else to
    ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``. Nested state
    keeps its dotted names (``transformer.h.0.attn.c_attn.weight``); a tied tensor is
    written once, under the name it was saved under, and ``from_pretrained`` ties it
    again. Tensors are read and written one at a time, so memory holds one tensor. The
    directory is built beside ``output`` and renamed into place: ``output`` never holds
    a partial export.

    Args:
        checkpoint: an arrayckpt checkpoint directory (or a Hugging Face one).
        output: the new model directory (absent or empty).
        max_shard_size: bytes per shard, or ``"5GB"``, ``"500MB"``, ``"2GiB"``.
        config: a ``config.json`` file, or a directory holding it (and
            ``generation_config.json``), to copy beside the weights; by default those in
            ``checkpoint``, if any.

    Returns:
        The absolute path of the model directory.

    Raises:
        CheckpointNotFoundError: no model file in ``checkpoint``, or no ``config`` there.
        InvalidInputError: a bad size, a distributed checkpoint, non-array model values, or
            ``output`` is not empty.
        CheckpointWriteError: writing failed; nothing is left at ``output``.

    Examples:
        >>> import numpy as np, arrayckpt as ac, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> _ = ac.save_checkpoint(d + "/ckpt", {"a": np.ones(4), "b": np.zeros(4)})
        >>> out = ac.export_hf(d + "/ckpt", d + "/hf", max_shard_size=40)
        >>> sorted(os.listdir(out))
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', \
'model.safetensors.index.json']
    """
    root = Path(checkpoint)
    target = Path(output)
    if target.is_dir() and any(target.iterdir()):
        # commit_directory would replace a checkpoint there (or the source itself) whole
        raise InvalidInputError(
            f"{target} is not empty; export into a new or empty directory, refusing to "
            "replace what is there"
        )
    limit = parse_size(max_shard_size)
    sources = _sources(root)
    entries = {name: r.header.entries[name] for name, r in sources.items()}
    sizes = {name: e.end - e.start for name, e in entries.items()}
    configs = _config_files(root if config is None else Path(config), required=config is not None)
    shards = _plan(sizes, limit)
    names = (
        [MODEL_FILE]
        if len(shards) == 1
        else [shard_name(i + 1, len(shards)) for i in range(len(shards))]
    )

    def produce(name: str) -> Iterable[Any]:
        yield sources[name].array(name, verify=True)  # checked against its CRC32C

    def fill(tmp: Path) -> None:
        fs = fsops.fs()
        for file, members in zip(names, shards, strict=True):
            layout = [(n, entries[n].dtype, entries[n].shape) for n in members]
            format.write_file_streaming(tmp / file, layout, produce, {EXPORT_KEY: EXPORT_VALUE})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {n: f for f, ms in zip(names, shards, strict=True) for n in ms},
            }
            fs.write_bytes(tmp / INDEX_FILE, json.dumps(index, indent=2).encode() + b"\n")
            fs.fsync_file(tmp / INDEX_FILE)
        for src in configs:
            fs.write_bytes(tmp / src.name, src.read_bytes())
            fs.fsync_file(tmp / src.name)

    return commit.commit_directory(output, fill)


def _config_files(where: Path, *, required: bool) -> list[Path]:
    if where.is_file():
        return [where]
    found = [where / f for f in _CONFIG_FILES if (where / f).is_file()]
    if required and not found:
        raise CheckpointNotFoundError(f"config {where}: no config.json there; pass its path")
    return found
