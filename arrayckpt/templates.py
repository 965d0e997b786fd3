"""JAX state: pytree templates (``load_checkpoint(..., into=params)``) and typed PRNG keys.

JAX arrays are immutable, so a JAX template is not filled in place (that is `fill`'s job,
for torch, NumPy and CuPy): the loaded leaves are matched to the template's leaves in
``jax.tree_util`` order and come back as new arrays in the template's tree structure
(namedtuples, dataclasses, optax states, Flax structs), dtypes and shardings. JAX is never
imported here: a state can only hold JAX arrays once the user has imported it.
"""

from __future__ import annotations

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
    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return None
    return str(jax.random.key_impl(x)), jax.random.key_data(x)


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
        isinstance(node, dict) and set(node) == {KEY_IMPL, KEY_DATA}
        and isinstance(node[KEY_IMPL], str)
    )


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

    Raises:
        InvalidInputError: the leaf counts, or a leaf's shape or dtype, differ (names the
            template path, as ``jax.tree_util.keystr`` writes it).
    """
    import jax  # is_jax_template found it in sys.modules: no new import

    with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    saved = jax.tree_util.tree_leaves(loaded)

    def fail(path: Any, problem: str) -> NoReturn:
        where = jax.tree_util.keystr(path) if path is not None else "the top"
        raise InvalidInputError(
            f"{source}: cannot load into the given template at {where or 'the top'}: {problem}"
        )

    if len(saved) != len(with_paths):
        first = with_paths[len(saved)][0] if len(with_paths) > len(saved) else None
        fail(
            first,
            f"the checkpoint has {len(saved)} leaves, the template {len(with_paths)}; "
            "pass a template of the saved state (e.g. optimizer.init(params))",
        )
    out = [_leaf(t, s, path, jax, fail) for (path, t), s in zip(with_paths, saved, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _leaf(t: Any, s: Any, path: Any, jax: Any, fail: Any) -> Any:
    if not isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
        return s  # a Python value of the template (a step count, a flag): the saved one
    shape = tuple(np.shape(s))
    if tuple(t.shape) != shape:
        fail(path, f"the checkpoint has shape {list(shape)}, the template {list(t.shape)}")
    if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
        if not isinstance(s, jax.Array) or s.dtype != t.dtype:
            fail(path, f"the template has a {t.dtype} PRNG key, the checkpoint {_dtype(s)}")
    elif np.dtype(_dtype(s)) != np.dtype(t.dtype):
        fail(path, f"the checkpoint has dtype {_dtype(s)}, the template {t.dtype}")
    sharding = getattr(t, "sharding", None)
    return jax.device_put(s, sharding) if sharding is not None else jax.numpy.asarray(s)


def _dtype(x: Any) -> Any:
    return getattr(x, "dtype", type(x).__name__)
