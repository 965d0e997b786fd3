"""What a save learns about a state's tensors, kept for the next save of the same arrays.

A training loop saves one dict of the same arrays again and again, and with 20,000 small
tensors the per-tensor checks (tied tensors, backends, dtypes, the writer's limits) cost
several times the copy itself. An `Entry` records their results for one flat mapping of
plain NumPy arrays; a later save reuses it only when every name is the same and every
array is the same object with the same shape, strides and dtype. Arrays are held by weak
reference: the cache never keeps a state alive.

The check does not read data pointers: an array's data cannot move while it is the same
object, but through what NumPy refuses or deprecates. ``resize`` raises for an array with
weak references (the entry's), and assigning ``data`` works only before NumPy 2 (with a
DeprecationWarning). Every save copies each array's current bytes whatever its pointer;
only a tie made that way would go unseen (both arrays stored, each with its values).

A flat mapping of JAX arrays gets an entry too (`Entry.immutable`): a jax.Array cannot
change, so the same object is all a later save checks, but for one thing: an array deleted
(or donated) since is refused as a fresh save would refuse it. The entry keeps no host view
of them: a NumPy view of a JAX buffer keeps its jax.Array alive, so a kept view would keep
every state the cache has seen.
"""

from __future__ import annotations

import operator
import sys
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import nested, templates

#: Entries kept (a save makes up to three: model, optimizer, extra); the oldest goes first.
MAX_ENTRIES = 6

#: What must be unchanged for an array's cached facts to hold (compared one attribute at
#: a time: a tuple of the three per array costs half as much again).
_shape = operator.attrgetter("shape")
_strides = operator.attrgetter("strides")
_dtype = operator.attrgetter("dtype")


@dataclass(eq=False)
class Entry:
    """Facts about one flat state; each is filled in by the step that computes it."""

    keys: list[str]
    refs: list[weakref.ref[np.ndarray]]
    shapes: list[tuple[int, ...]]
    strides: list[tuple[int, ...]]
    array_dtypes: list[np.dtype[Any]]
    #: ``{alias: stored name}`` (see `aliases.find_aliases`).
    aliases: dict[str, str] | None = None
    #: Per stored (non-alias) tensor, in order: its backend and its dtype (see `snapshot`).
    backends: list[Any] | None = None
    dtypes: list[Any] | None = None
    #: Which stored tensors go to the staging slab, and (their count, the slab's layout).
    small: np.ndarray | None = None
    slab_layout: tuple[int, Any] | None = None
    #: The trees (``None``: flat) the writer's limits were checked with.
    writable: set[str | None] = field(default_factory=set)
    #: Whether no stored tensor is shared as an immutable view, and none staged in pinned
    #: memory (their backends' answers for these arrays; see `snapshot`).
    shares_nothing: bool = False
    pins_nothing: bool = False
    #: JAX arrays (see the module docstring): matched by identity alone.
    immutable: bool = False
    #: Whether every stored tensor is shared as an immutable view (see `snapshot`).
    shares_all: bool = False

    def matches(self, keys: list[str], values: list[Any]) -> bool:
        if self.immutable:
            return (
                len(self.keys) == len(keys)
                and self.keys == keys
                and all(map(operator.is_, map(operator.call, self.refs), values))
                and not any(map(_is_deleted, values))
            )
        # Each attribute is dropped once compared: a list of them would set off the garbage
        # collector's young-generation passes (one per 700 new tuples) in the caller's stall.
        # Identity first: a replaced array fails there, before any attribute is read. The
        # same objects are the plain arrays this entry was made for (an ndarray's class
        # cannot be reassigned), and an equal key behaves as the one checked.
        return (
            len(self.keys) == len(keys)
            and self.keys == keys
            and all(map(operator.is_, map(operator.call, self.refs), values))
            and all(map(operator.eq, map(_shape, values), self.shapes))
            and all(map(operator.eq, map(_strides, values), self.strides))
            and all(map(operator.eq, map(_dtype, values), self.array_dtypes))
        )


_entries: list[Entry] = []
_lock = threading.Lock()


def entry_for(flat: Mapping[str, Any]) -> Entry | None:
    """The entry of ``flat``: an earlier one when nothing in it changed, else a new, empty
    one; ``None`` unless every key is a ``str`` and every value a plain `numpy.ndarray`
    (other arrays' memory can move without their shape changing)."""
    if type(flat) is not dict:
        return None
    keys = list(flat)
    values = list(flat.values())
    with _lock:
        for i, entry in enumerate(_entries):
            if entry.matches(keys, values):
                _entries.insert(0, _entries.pop(i))
                return entry
        if nested.is_plain_numpy_dict(flat):
            entry = Entry(
                keys,
                list(map(weakref.ref, values)),
                list(map(_shape, values)),
                list(map(_strides, values)),
                list(map(_dtype, values)),
            )
        elif _is_plain_jax_dict(flat) and not any(map(_is_deleted, values)):
            entry = Entry(keys, list(map(weakref.ref, values)), [], [], [], immutable=True)
        else:
            return None
        # An entry whose first array is gone can never match again (~250 bytes a tensor)
        _entries[:] = [entry, *(e for e in _entries if e.refs[0]() is not None)]
        del _entries[MAX_ENTRIES:]
        return entry


_is_deleted = operator.methodcaller("is_deleted")


def _is_plain_jax_dict(flat: dict[str, Any]) -> bool:
    """A non-empty dict of ``str`` to JAX arrays that are tensor leaves (no PRNG keys)."""
    jax = sys.modules.get("jax")
    if jax is None or not flat or set(map(type, flat)) != {str}:
        return False
    kinds = set(map(type, flat.values()))
    return all(issubclass(kind, jax.Array) for kind in kinds) and all(
        map(templates.is_array_leaf, flat.values())
    )


class CheckedState(dict[str, Any]):
    """A flat state handed from one validation step to the next with its `Entry`, so the
    next step need not check the arrays again."""

    __slots__ = ("entry",)

    def __init__(self, items: Any, entry: Entry) -> None:
        super().__init__(items)
        self.entry = entry


class CheckedPlan(list[Any]):
    """A plan (see `snapshot._plan`) with the `Entry` of its state."""

    __slots__ = ("entry",)

    def __init__(self, items: Any, entry: Entry) -> None:
        super().__init__(items)
        self.entry = entry
