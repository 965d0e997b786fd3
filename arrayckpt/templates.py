"""JAX state: pytree templates (``load_checkpoint(..., into=params)``) and typed PRNG keys.

JAX arrays are immutable, so a JAX template is not filled in place (that is `fill`'s job,
for torch, NumPy and CuPy): the loaded leaves are matched to the template's leaves in
``jax.tree_util`` order and come back as new arrays in the template's tree structure
(namedtuples, dataclasses, optax states, Flax structs), dtypes and shardings. JAX is never
imported here: a state can only hold JAX arrays once the user has imported it.
"""

from __future__ import annotations

import math
import sys
from typing import Any, NoReturn

import numpy as np

from .errors import InvalidInputError

#: The keys of the dict a typed PRNG key is saved as: its implementation's name and its
#: raw ``uint32`` key data (safetensors has no key dtype).
KEY_IMPL = "jax.random.key"
KEY_DATA = "key_data"


def key_parts(x: Any) -> tuple[str, Any] | None:
    """``(implementation name, key data)`` for a typed JAX PRNG key, else ``None``."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(x, jax.Array):
        return None
    if not _is_key_dtype(x.dtype, jax):
        return None
    return str(jax.random.key_impl(x)), jax.random.key_data(x)


#: Per dtype, whether it is a PRNG key's: `jax.dtypes.issubdtype` takes microseconds,
#: once per array of every save otherwise. Dtypes are immutable, hashable values.
_key_dtypes: dict[Any, bool] = {}


def _is_key_dtype(dtype: Any, jax: Any) -> bool:
    found = _key_dtypes.get(dtype)
    if found is None:
        found = _key_dtypes[dtype] = bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    return found


#: Array types whose instances jax.tree_util treats as leaves (`pytree_children` of none
#: of them has children), learnt from jax itself: flattening each array of a state, once
#: per save, cost more than the rest of its walk.
_leaf_types: set[type] = set()


#: Builtin types of a state's containers and scalars, which are never arrays (exact
#: types: a subclass may be anything).
_NOT_ARRAYS = frozenset([dict, list, tuple, str, int, float, bool, type(None)])


def is_array_leaf(x: Any) -> bool:
    """True for a plain NumPy array or a JAX array that is not a typed PRNG key: a tensor
    leaf of a state (neither a container, a pytree node, a key nor a scalar)."""
    kind = type(x)
    if kind is np.ndarray:
        return True
    if kind in _NOT_ARRAYS:
        return False
    if kind not in _leaf_types:
        jax = sys.modules.get("jax")
        if jax is None or not isinstance(x, jax.Array) or pytree_children(x) is not None:
            return False
        _leaf_types.add(kind)
    return not _is_key_dtype(x.dtype, sys.modules["jax"])


def wrap_key(saved: dict[Any, Any]) -> Any:
    """The typed key a saved ``{KEY_IMPL: name, KEY_DATA: data}`` dict stands for; the dict
    itself when JAX is not imported (a NumPy-only reader gets the raw key data)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return saved
    return jax.random.wrap_key_data(np.asarray(saved[KEY_DATA]), impl=saved[KEY_IMPL])


def is_saved_key(node: Any) -> bool:
    """True for the dict `key_parts` is saved as."""
    return (
        isinstance(node, dict)
        and set(node) == {KEY_IMPL, KEY_DATA}
        and isinstance(node[KEY_IMPL], str)
    )


def pytree_children(x: Any) -> list[tuple[str | int, Any]] | None:
    """The named children of a registered JAX pytree node other than a dict, list or tuple
    (a dataclass, a Flax struct), saved as a dict of them; ``None`` for anything else."""
    jax = sys.modules.get("jax")
    if jax is None or x is None:
        return None
    children, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda n: n is not x)
    if jax.tree_util.treedef_is_leaf(treedef):
        return None
    return [(_key_name(path[0]), child) for path, child in children]


def _key_name(entry: Any) -> str | int:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
        value = getattr(entry, attr, None)
        if isinstance(value, (str, int)):
            return value
    return str(entry)


def is_jax_template(template: Any) -> bool:
    """True when ``template`` holds JAX arrays or ``jax.ShapeDtypeStruct`` leaves."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    return any(
        isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))
        for leaf in jax.tree_util.tree_leaves(template)
    )


def restore(template: Any, loaded: Any, *, source: str) -> Any:
    """``loaded`` (the saved state, NumPy leaves) rebuilt with ``template``'s structure,
    as JAX arrays of its leaves' dtypes on their shardings.

    The two are walked together: a saved dict's entries are found by name (a dataclass or
    Flax struct was saved as a dict of its fields), a list's or tuple's by position (a
    namedtuple was saved as a tuple).

    Raises:
        InvalidInputError: the structures, or a leaf's shape or dtype, differ (names the
            template path, as ``jax.tree_util.keystr`` writes it).
    """
    import jax  # is_jax_template found it in sys.modules: no new import

    def fail(path: tuple[Any, ...], problem: str) -> NoReturn:
        where = jax.tree_util.keystr(path) or "the top"
        raise InvalidInputError(
            f"{source}: cannot load into the given template at {where}: {problem}"
        )

    def build(t: Any, s: Any, path: tuple[Any, ...]) -> Any:
        children, treedef = jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda n: n is not t)
        if t is not None and jax.tree_util.treedef_is_leaf(treedef):
            return _leaf(t, s, path, jax, fail)
        out = []
        for i, (key, child) in enumerate(children):
            where = (*path, *key)
            # a saved dict is looked up by name (a dataclass was saved as one); a saved
            # list or tuple by position (a namedtuple was saved as a tuple)
            if isinstance(s, dict):
                name = _key_name(key[0])
                if name not in s:
                    fail(
                        where,
                        f"the checkpoint has no {name!r} here (it has {sorted(map(str, s))[:5]})",
                    )
                out.append(build(child, s[name], where))
            elif isinstance(s, (list, tuple)) and len(s) == len(children):
                out.append(build(child, s[i], where))
            else:
                fail(
                    path,
                    f"the template has {len(children)} children here, the checkpoint {s!r:.60}",
                )
        if isinstance(s, dict) and len(s) != len(children):
            fail(path, f"the checkpoint has {len(s)} entries here, the template {len(children)}")
        return jax.tree_util.tree_unflatten(treedef, out)

    return build(template, loaded, ())


def _leaf(t: Any, s: Any, path: Any, jax: Any, fail: Any) -> Any:
    from .distributed.jax_restore import SavedTensor, whole  # loaded with arrayckpt

    if not isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
        # a Python value of the template (a step count, a flag, ``...``): the saved one
        return whole(s)
    saved = isinstance(s, SavedTensor)  # not read yet: placed box by box below
    if not (saved or isinstance(s, (jax.Array, np.ndarray, np.generic))):
        fail(path, f"the template has an array, the checkpoint {s!r:.60}")
    shape = tuple(s.shape) if saved else tuple(np.shape(s))
    larger = math.prod(t.shape) > math.prod(shape)
    named = f" ({'larger than ' if larger else ''}the saved tensor {s.name!r})" if saved else ""
    if tuple(t.shape) != shape:
        fail(path, f"the checkpoint has shape {list(shape)}, the template {list(t.shape)}{named}")
    if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
        if not isinstance(s, jax.Array) or s.dtype != t.dtype:
            fail(path, f"the template has a {t.dtype} PRNG key, the checkpoint {_dtype(s)}")
    elif np.dtype(_dtype(s)) != np.dtype(t.dtype):
        fail(path, f"the checkpoint has dtype {_dtype(s)}, the template {t.dtype}{named}")
    if saved:
        return s.place(t)  # each device reads only its box
    sharding = getattr(t, "sharding", None)
    return jax.device_put(s, sharding) if sharding is not None else jax.numpy.asarray(s)


def _dtype(x: Any) -> Any:
    return getattr(x, "dtype", type(x).__name__)
