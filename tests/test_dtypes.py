"""The dtype table: codes, item sizes, NumPy/ml_dtypes types and each framework's names."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import dtypes

# The codes issue 2 requires; the table may hold more.
REQUIRED = {
    "BOOL",
    "U8",
    "I8",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
    "F8_E4M3",
    "F8_E5M2",
}


def test_table_covers_the_required_codes() -> None:
    assert set(dtypes.BY_CODE) >= REQUIRED


@pytest.mark.parametrize("code", sorted(d.code for d in dtypes.BY_NAME.values()))
def test_entry_is_consistent(code: str) -> None:
    d = dtypes.BY_CODE[code]
    assert d.code == code
    assert dtypes.by_code(code) is d
    assert dtypes.BY_NAME[d.name] is d
    assert d.numpy.itemsize == d.itemsize
    assert d.numpy.byteorder in ("<", "|", "=")
    assert d.numpy.name == d.name
    assert dtypes.from_numpy(d.numpy, tensor="t") is d
    assert dtypes.from_name(d.name, tensor="t") is d


def test_codes_and_names_are_unique() -> None:
    savable = [d for d in dtypes.BY_CODE.values() if d.name]
    assert len({d.code for d in savable}) == len({d.name for d in savable}) == len(savable)


def test_table_covers_every_safetensors_dtype(tmp_path: Any) -> None:
    """Every code the installed safetensors accepts is in the table (issue 10, defect 12).

    safetensors lists the codes it knows when it refuses one, so the list comes from the
    library itself, not from a copy here.
    """
    import json
    import re
    import struct

    import safetensors

    header = json.dumps({"x": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path = tmp_path / "probe.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(Exception, match="expected one of") as info:
        safetensors.safe_open(str(path), framework="np")
    theirs = set(re.findall(r"`([A-Z0-9_]+)`", str(info.value).split("expected one of")[1]))
    assert "F4" in theirs and "F8_E8M0" in theirs, theirs
    assert theirs <= set(dtypes.BY_CODE), theirs - set(dtypes.BY_CODE)


@pytest.mark.parametrize(("code", "bits"), [("F4", 4), ("F6_E2M3", 6), ("F6_E3M2", 6)])
def test_packed_dtypes_are_raw_bytes(code: str, bits: int) -> None:
    d = dtypes.BY_CODE[code]
    assert d.bits == bits and d.numpy == np.uint8 and d.name == ""
    assert d.nbytes((2, 4)) == 8 * bits // 8
    assert d.raw_shape((2, 4)) == (2, 4 * bits // 8)
    assert d.nbytes((3,)) is None  # 12 or 18 bits: not whole bytes
    with pytest.raises(ac.UnsupportedArrayError):  # nothing saves as a packed dtype
        dtypes.from_name(code, tensor="t")


@pytest.mark.parametrize(
    ("code", "ml"),
    [("BF16", "bfloat16"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")],
)
def test_low_precision_types_use_ml_dtypes(code: str, ml: str) -> None:
    assert dtypes.BY_CODE[code].numpy == np.dtype(getattr(ml_dtypes, ml))


@pytest.mark.parametrize("order", ["<", ">", "="])
@pytest.mark.parametrize("name", ["int16", "uint32", "float32", "float64", "int64", "complex64"])
def test_any_byte_order_maps_to_the_same_code(name: str, order: Any) -> None:
    d = dtypes.from_numpy(np.dtype(name).newbyteorder(order), tensor="t")
    assert d is dtypes.BY_NAME[name]


@pytest.mark.parametrize(
    "name", ["torch.bfloat16", "torch.float8_e4m3fn", "float32", "array_api_strict.int64", "bool"]
)
def test_framework_spellings(name: str) -> None:
    assert dtypes.from_name(name, tensor="t").name == name.rsplit(".", 1)[-1]


def test_torch_has_a_type_for_every_code() -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    from arrayckpt.backends.torch import torch_dtype

    for d in dtypes.BY_NAME.values():
        assert torch_dtype(d) == getattr(torch, d.name)


def test_jax_has_a_type_for_every_code() -> None:
    pytest.importorskip("jax", reason="JAX is not installed (pip install jax)")
    import jax.numpy as jnp

    for d in dtypes.BY_NAME.values():
        assert np.dtype(getattr(jnp, d.name)) == d.numpy


@pytest.mark.parametrize(
    "name", ["complex128", "float128", "object", "str", "torch.qint8", "int4", "float4_e2m1fn", ""]
)
def test_unsupported_dtype_names_tensor_and_dtype(name: str) -> None:
    with pytest.raises(ac.UnsupportedArrayError) as info:
        dtypes.from_name(name, tensor="layer.0.w")
    assert "'layer.0.w'" in str(info.value) and name in str(info.value)
    assert isinstance(info.value, ac.CheckpointError)
    assert "float32" in str(info.value)  # lists what to convert to


@pytest.mark.parametrize("dtype", [np.complex128, np.object_, np.str_, np.void, np.datetime64])
def test_unsupported_numpy_dtypes(dtype: type) -> None:
    with pytest.raises(ac.UnsupportedArrayError, match="'t'"):
        dtypes.from_numpy(np.dtype(dtype), tensor="t")


def test_unknown_code_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        dtypes.by_code("F128")
