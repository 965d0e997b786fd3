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

from . import templates
from .errors import CorruptCheckpointError, InvalidInputError, UnsupportedArrayError
from .limits import MAX_TREE_DEPTH

#: The ``__metadata__`` key holding the tree of a nested state.
TREE_KEY = "arrayckpt.tree"
#: The ``__metadata__`` key holding the CRC32C of the tree's UTF-8 bytes (8 hex digits);
#: files from before it was recorded have none and load unchecked.
TREE_CHECKSUM_KEY = "arrayckpt.tree.crc32c"
TREE_VERSION = 1

_SCALARS = (bool, int, float, str, type(None))
_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
#: NumPy scalar types kept in the tree (as ``{"numpy": [dtype, value]}``), so they come
#: back as themselves whatever framework the arrays load into; every value is exact in JSON.
_NUMPY_SCALARS = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    ]
)


def is_array(x: Any) -> bool:
    """True for arrays of any framework (NumPy scalars included): things that export array
    data; False for containers, Python scalars and other objects (``Path``, ``set``, ``bytes``).
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return True
    if isinstance(x, (Mapping, list, tuple, *_SCALARS, bytes, bytearray, memoryview)):
        return False
    return any(
        hasattr(x, attr)
        for attr in (
            "__dlpack__",
            "__array_namespace__",
            "__cuda_array_interface__",
            "__array__",
            "__array_interface__",
            "untyped_storage",
        )
    )


def _is_tree_scalar(x: Any) -> bool:
    return isinstance(x, np.generic) and x.dtype.name in _NUMPY_SCALARS


def checksum_of(tree: str) -> str:
    """The CRC32C recorded for a tree."""
    from .format import json_checksum  # format imports the safetensors bindings: only on use

    return json_checksum(tree)


def tree_metadata(tree: str | None) -> dict[str, str] | None:
    """The ``__metadata__`` entries that record ``tree`` (``None`` for a flat state)."""
    return None if tree is None else {TREE_KEY: tree, TREE_CHECKSUM_KEY: checksum_of(tree)}


def tree_text(metadata: Mapping[str, str], *, source: str) -> str | None:
    """The tree a file's ``__metadata__`` records, checked against its CRC32C; ``None``
    for a flat state.

    Raises:
        CorruptCheckpointError: the tree does not match its checksum.
    """
    tree = metadata.get(TREE_KEY)
    recorded = metadata.get(TREE_CHECKSUM_KEY)
    if tree is None:
        if recorded is not None:
            raise CorruptCheckpointError(
                f"{source}: __metadata__ records a tree checksum but no {TREE_KEY!r}; "
                "restore another checkpoint"
            )
        return None
    if recorded is not None and recorded != checksum_of(tree):
        raise CorruptCheckpointError(
            f"{source}: __metadata__[{TREE_KEY!r}] (the nested structure and its values) "
            "fails its CRC32C checksum: the file is corrupt; restore another checkpoint"
        )
    return tree


def is_flat(state: Any) -> bool:
    """True for a mapping of ``str`` to arrays: saved in boostr's flat layout, with no tree."""
    return isinstance(state, Mapping) and all(
        isinstance(k, str) and is_array(v) and templates.key_parts(v) is None
        for k, v in state.items()
    )


def is_plain_numpy_dict(state: Any) -> bool:
    """`is_flat` for the common case, in C-level passes: a dict of ``str`` to plain NumPy
    arrays (at 20,000 tensors, `is_flat`'s per-tensor checks cost more than the copy)."""
    return (
        type(state) is dict
        and bool(state)
        and set(map(type, state.values())) == {np.ndarray}
        and set(map(type, state)) == {str}
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
    if is_plain_numpy_dict(state) or is_flat(state):
        return dict(state), None
    if not isinstance(state, (Mapping, list, tuple)):
        raise InvalidInputError(
            f"{what} must be a mapping (or list/tuple) of arrays, not {type(state).__name__}"
        )
    flat: dict[str, Any] = {}
    paths: dict[str, tuple[Any, ...]] = {}

    def where(keys: tuple[Any, ...]) -> str:
        # Built only for an error message: formatting every node's path cost as much as
        # the rest of the walk.
        return "".join(f"[{k!r}]" for k in keys)

    def encode(x: Any, keys: tuple[Any, ...]) -> Any:
        # ``keys``: the keys and indices from the root to ``x``; its tensor name joins their
        # str(), its path in messages their repr(). Called for what is not `is_leaf`: most
        # leaves are, and their type answers every test below.
        if type(x) is dict or isinstance(x, (Mapping, list, tuple)):
            if len(keys) >= MAX_TREE_DEPTH:
                raise InvalidInputError(
                    f"{what}{_short(where(keys))}: nested deeper than {MAX_TREE_DEPTH} levels "
                    "(a container that holds itself?); flatten that part into a dict of "
                    "arrays before saving"
                )
            if isinstance(x, Mapping):
                items = []
                for k, v in x.items():
                    if isinstance(k, bool) or not isinstance(k, (str, int)):
                        raise InvalidInputError(
                            f"{what}{where(keys)}: key {k!r} is a {type(k).__name__}; keys "
                            "must be str or int"
                        )
                    # an array leaf without a call of `encode` (most children are)
                    here = (*keys, k)
                    items.append([k, tensor(v, here) if is_leaf(v) else encode(v, here)])
                return {"dict": items}
            kind = "tuple" if isinstance(x, tuple) else "list"
            return {
                kind: [
                    tensor(v, (*keys, i)) if is_leaf(v) else encode(v, (*keys, i))
                    for i, v in enumerate(x)
                ]
            }
        key = templates.key_parts(x)
        if key is not None:  # safetensors has no key dtype: save its impl and raw data
            # (key data is a plain array, but `encode` walks the dict it is put in)
            return encode({templates.KEY_IMPL: key[0], templates.KEY_DATA: key[1]}, keys)
        children = templates.pytree_children(x)
        if children is not None:  # a dataclass, Flax struct or NNX Variable: its fields
            return encode(dict(children), keys)
        if _is_tree_scalar(x):
            return {"numpy": [x.dtype.name, scalar(x.item(), keys)]}
        if is_array(x):
            return tensor(x, keys)
        return scalar(x, keys)

    zeros = []

    def scalar(x: Any, keys: tuple[Any, ...]) -> Any:
        if isinstance(x, float) and x == 0:
            zeros.append(x)  # 0.0 == -0.0: the tree text is not reused (see `_texts`)
        try:
            return _encode_scalar(x)
        except UnsupportedArrayError as exc:
            raise UnsupportedArrayError(f"{what}{where(keys)}: {exc}") from None

    def tensor(x: Any, keys: tuple[Any, ...]) -> dict[str, str]:
        name = ".".join(map(str, keys))
        if not name or "\x00" in name or name == "__metadata__":
            raise InvalidInputError(
                f"{what}{where(keys)}: the tensor name {name!r} is not valid; use non-empty keys"
            )
        if name in flat:
            raise InvalidInputError(
                f"{what}{where(keys)} and {what}{where(paths[name])} both flatten to the "
                f"tensor name {name!r}; rename one of the keys"
            )
        flat[name], paths[name] = x, keys
        return {"tensor": name}

    is_leaf = templates.is_array_leaf
    root = encode(state, ())
    if zeros:
        return flat, to_text(root)
    # The tree text of an equal root is the same text: comparing takes a fraction of the
    # time writing it out does (a state saved again, or every step, has the same tree).
    # Equal JSON values write the same but for signed zeros, which skip this.
    for seen, text in tuple(_texts):
        if seen == root:
            return flat, text
    text = to_text(root)
    _texts[:] = [(root, text), *_texts[: _MAX_TEXTS - 1]]
    return flat, text


#: The (root, text) of the trees `flatten` wrote last, newest first (a save writes up to
#: three: model, optimizer, extra).
_texts: list[tuple[Any, str]] = []
_MAX_TEXTS = 6


#: Returned by a `map_arrays` function: leave this array out of the mapped state.
DROP: Any = object()


def map_arrays(state: Any, fn: Callable[[str, Any], Any]) -> Any:
    """``state`` with each array leaf replaced by ``fn(name, leaf)``, ``name`` being the
    tensor name `flatten` gives it; containers are rebuilt, scalars kept.

    A leaf for which ``fn`` returns `DROP` is left out: its dict key is omitted, or, in a
    list or tuple (whose later names would shift), it becomes ``None``. Used to keep only
    the shards a rank owns while the others keep their names.

    Examples:
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


def _short(path: str) -> str:
    return path if len(path) <= 120 else f"{path[:60]}...{path[-60:]}"


def _encode_scalar(x: Any) -> Any:
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
        f"a {type(x).__module__}.{type(x).__qualname__} is neither an array nor a "
        "JSON value (int, float, bool, None, str); convert it before saving (str(path), "
        "list(a_set), an np.frombuffer of bytes)"
    )


Node = dict[str, Any]


def parse(tree: str, *, source: str) -> Node:
    """Validate the whole tree and return its root node; the one reader of the grammar.

    Checks every node's kind and value, the depth (`MAX_TREE_DEPTH`) and that no tensor is
    referenced twice, so every walker after it (`unflatten`, `leaves`, the distributed
    merge) may trust what it walks.

    Raises:
        CorruptCheckpointError: naming ``source`` and the malformed node.
    """

    def fail(problem: str) -> NoReturn:
        raise CorruptCheckpointError(f"{source}: __metadata__[{TREE_KEY!r}] {problem}")

    try:
        doc = json.loads(tree)
    except RecursionError:
        fail(f"is nested deeper than {MAX_TREE_DEPTH} levels")
    except ValueError as exc:
        fail(f"is not valid JSON: {exc}")
    if not isinstance(doc, dict) or doc.get("version") != TREE_VERSION or "root" not in doc:
        fail(f"must be an object with version {TREE_VERSION} and a root")
    used: set[str] = set()

    def check(node: Any, depth: int) -> None:
        if depth > MAX_TREE_DEPTH:
            fail(f"is nested deeper than {MAX_TREE_DEPTH} levels")
        if not isinstance(node, dict) or len(node) != 1:
            fail(f"holds a malformed node {str(node)[:80]}")
        ((kind, value),) = node.items()
        if kind == "tensor":
            if not isinstance(value, str) or value in used:
                fail(f"references tensor {value!r} twice (or by a non-string)")
            used.add(value)
        elif kind == "dict" and isinstance(value, list):
            keys: set[tuple[type, Any]] = set()
            for pair in value:
                ok = (
                    isinstance(pair, list)
                    and len(pair) == 2
                    and (isinstance(pair[0], str) or type(pair[0]) is int)
                )
                if not ok or (type(pair[0]), pair[0]) in keys:
                    fail(f"holds a malformed or repeated dict entry {str(pair)[:80]}")
                keys.add((type(pair[0]), pair[0]))
                check(pair[1], depth + 1)
        elif kind in ("list", "tuple") and isinstance(value, list):
            for v in value:
                check(v, depth + 1)
        elif kind == "numpy":
            ok = isinstance(value, list) and len(value) == 2 and value[0] in _NUMPY_SCALARS
            if not ok or not isinstance(value[1], dict) or len(value[1]) != 1:
                fail(f"holds a malformed 'numpy' leaf {str(value)[:80]}")
            ((inner, scalar),) = value[1].items()
            _decode_scalar(inner, scalar, fail)
        else:
            _decode_scalar(kind, value, fail)

    try:
        check(doc["root"], 0)
    except RecursionError:
        fail(f"is nested deeper than {MAX_TREE_DEPTH} levels")
    return dict(doc["root"])


def tensors_of(node: Node) -> list[str]:
    """The tensor names a (parsed) node references, in tree order."""
    ((kind, value),) = node.items()
    if kind == "tensor":
        return [value]
    if kind == "dict":
        return [n for _, v in value for n in tensors_of(v)]
    if kind in ("list", "tuple"):
        return [n for v in value for n in tensors_of(v)]
    return []


def to_text(root: Node) -> str:
    """The tree text of a (parsed or merged) root node, as `flatten` writes it."""
    doc = {"version": TREE_VERSION, "root": root}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check_names(root: Node, names: set[str], *, source: str) -> None:
    """The tree must reference exactly the file's tensors ``names``.

    Raises:
        CorruptCheckpointError: a tensor is missing from the file or from the tree.
    """
    used = set(tensors_of(root))
    if used != names:
        lacking, unlisted = sorted(used - names)[:5], sorted(names - used)[:5]
        raise CorruptCheckpointError(
            f"{source}: __metadata__[{TREE_KEY!r}] does not match the file's tensors: it "
            f"references {lacking}, which the file lacks, and does not list {unlisted}"
        )


def unflatten(tree: str, get: Callable[[str], Any], names: set[str], *, source: str) -> Any:
    """Rebuild the nested state described by ``tree``, taking each tensor from ``get(name)``.

    ``names`` are the tensors the file holds; the tree must reference each exactly once.
    JSON values come back as the Python (or NumPy scalar) values they were saved as.

    Raises:
        CorruptCheckpointError: the tree is malformed or does not match the file's tensors.
    """
    root = parse(tree, source=source)
    check_names(root, names, source=source)

    def fail(problem: str) -> NoReturn:
        raise AssertionError(problem)  # parse() accepted the tree: unreachable

    def build(node: Node) -> Any:
        ((kind, value),) = node.items()
        if kind == "tensor":
            return get(value)
        if kind == "dict":
            d = {k: build(v) for k, v in value}
            return templates.wrap_key(d) if templates.is_saved_key(d) else d
        if kind in ("list", "tuple"):
            items = [build(v) for v in value]
            return tuple(items) if kind == "tuple" else items
        return _leaf(kind, value, fail)

    return build(root)


def _leaf(kind: str, value: Any, fail: Callable[[str], NoReturn]) -> Any:
    if kind == "numpy":
        ((inner, scalar),) = value[1].items()
        return np.dtype(value[0]).type(_decode_scalar(inner, scalar, fail))
    return _decode_scalar(kind, value, fail)


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


def leaves(tree: str, *, source: str = "tree") -> dict[str, Any]:
    """The non-array leaves of a tree by dotted path (for ``arrayckpt inspect``).

    Raises:
        CorruptCheckpointError: the tree is malformed.

    Examples:
        >>> _, t = flatten({"param_groups": [{"lr": 0.1}]}, what="x")
        >>> leaves(t)
        {'param_groups.0.lr': 0.1}
    """
    out: dict[str, Any] = {}

    def fail(problem: str) -> NoReturn:
        raise AssertionError(problem)  # parse() accepted the tree: unreachable

    def walk(node: Node, parts: tuple[str, ...]) -> None:
        ((kind, value),) = node.items()
        if kind == "dict":
            for k, v in value:
                walk(v, (*parts, str(k)))
        elif kind in ("list", "tuple"):
            for i, v in enumerate(value):
                walk(v, (*parts, str(i)))
        elif kind != "tensor":
            out[".".join(parts)] = _leaf(kind, value, fail)

    walk(parse(tree, source=source), ())
    return out
