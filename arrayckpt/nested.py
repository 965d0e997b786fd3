"""Nested state (PyTorch state dicts, JAX/NumPy pytrees) as flat tensors plus a JSON tree.

A flat ``str -> array`` mapping is saved as it is (boostr's layout). Anything else is
flattened: each array goes to the safetensors file under a dotted name (``state.0.exp_avg``)
and the structure, with every non-array leaf (``lr``, ``betas``, ``None``, ...), goes to a
JSON tree stored in the same file's ``__metadata__``. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np

from .errors import CorruptCheckpointError, InvalidInputError, UnsupportedArrayError

#: The ``__metadata__`` key holding the tree of a nested state.
TREE_KEY = "arrayckpt.tree"
TREE_VERSION = 1

_SCALARS = (bool, int, float, str, type(None))
_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def is_array(x: Any) -> bool:
    """True for anything that is not a container or a Python scalar (NumPy scalars are arrays)."""
    if isinstance(x, np.generic):
        return True
    return not isinstance(x, (Mapping, list, tuple, *_SCALARS))


def is_flat(state: Any) -> bool:
    """True for a mapping of ``str`` to arrays: saved in boostr's flat layout, with no tree."""
    return isinstance(state, Mapping) and all(
        isinstance(k, str) and is_array(v) for k, v in state.items()
    )


def flatten(state: Any, *, what: str) -> tuple[dict[str, Any], str | None]:
    """Split ``state`` into ``{dotted name: array}`` and the JSON tree (``None`` when flat).

    Args:
        state: a flat mapping, or nested dicts (``str``/``int`` keys), lists and tuples
            whose leaves are arrays or JSON scalars (``int``, ``float`` incl. NaN/inf,
            ``bool``, ``None``, ``str``).
        what: ``"model_state"`` or ``"optimizer_state"``, for error messages.

    Raises:
        InvalidInputError: a key or leaf cannot be saved, or two paths flatten to one name.

    Examples:
        >>> import numpy as np
        >>> flat, tree = flatten({"state": {0: {"m": np.zeros(2)}}, "lr": 0.1}, what="x")
        >>> list(flat)
        ['state.0.m']
    """
    if is_flat(state):
        return dict(state), None
    if not isinstance(state, (Mapping, list, tuple)):
        raise InvalidInputError(
            f"{what} must be a mapping (or list/tuple) of arrays, not {type(state).__name__}"
        )
    flat: dict[str, Any] = {}
    paths: dict[str, str] = {}

    def encode(x: Any, parts: tuple[str, ...], path: str) -> Any:
        if isinstance(x, Mapping):
            items = []
            for k, v in x.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise InvalidInputError(
                        f"{what}{path}: key {k!r} is a {type(k).__name__}; keys must be str or int"
                    )
                items.append([k, encode(v, (*parts, str(k)), f"{path}[{k!r}]")])
            return {"dict": items}
        if isinstance(x, (list, tuple)):
            kind = "tuple" if isinstance(x, tuple) else "list"
            return {kind: [encode(v, (*parts, str(i)), f"{path}[{i}]") for i, v in enumerate(x)]}
        if is_array(x):
            name = ".".join(parts)
            if not name or "\x00" in name or name == "__metadata__":
                raise InvalidInputError(
                    f"{what}{path}: the tensor name {name!r} is not valid; use non-empty keys"
                )
            if name in flat:
                raise InvalidInputError(
                    f"{what}{path} and {what}{paths[name]} both flatten to the tensor name "
                    f"{name!r}; rename one of the keys"
                )
            flat[name], paths[name] = x, path
            return {"tensor": name}
        return _encode_scalar(x, f"{what}{path}")

    root = encode(state, (), "")
    doc = {"version": TREE_VERSION, "root": root}
    return flat, json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


#: Returned by a `map_arrays` function: leave this array out of the mapped state.
DROP: Any = object()


def map_arrays(state: Any, fn: Callable[[str, Any], Any]) -> Any:
    """``state`` with each array leaf replaced by ``fn(name, leaf)``, ``name`` being the
    tensor name `flatten` gives it; containers are rebuilt, scalars kept.

    A leaf for which ``fn`` returns `DROP` is left out: its dict key is omitted, or, in a
    list or tuple (whose later names would shift), it becomes ``None``. Used to keep only
    the shards a rank owns while the others keep their names.

    Example:
        >>> import numpy as np
        >>> map_arrays({"a": {"b": np.ones(1)}, "c": np.ones(1), "lr": 0.1},
        ...            lambda n, x: DROP if n == "c" else n)
        {'a': {'b': 'a.b'}, 'lr': 0.1}
    """

    def walk(x: Any, parts: tuple[str, ...]) -> Any:
        if isinstance(x, Mapping):
            out = {k: walk(v, (*parts, str(k))) for k, v in x.items()}
            return {k: v for k, v in out.items() if v is not DROP}
        if isinstance(x, (list, tuple)):
            items = [walk(v, (*parts, str(i))) for i, v in enumerate(x)]
            items = [None if v is DROP else v for v in items]
            return tuple(items) if isinstance(x, tuple) else items
        return fn(".".join(parts), x) if is_array(x) else x

    return walk(state, ())


def _encode_scalar(x: Any, where: str) -> Any:
    if x is None:
        return {"none": None}
    if isinstance(x, bool):
        return {"bool": x}
    if isinstance(x, int):
        return {"int": x}
    if isinstance(x, float):
        if math.isfinite(x):
            return {"float": x}
        return {"float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
    if isinstance(x, str):
        return {"str": x}
    raise UnsupportedArrayError(
        f"{where}: a {type(x).__name__} is neither an array nor a JSON scalar "
        "(int, float, bool, None, str); convert it before saving"
    )


def unflatten(
    tree: str, get: Callable[[str], Any], names: set[str], *, source: str
) -> Any:
    """Rebuild the nested state described by ``tree``, taking each tensor from ``get(name)``.

    ``names`` are the tensors the file holds; the tree must reference each exactly once.

    Raises:
        CorruptCheckpointError: the tree is malformed or does not match the file's tensors.
    """

    def fail(problem: str) -> NoReturn:
        raise CorruptCheckpointError(f"{source}: __metadata__[{TREE_KEY!r}] {problem}")

    try:
        doc = json.loads(tree)
    except (ValueError, RecursionError) as exc:
        fail(f"is not valid JSON: {exc}")
    if not isinstance(doc, dict) or doc.get("version") != TREE_VERSION or "root" not in doc:
        fail(f"must be an object with version {TREE_VERSION} and a root")
    used: set[str] = set()

    def decode(node: Any) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            fail(f"holds a malformed node {str(node)[:80]}")
        ((kind, value),) = node.items()
        if kind == "tensor":
            if not isinstance(value, str) or value not in names or value in used:
                fail(f"references tensor {value!r}, which the file lacks or which is repeated")
            used.add(value)
            return get(value)
        if kind == "dict" and isinstance(value, list):
            out = {}
            for pair in value:
                ok_key = isinstance(pair, list) and len(pair) == 2 and (
                    isinstance(pair[0], str) or type(pair[0]) is int
                )
                if not ok_key or pair[0] in out:
                    fail(f"holds a malformed or repeated dict entry {str(pair)[:80]}")
                out[pair[0]] = decode(pair[1])
            return out
        if kind in ("list", "tuple") and isinstance(value, list):
            items = [decode(v) for v in value]
            return tuple(items) if kind == "tuple" else items
        return _decode_scalar(kind, value, fail)

    try:
        root = decode(doc["root"])
    except RecursionError:
        fail("is nested too deeply")
    if used != names:
        fail(f"does not list the file's tensors {sorted(names - used)[:5]}")
    return root


def _decode_scalar(kind: str, value: Any, fail: Callable[[str], NoReturn]) -> Any:
    if kind == "none" and value is None:
        return None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and type(value) is int:
        return value
    if kind == "float":
        if isinstance(value, str) and value in _FLOAT_WORDS:
            return _FLOAT_WORDS[value]
        if type(value) in (int, float):
            return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    fail(f"holds a malformed {kind!r} leaf {str(value)[:80]}")


def leaves(tree: str) -> dict[str, Any]:
    """The non-array leaves of a tree by dotted path (for ``arrayckpt inspect``).

    Examples:
        >>> _, t = flatten({"param_groups": [{"lr": 0.1}]}, what="x")
        >>> leaves(t)
        {'param_groups.0.lr': 0.1}
    """
    out: dict[str, Any] = {}

    def walk(node: Any, parts: tuple[str, ...]) -> None:
        ((kind, value),) = node.items()
        if kind == "dict":
            for k, v in value:
                walk(v, (*parts, str(k)))
        elif kind in ("list", "tuple"):
            for i, v in enumerate(value):
                walk(v, (*parts, str(i)))
        elif kind != "tensor":
            out[".".join(parts)] = _FLOAT_WORDS.get(value, value) if kind == "float" else value

    walk(json.loads(tree)["root"], ())
    return out
