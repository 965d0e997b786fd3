"""Loading into existing arrays (``load_checkpoint(..., into=model.state_dict())``).

Resuming this way allocates nothing for the state: each saved tensor is read from the
file straight into the host array that already holds it (a device array gets it through
one tensor-sized host buffer at a time), so the load holds no copy of the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, NoReturn

import numpy as np

from . import aliases, backends, dtypes, nested
from .errors import InvalidInputError
from .format import SafetensorsReader


class _TensorRef:
    """Stands for a saved tensor while the saved structure is walked beside the target."""

    def __init__(self, name: str) -> None:
        self.name = name


def fill(target: Any, reader: SafetensorsReader, *, verify: bool) -> Any:
    """Copy every tensor of ``reader``'s file into the matching array of ``target``.

    ``target`` must have the saved structure: the same keys, list lengths and tensor
    shapes and dtypes. Non-array leaves in dicts and lists are set to the saved values.

    Returns:
        ``target`` itself, filled.

    Raises:
        InvalidInputError: the structures, shapes or dtypes differ (names the path), or an
            array cannot be written in place (a JAX template never comes here: see `templates`).
        CorruptCheckpointError: a tensor fails its checksum; ``target`` may be partly filled.
    """
    source = str(reader.path)
    tree = nested.tree_text(reader.header.metadata, source=source)
    tied = aliases.read(reader.header.metadata, reader.header.entries, source=source)
    names = {*reader.names, *tied}
    if tree is None:
        saved: Any = {name: _TensorRef(name) for name in names}
    else:
        saved = nested.unflatten(tree, _TensorRef, names, source=source)

    def fail(path: str, problem: str) -> NoReturn:
        raise InvalidInputError(
            f"{source}: cannot load into the given state at {path or 'the top'}: {problem}"
        )

    def walk(s: Any, t: Any, path: str) -> None:
        if isinstance(s, _TensorRef):
            _fill_one(t, reader, tied.get(s.name, s.name), s.name, verify, lambda p: fail(path, p))
            return
        if isinstance(s, dict):
            if not isinstance(t, Mapping):
                fail(path, f"the checkpoint has a dict, the target a {type(t).__name__}")
            if set(s) != set(t):
                missing = sorted(map(str, set(s) - set(t)))[:5]
                extra = sorted(map(str, set(t) - set(s)))[:5]
                fail(path, f"keys differ: target lacks {missing}, has unexpected {extra}")
            for k, v in s.items():
                place(v, t, k, f"{path}[{k!r}]")
            return
        if isinstance(s, (list, tuple)):
            if not isinstance(t, (list, tuple)) or len(t) != len(s):
                fail(path, f"the checkpoint has a sequence of {len(s)}, the target {t!r:.60}")
            for i, v in enumerate(s):
                place(v, t, i, f"{path}[{i}]")
            return
        raise AssertionError(f"unexpected node {s!r}")

    def place(s: Any, container: Any, key: Any, path: str) -> None:
        if isinstance(s, (_TensorRef, dict, list, tuple)):
            walk(s, container[key], path)
        elif not _same(s, container[key]):
            if not isinstance(container, (MutableMapping, list)):
                fail(path, f"saved {s!r} differs from {container[key]!r} in an immutable tuple")
            container[key] = s

    walk(saved, target, "")
    return target


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


def _fill_one(
    dst: Any,
    reader: SafetensorsReader,
    stored: str,
    name: str,
    verify: bool,
    fail: Callable[[str], NoReturn],
) -> None:
    """Tensor ``stored`` of the file into ``dst`` (the target's ``name``): read straight
    into ``dst``'s memory when it is a host array the bytes can land in, else read on its
    own and copied (to a device, or across a layout), so a load holds at most one
    tensor besides the targets."""
    e = reader.header.entries[stored]
    if not e.dtype.known or not e.dtype.name:  # reader.array() explains, or gives raw bytes
        _copy_into(dst, reader.array(stored, verify=verify), name, fail)
        return
    backend = _checked(dst, e.dtype.numpy, e.shape, name, fail)
    view = _host_bytes(dst, backend, e.dtype, name)
    if view is None:
        _copy_into(dst, reader.array(stored, verify=verify), name, fail)
    else:
        reader.read_into(stored, view, verify=verify)


def _host_bytes(dst: Any, backend: backends.Backend, dtype: dtypes.DType, name: str) -> Any:
    """``dst``'s own memory as a flat ``uint8`` array holding its bytes in file order (a
    writable, C-contiguous, little-endian host array), or ``None``."""
    view = backend.host_view(dst, name, dtype)
    if view is None or not view.flags.writeable or not view.size:
        return None
    return view.reshape(-1).view(np.uint8)


def _checked(
    dst: Any,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    name: str,
    fail: Callable[[str], NoReturn],
) -> backends.Backend:
    """``dst``'s backend, once ``dst`` is checked to be an array of the saved dtype and
    shape that can be written in place."""
    if not nested.is_array(dst):
        fail(f"tensor {name!r} goes into a {type(dst).__name__}, which is not an array")
    backend = backends.for_array(dst, name)
    want = dtypes.from_numpy(dtype, tensor=name)
    have = backend.dtype(dst, name)
    if have != want or backend.shape(dst) != tuple(shape):
        fail(
            f"tensor {name!r} is {want.code}{list(shape)} in the checkpoint but "
            f"{have.code}{list(backend.shape(dst))} in the target"
        )
    if backend.name == "numpy" and (not isinstance(dst, np.ndarray) or not dst.flags.writeable):
        fail(f"tensor {name!r}: the target NumPy array is read-only")
    if backend.name not in ("numpy", "torch", "cupy"):
        fail(
            f"tensor {name!r}: a {type(dst).__module__}.{type(dst).__qualname__} cannot be "
            "written in place; load without into="
        )
    return backend


def _copy_into(dst: Any, src: np.ndarray, name: str, fail: Callable[[str], NoReturn]) -> None:
    backend = _checked(dst, src.dtype, tuple(src.shape), name, fail)
    if backend.name == "numpy":
        np.copyto(dst, src, casting="equiv")
    elif backend.name == "torch":
        import torch

        with torch.no_grad():
            dst.copy_(backend.from_host(src, None))
    else:
        dst.set(np.ascontiguousarray(src))
