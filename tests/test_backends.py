"""Backends: lazy lookup by type module, host copies for every layout, namespace resolution."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import assert_same_array, backend_arrays, cpu_backends, importable, to_backend

import arrayckpt as ac
from arrayckpt import backends
from arrayckpt.staging import StagingPool

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_arrayckpt_imports_no_framework() -> None:
    loaded = _run(
        """
        import sys, tempfile, numpy as np
        import arrayckpt as ac
        d = tempfile.mkdtemp()
        ac.save_checkpoint(d + "/c", {"w": np.ones(3)}, {"m": np.zeros(1)})
        ac.load_checkpoint(d + "/c")
        ac.load_checkpoint(d + "/c", xp="numpy", mmap=False)
        ac.load_checkpoint("file://" + d + "/c")
        print(sorted(m for m in ("torch", "jax", "jaxlib", "cupy", "array_api_strict",
                                 "obstore", "fsspec", "s3fs", "boto3", "botocore")
                     if m in sys.modules))
        """
    )
    assert loaded == "[]"


def test_a_framework_is_imported_only_when_asked_for() -> None:
    if not importable("torch"):
        pytest.skip("PyTorch is not installed")
    loaded = _run(
        """
        import sys, tempfile, numpy as np
        import arrayckpt as ac
        d = tempfile.mkdtemp()
        ac.save_checkpoint(d + "/c", {"w": np.ones(3)})
        ac.load_checkpoint(d + "/c", xp="torch")
        print(sorted(m for m in ("torch", "jax", "cupy") if m in sys.modules))
        """
    )
    assert loaded == "['torch']"


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("numpy", "numpy"),
        ("torch", "torch"),
        ("array_api_strict", "array-api"),
        ("jax", "array-api"),
    ],
)
def test_for_array_picks_the_adapter(backend: str, expected: str) -> None:
    if backend not in cpu_backends():
        pytest.skip(f"{backend} is not installed")
    x = to_backend(np.zeros(2, np.float32), backend)
    assert backends.for_array(x, "k").name == expected


def test_numpy_scalars_are_zero_d_arrays() -> None:
    assert backends.for_array(np.float32(1.5), "k").name == "numpy"


@pytest.mark.parametrize(
    "value", [1, 1.0, "s", None, [1], (1,), b"x", object(), memoryview(b"x")], ids=repr
)
def test_non_arrays_name_key_and_type(value: object) -> None:
    with pytest.raises(ac.UnsupportedArrayError) as info:
        backends.for_array(value, "layer.0")
    assert "'layer.0'" in str(info.value)
    assert type(value).__qualname__ in str(info.value)


@pytest.mark.parametrize(
    ("xp", "name"),
    [
        (None, "numpy"),
        ("numpy", "numpy"),
        ("np", "numpy"),
        (np, "numpy"),
        ("torch", "torch"),
        ("array_api_strict", "array-api"),
        ("jax", "array-api"),
        ("jnp", "array-api"),
        ("jax.numpy", "array-api"),
        ("array_api_compat.numpy", "numpy"),
    ],
)
def test_for_namespace(xp: object, name: str) -> None:
    module = {"np": "numpy", "jax": "jax", "jnp": "jax"}.get(str(xp), str(xp))
    if isinstance(xp, str) and not importable(module.partition(".")[0]):
        pytest.skip(f"{module} is not installed")
    assert backends.for_namespace(xp).name == name  # type: ignore[arg-type]


# 64-bit JAX: puts float64/int64/uint64 arrays through JAX (32-bit by default).
@pytest.mark.usefixtures("jax_x64")
@given(data=st.data(), staged=st.booleans())
def test_to_host_copies_exact_bytes_for_every_layout(data: st.DataObject, staged: bool) -> None:
    expected, x, backend, layout = data.draw(backend_arrays())
    adapter = backends.for_array(x, "t")
    dtype = adapter.dtype(x, "t")
    pool = StagingPool()
    pool.begin()
    host = adapter.to_host(x, "t", dtype, pool.take if staged else None)
    adapter.synchronize()
    assert host.flags.c_contiguous and host.dtype == dtype.numpy
    assert_same_array(host, expected, f"{backend}/{layout}")
    assert adapter.shape(x) == expected.shape


def test_staged_copy_is_independent_of_the_source() -> None:
    a = np.arange(6, dtype=np.float32)
    adapter = backends.for_array(a, "a")
    pool = StagingPool()
    pool.begin()
    host = adapter.to_host(a, "a", adapter.dtype(a, "a"), pool.take)
    a[:] = -1
    assert host.tolist() == [0, 1, 2, 3, 4, 5]


def test_numpy_load_shares_the_mapping_and_torch_shares_it_too(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    ac.save_checkpoint(tmp_path / "c", {"w": np.arange(4, dtype=np.float32)})
    t = ac.load_checkpoint(tmp_path / "c", xp=torch).model["w"]
    assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
    t.add_(1)  # writable: the mapping is copy-on-write
    assert ac.load_checkpoint(tmp_path / "c").model["w"].tolist() == [0, 1, 2, 3]


def test_pinned_empty_without_gpu_is_plain_memory() -> None:
    buf = backends.pinned_empty(100)
    assert buf.dtype == np.uint8 and buf.shape == (100,)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int64", "bool"])
def test_empty_torch_tensors_through_the_staging_pool(tmp_path: Path, dtype: str) -> None:
    """Async saves copy into the staging pool, whose empty buffers NumPy gives stride 0."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    state = {"e": torch.zeros(0, 3, dtype=getattr(torch, dtype)), "one": torch.ones(1)}
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "c", state)
        ckpt.wait()
    got = ac.load_checkpoint(tmp_path / "c", xp=torch).model
    assert got["e"].shape == (0, 3) and got["e"].dtype == getattr(torch, dtype)
    assert got["one"].tolist() == [1.0]


@pytest.mark.parametrize(
    "dtype",
    [
        *("bool", "uint8", "int8", "uint16", "int16", "float16", "bfloat16", "int32", "uint32"),
        *("float32", "float64", "int64", "uint64", "complex64", "float8_e4m3fn", "float8_e5m2"),
    ],
)
@pytest.mark.parametrize("shape", [(), (0, 3), (5,), (2, 3, 4)])
def test_torch_from_host_views_the_bytes_of_every_dtype(dtype: str, shape: tuple[int, ...]) -> None:
    """The view is made the cheap way (plain dtypes straight, ml_dtypes' through an integer
    view), looked up once per dtype: the same tensor either way, sharing the bytes."""
    torch = pytest.importorskip("torch")
    from arrayckpt import dtypes

    np_dtype = dtypes.BY_NAME[dtype].numpy
    raw = np.random.default_rng(0).integers(0, 256, int(np.prod(shape)) * np_dtype.itemsize)
    host = raw.astype(np.uint8).view(np_dtype).reshape(shape)
    backend = backends.for_namespace("torch")
    for _ in range(2):  # the first lookup, then the cached one
        t = backend.from_host(host, None)
        assert t.dtype == getattr(torch, dtype) and tuple(t.shape) == shape
        assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == host.tobytes()
        if host.size:
            assert t.data_ptr() == host.ctypes.data
