"""Shared Hypothesis strategies and backend helpers for the arrayckpt test suite.

The one place that knows how to build test arrays of every dtype, shape and memory
layout in every framework available here, and how to read them back as raw bytes.
Names here are imported by other test modules: keep them stable.

- `available_backends()` / `backend_dtypes(name)` / `XP_NAMES`: which frameworks and
  dtypes this machine can test.
- `to_backend(np_array, name, layout=...)`, `to_numpy(x)`, `raw_bytes(x)`,
  `assert_same_array(actual, expected)`: move arrays between frameworks and compare
  them bit for bit (NaN payloads included).
- Strategies: `dtypes()`, `shapes()`, `arrays()`, `layouts()`, `tensor_names()`,
  `states()`, `training_states()`, `backend_arrays()`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from functools import cache
from typing import Any

import numpy as np
from hypothesis import strategies as st

import arrayckpt as ac
from arrayckpt import dtypes as ac_dtypes

#: Every code an array can be saved as (the packed F4/F6 codes are read-only).
ALL_DTYPE_CODES: tuple[str, ...] = tuple(d.code for d in ac_dtypes.BY_NAME.values())

#: Memory layouts `to_backend` can produce (each framework honours those it has).
LAYOUTS = ("c", "fortran", "strided", "reversed", "big_endian")

#: The `xp=` argument that loads into each backend.
XP_NAMES = {
    "numpy": "numpy",
    "torch": "torch",
    "array_api_strict": "array_api_strict",
    "jax": "jax.numpy",
    "cupy": "cupy",
    "torch-cuda": "torch",
}

# array_api_strict implements the standard's dtypes only (no float16, BF16 or float8).
_STRICT_NAMES = {
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float32",
    "float64",
    "complex64",
}
# CuPy has no BF16/float8 types of its own.
_CUPY_NAMES = _STRICT_NAMES | {"float16"}


def importable(module: str) -> bool:
    """True when ``module`` can be imported (without importing it to find out)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@cache
def cuda_available() -> bool:
    """True when PyTorch sees a CUDA GPU."""
    if not importable("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


@cache
def cupy_available() -> bool:
    """True when CuPy is installed and sees a GPU."""
    if not importable("cupy"):
        return False
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no driver, no device: CuPy raises its own CUDA errors
        return False


@cache
def available_backends() -> tuple[str, ...]:
    """Names of the backends this machine can test, NumPy first.

    One of ``numpy``, ``torch`` (CPU), ``array_api_strict``, ``jax``, ``cupy`` and
    ``torch-cuda``; the GPU ones only where a GPU is present.
    """
    names = ["numpy"]
    for name in ("torch", "array_api_strict", "jax"):
        if importable(name):
            names.append(name)
    if cupy_available():
        names.append("cupy")
    if cuda_available():
        names.append("torch-cuda")
    return tuple(names)


def cpu_backends() -> tuple[str, ...]:
    """The available backends that keep arrays in host memory."""
    return tuple(b for b in available_backends() if b not in ("cupy", "torch-cuda"))


@cache
def backend_dtypes(backend: str) -> frozenset[str]:
    """Safetensors codes that ``backend`` can hold exactly."""
    codes = ALL_DTYPE_CODES
    if backend in ("numpy", "jax"):
        if backend == "jax":
            import jax.numpy as jnp

            return frozenset(c for c in codes if hasattr(jnp, ac_dtypes.BY_CODE[c].name))
        return frozenset(codes)
    if backend in ("torch", "torch-cuda"):
        import torch

        return frozenset(
            c
            for c in codes
            if isinstance(getattr(torch, ac_dtypes.BY_CODE[c].name, None), torch.dtype)
        )
    if backend == "array_api_strict":
        return frozenset(c for c in codes if ac_dtypes.BY_CODE[c].name in _STRICT_NAMES)
    if backend == "cupy":
        return frozenset(c for c in codes if ac_dtypes.BY_CODE[c].name in _CUPY_NAMES)
    raise ValueError(f"unknown backend {backend!r}")


def numpy_dtype(code: str) -> np.dtype[Any]:
    """The little-endian NumPy dtype (ml_dtypes for BF16/F8) of a safetensors code."""
    return ac_dtypes.BY_CODE[code].numpy


def _uint_view(a: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers of the same width (keeps strides)."""
    if a.dtype == np.bool_:
        return a
    return a.view(np.dtype(f"<u{a.dtype.itemsize}"))


def with_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """A NumPy array equal to ``a`` bit for bit, laid out in memory as ``layout`` says.

    ``fortran``: column-major; ``strided``: every other element of a larger buffer;
    ``reversed``: negative strides; ``big_endian``: byte-swapped storage (types that
    have no byte order, such as bool, BF16 and float8, stay little-endian).
    """
    a = np.asarray(a, order="C")  # np.ascontiguousarray would turn 0-d into 1-d
    if layout == "c":
        return a
    if layout == "fortran":
        return a if a.ndim < 2 else np.asfortranarray(a)  # it would turn 0-d into 1-d
    if layout == "strided":
        if a.ndim == 0:
            return a
        big = np.zeros((*a.shape[:-1], a.shape[-1] * 2), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "reversed":
        if a.ndim == 0:
            return a
        flipped = np.asarray(a[::-1], order="C")
        return flipped[::-1]
    if layout == "big_endian":
        if a.dtype.kind in "iufc" and a.dtype.itemsize > 1 and a.dtype.isbuiltin == 1:
            big = a.astype(a.dtype.newbyteorder(">"))
            assert big.dtype.byteorder == ">"
            return big
        return a
    raise ValueError(f"unknown layout {layout!r}")


def to_backend(
    a: np.ndarray, backend: str, layout: str = "c", *, requires_grad: bool = False
) -> Any:
    """Convert a NumPy array to ``backend``'s array type with the same bits.

    ``layout`` is honoured where the framework can express it (NumPy: all; PyTorch:
    fortran and strided; the others copy to C order). ``requires_grad`` applies to
    PyTorch floating-point tensors.
    """
    if backend == "numpy":
        return with_layout(a, layout)
    if backend in ("torch", "torch-cuda"):
        import torch

        tdtype = getattr(torch, a.dtype.name)
        src = with_layout(a, layout if layout in ("fortran", "strided") else "c")
        t = torch.from_numpy(_uint_view(src)).view(tdtype)
        if backend == "torch-cuda":
            t = t.to("cuda")
        if requires_grad:
            t.requires_grad_(True)
        return t
    if backend == "array_api_strict":
        import array_api_strict

        return array_api_strict.asarray(np.asarray(a, order="C"))
    if backend == "jax":
        import jax.numpy as jnp

        out = jnp.asarray(np.asarray(a, order="C"))
        assert out.dtype == a.dtype, (
            f"JAX changed {a.dtype} to {out.dtype}: a test with "
            "64-bit JAX arrays takes the jax_x64 fixture"
        )
        return out
    if backend == "cupy":
        import cupy

        return cupy.asarray(np.asarray(a, order="C"))
    raise ValueError(f"unknown backend {backend!r}")


def to_numpy(x: Any) -> np.ndarray:
    """Any backend's array as a host NumPy array of the same dtype and bits."""
    module = type(x).__module__.partition(".")[0]
    if isinstance(x, np.ndarray):
        return x
    if module == "torch":
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bool:
            return t.numpy()
        width = t.element_size() * 8
        bits = t.contiguous().view(getattr(torch, f"uint{width}")).numpy()
        return bits.view(numpy_dtype(ac_dtypes.from_name(str(t.dtype), tensor="?").code))
    if module == "cupy":
        return x.get()
    if module == "array_api_strict":
        return np.from_dlpack(x)
    return np.asarray(x)


def dtype_code(x: Any) -> str:
    """The safetensors code of any backend array's dtype."""
    if isinstance(x, np.ndarray):
        return ac_dtypes.from_numpy(x.dtype, tensor="?").code
    return ac_dtypes.from_name(str(x.dtype), tensor="?").code


def raw_bytes(a: np.ndarray) -> bytes:
    """The little-endian, C-order bytes of ``a`` (compares NaNs by payload)."""
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes(order="C")


def assert_same_array(actual: Any, expected: np.ndarray, where: str = "") -> None:
    """Assert ``actual`` (any backend) has ``expected``'s dtype, shape and exact bits."""
    assert dtype_code(actual) == dtype_code(expected), (
        f"{where}: dtype {actual.dtype} != {expected.dtype}"
    )
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{where}: shape {tuple(actual.shape)} != {expected.shape}"
    )
    assert raw_bytes(to_numpy(actual)) == raw_bytes(expected), f"{where}: values differ"


# ---------------------------------------------------------------------------- strategies


def dtypes(codes: frozenset[str] | tuple[str, ...] | None = None) -> st.SearchStrategy[str]:
    """Safetensors dtype codes (all supported ones, or those in ``codes``)."""
    pool = sorted(codes) if codes is not None else list(ALL_DTYPE_CODES)
    return st.sampled_from(pool)


def shapes(max_dims: int = 4, max_side: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes including 0-d, empty ones (any zero dimension) and unit dimensions."""
    return st.lists(st.integers(0, max_side), max_size=max_dims).map(tuple)


@st.composite
def arrays(
    draw: st.DrawFn,
    dtype: str | st.SearchStrategy[str] | None = None,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] | None = None,
) -> np.ndarray:
    """C-contiguous little-endian NumPy arrays whose bytes are arbitrary bit patterns.

    Every bit pattern of a float type is drawn (NaNs with payloads, infinities,
    subnormals, -0); bools hold only 0 and 1.
    """
    if dtype is None:
        dtype = dtypes()
    code = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    if shape is None:
        shape = shapes()
    shp = draw(shape) if isinstance(shape, st.SearchStrategy) else tuple(shape)
    npdt = numpy_dtype(code)
    count = math.prod(shp)
    if code == "BOOL":
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        return np.array(values, dtype=np.bool_).reshape(shp)
    data = draw(st.binary(min_size=count * npdt.itemsize, max_size=count * npdt.itemsize))
    return np.frombuffer(data, dtype=npdt).reshape(shp).copy()


def layouts() -> st.SearchStrategy[str]:
    """Memory layouts for `with_layout` / `to_backend`."""
    return st.sampled_from(LAYOUTS)


def tensor_names(max_size: int = 40) -> st.SearchStrategy[str]:
    """Valid tensor names: any Unicode (no surrogates, no NUL), dotted paths, long names."""
    text = st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
        min_size=1,
        max_size=max_size,
    )
    dotted = st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8),
        min_size=2,
        max_size=6,
    ).map(".".join)
    long = st.integers(200, 1000).map(lambda n: ("layer." * n)[:n] + "w")
    return st.one_of(text, dotted, long).filter(lambda s: s != "__metadata__")


def states(
    dtype: st.SearchStrategy[str] | None = None,
    *,
    min_size: int = 0,
    max_size: int = 4,
) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Mappings ``name -> NumPy array`` of mixed dtypes and shapes."""
    return st.dictionaries(
        tensor_names(), arrays(dtype=dtype), min_size=min_size, max_size=max_size
    )


@st.composite
def backend_arrays(
    draw: st.DrawFn, backends: tuple[str, ...] | None = None
) -> tuple[np.ndarray, Any, str, str]:
    """``(expected, array, backend, layout)``: an array in some backend that holds it."""
    backend = draw(st.sampled_from(backends or cpu_backends()))
    expected = draw(arrays(dtype=dtypes(backend_dtypes(backend))))
    layout = draw(layouts())
    return expected, to_backend(expected, backend, layout), backend, layout


_U64 = st.integers(0, 2**64 - 1)


def training_states() -> st.SearchStrategy[ac.TrainingState]:
    """Valid `TrainingState`s over the full ranges boostr's types allow."""
    return st.builds(
        ac.TrainingState,
        step=_U64,
        epoch=_U64,
        learning_rate=st.floats(allow_nan=False, allow_infinity=False),
        metadata=st.dictionaries(
            st.text(alphabet=st.characters(codec="utf-8")),
            st.text(alphabet=st.characters(codec="utf-8")),
            max_size=4,
        ),
    )


__all__ = [
    "ALL_DTYPE_CODES",
    "LAYOUTS",
    "XP_NAMES",
    "arrays",
    "assert_same_array",
    "available_backends",
    "backend_arrays",
    "backend_dtypes",
    "cpu_backends",
    "cuda_available",
    "cupy_available",
    "dtype_code",
    "dtypes",
    "importable",
    "layouts",
    "numpy_dtype",
    "raw_bytes",
    "shapes",
    "states",
    "tensor_names",
    "to_backend",
    "to_numpy",
    "training_states",
    "with_layout",
]
