"""The one table of safetensors dtype codes, their item sizes and each framework's name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from .errors import UnsupportedArrayError


@dataclass(frozen=True)
class DType:
    """One safetensors dtype.

    Attributes:
        code: the header code, e.g. ``"BF16"``.
        itemsize: bytes per element; 0 for the packed sub-byte dtypes (see ``bits``).
        name: the framework-neutral name (NumPy/ml_dtypes, torch and JAX agree on it),
            which is also what ``safetensors.TensorSpec`` takes; ``""`` where no
            framework has the type: such tensors are read as their raw bytes (``uint8``).
        bits: bits per element of a packed sub-byte dtype (F4, F6_*); 0 otherwise.
        known: False for a code this table does not list (a newer safetensors').
    """

    code: str
    itemsize: int
    name: str
    bits: int = 0
    known: bool = True

    @property
    def numpy(self) -> np.dtype[Any]:
        """The NumPy dtype (from ml_dtypes for BF16 and the float8 family), little-endian;
        ``uint8`` (raw bytes) for dtypes no framework has."""
        return _numpy_dtype(self.name or "uint8")

    def nbytes(self, shape: tuple[int, ...]) -> int | None:
        """Bytes of a tensor of ``shape``; ``None`` for an unknown dtype or for a packed
        tensor that does not end on a byte boundary (safetensors refuses those)."""
        count = math.prod(shape)  # Python ints: no overflow
        if not self.known:
            return None
        if not self.bits:
            return count * self.itemsize
        total = count * self.bits
        return total // 8 if total % 8 == 0 else None

    def raw_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a tensor of this dtype is read as: ``shape`` itself, or for raw
        bytes, ``shape`` with its last axis counted in bytes (torch's ``float4_e2m1fn_x2``
        layout for F4) or, when that is not whole, one flat axis of bytes."""
        if self.name:
            return shape
        nbytes = self.nbytes(shape)
        if nbytes is None:
            raise ValueError(f"dtype {self.code} has no known size")
        if not self.bits:
            return (nbytes,)
        if shape and (shape[-1] * self.bits) % 8 == 0:
            return (*shape[:-1], shape[-1] * self.bits // 8)
        return (nbytes,)


_TABLE = (
    DType("BOOL", 1, "bool"),
    DType("U8", 1, "uint8"),
    DType("I8", 1, "int8"),
    DType("I16", 2, "int16"),
    DType("U16", 2, "uint16"),
    DType("F16", 2, "float16"),
    DType("BF16", 2, "bfloat16"),
    DType("I32", 4, "int32"),
    DType("U32", 4, "uint32"),
    DType("F32", 4, "float32"),
    DType("F64", 8, "float64"),
    DType("I64", 8, "int64"),
    DType("U64", 8, "uint64"),
    DType("C64", 8, "complex64"),
    DType("F8_E4M3", 1, "float8_e4m3fn"),
    DType("F8_E5M2", 1, "float8_e5m2"),
    DType("F8_E4M3FNUZ", 1, "float8_e4m3fnuz"),
    DType("F8_E5M2FNUZ", 1, "float8_e5m2fnuz"),
    DType("F8_E8M0", 1, "float8_e8m0fnu"),
    # Packed sub-byte floats (safetensors 0.8): no framework stores them packed, so they
    # are read as raw bytes and cannot be saved from an array.
    DType("F4", 0, "", bits=4),
    DType("F6_E2M3", 0, "", bits=6),
    DType("F6_E3M2", 0, "", bits=6),
)

#: Every supported dtype, keyed by its safetensors header code.
BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}
#: Every dtype an array can be saved as, keyed by its framework-neutral name.
BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE if d.name}


def unknown(code: str) -> DType:
    """A header code this table does not list: its tensors are skipped until asked for."""
    return DType(code, 0, "", known=False)


@cache
def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16" or name.startswith("float8_"):
        # Imported here, not at the top: ml_dtypes takes ~0.45 s to import, which every
        # `import arrayckpt` and `arrayckpt --help` would pay though few calls need BF16/F8.
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name).newbyteorder("<")


def by_code(code: str) -> DType:
    """The dtype for a safetensors header code; ``KeyError`` when unknown."""
    return BY_CODE[code]


def from_name(name: str, *, tensor: str) -> DType:
    """The dtype for a framework's dtype name (``"float32"``, ``"torch.bfloat16"``, ...).

    Raises:
        UnsupportedArrayError: naming ``tensor`` when safetensors has no code for it.
    """
    bare = name.rsplit(".", 1)[-1]
    try:
        return BY_NAME[bare]
    except KeyError:
        supported = ", ".join(sorted(BY_NAME))
        raise UnsupportedArrayError(
            f"tensor {tensor!r}: dtype {name} has no safetensors code; "
            f"convert it to one of: {supported}"
        ) from None


def from_numpy(dtype: np.dtype[Any], *, tensor: str) -> DType:
    """The dtype of a NumPy array (any byte order)."""
    if dtype.kind == "b":
        return BY_NAME["bool"]
    return from_name(dtype.newbyteorder("=").name, tensor=tensor)
