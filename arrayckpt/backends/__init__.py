"""Framework adapters, looked up lazily: a framework is imported only once its arrays appear.

Like array-api-compat, detection reads the type's module name; nothing is imported to ask.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InvalidInputError, UnsupportedArrayError
from .base import Backend

__all__ = ["Backend", "for_array", "for_namespace", "pinned_empty"]

# Names users pass as `xp=`, mapped to the module to import.
_NAMESPACE_ALIASES = {"np": "numpy", "jax": "jax.numpy", "jnp": "jax.numpy"}


@cache
def _numpy() -> Backend:
    from .numpy import NumpyBackend

    return NumpyBackend()


@cache
def _torch() -> Backend:
    from .torch import TorchBackend

    return TorchBackend()


@cache
def _cupy() -> Backend:
    from .cupy import CupyBackend

    return CupyBackend()


@cache
def _generic(xp: ModuleType | None = None) -> Backend:
    from .generic import GenericBackend

    return GenericBackend(xp)


def for_array(x: Any, key: str) -> Backend:
    """The backend that reads ``x``.

    Raises:
        UnsupportedArrayError: naming ``key`` and the type, when ``x`` is not an array.
    """
    module = type(x).__module__
    root = module.partition(".")[0]
    if module.startswith("numpy.ma"):
        # np.asarray would keep the data and silently drop the mask.
        raise UnsupportedArrayError(
            f"tensor {key!r}: a NumPy masked array would lose its mask; save "
            "x.filled() or x.data and np.ma.getmaskarray(x) as two arrays"
        )
    if root == "numpy" and isinstance(x, (np.ndarray, np.generic)):
        return _numpy()
    if root == "torch" and hasattr(x, "untyped_storage"):
        return _torch()
    if root == "cupy":
        return _cupy()
    if root not in ("builtins", "numpy", "torch") and (
        hasattr(x, "__dlpack__") or hasattr(x, "__array_namespace__")
    ):
        return _generic()
    raise UnsupportedArrayError(
        f"tensor {key!r}: a {type(x).__module__}.{type(x).__qualname__} is not an array; "
        "pass NumPy, PyTorch, CuPy or array-API/DLPack arrays"
    )


def for_namespace(xp: ModuleType | str | None) -> Backend:
    """The backend that builds arrays of namespace ``xp`` (a module, its name, or None=NumPy)."""
    if xp is None:
        return _numpy()
    if isinstance(xp, str):
        name = _NAMESPACE_ALIASES.get(xp, xp)
        try:
            xp = importlib.import_module(name)
        except ImportError as exc:
            raise InvalidInputError(f"xp={name!r}: cannot import it ({exc})") from exc
    if not isinstance(xp, ModuleType):
        raise InvalidInputError(f"xp must be a module or its name, not {type(xp).__name__}")
    name = xp.__name__
    if name.startswith("array_api_compat."):
        name = name.partition(".")[2]
    root = name.partition(".")[0]
    if root == "numpy":
        return _numpy()
    if root == "torch":
        return _torch()
    if root == "cupy":
        return _cupy()
    return _generic(xp)


def pinned_empty(nbytes: int) -> np.ndarray:
    """Page-locked host memory from whichever GPU framework is loaded, else plain memory."""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            from .torch import pinned_empty as torch_pinned

            return torch_pinned(nbytes)
    if "cupy" in sys.modules:
        from .cupy import pinned_empty as cupy_pinned

        return cupy_pinned(nbytes)
    return np.empty(nbytes, np.uint8)
