"""The nested structure (``arrayckpt.tree``) of a distributed checkpoint's merged state.

Each rank's file carries the tree of what that rank saved. The merged tree is their deep
merge: dicts take the union of their keys (rank order), and everything else (lists,
tuples, scalars, tensors) must be the same on every rank that has it. Ranks that saved
a flat ``str -> array`` mapping count as a one-level dict. When the ranks disagree (say
``param_groups`` lists differ per rank), the structure is not well-defined: the merged
state is flat, with dotted tensor names, and a warning says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from typing import Any

from .. import nested
from .shards import ShardFile

log = logging.getLogger("arrayckpt")


class _Conflict(Exception):
    pass


def merged_tree(files: Sequence[ShardFile | None], names: Collection[str], part: str) -> str | None:
    """The JSON tree for the merged ``part`` whose tensors are ``names``, or ``None`` (flat).

    Examples:
        >>> # merged_tree([rank0.optimizer, rank1.optimizer], names, "optimizer")
    """
    present = [(r, f) for r, f in enumerate(files) if f is not None]
    texts = [(r, f, nested.tree_text(f.header.metadata, source=str(f.path))) for r, f in present]
    if all(text is None for _, _, text in texts):
        return None
    merged: Any = None
    try:
        for r, f, text in texts:
            root = (
                {"dict": [[n, {"tensor": n}] for n in f.entries]}
                if text is None
                else nested.parse(text, source=str(f.path))
            )
            merged = root if merged is None else _merge(merged, root, r)
        used = nested.tensors_of(merged)
        if len(used) != len(set(used)) or set(used) != set(names):
            raise _Conflict("the ranks' trees do not name each merged tensor exactly once")
    except _Conflict as exc:
        log.warning(
            "%s: %s state is merged flat (dotted names): %s",
            present[0][1].path.parent.parent,
            part,
            exc,
        )
        return None
    return nested.to_text(merged)


def _merge(a: Any, b: Any, rank: int, path: str = "") -> Any:
    if "dict" in a and "dict" in b:
        out = {json.dumps(k): [k, v] for k, v in a["dict"]}
        for k, v in b["dict"]:
            key = json.dumps(k)  # 0 and "0" are different keys
            out[key] = [k, _merge(out[key][1], v, rank, f"{path}[{k!r}]")] if key in out else [k, v]
        return {"dict": list(out.values())}
    if a != b:
        raise _Conflict(
            f"rank_{rank} holds {str(b)[:60]} at {path or 'the root'}, a lower rank {str(a)[:60]}"
        )
    return a
