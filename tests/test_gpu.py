"""GPU backends (PyTorch CUDA, CuPy): exact round trips, device placement, async snapshots.

Every test here is marked ``gpu`` and skips, saying why, on a machine without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from strategies import (
    LAYOUTS,
    assert_same_array,
    backend_dtypes,
    cuda_available,
    cupy_available,
    importable,
    numpy_dtype,
    to_backend,
)

import arrayckpt as ac

pytestmark = pytest.mark.gpu


def _need_torch_cuda() -> Any:
    if not importable("torch"):
        pytest.skip("no CUDA GPU: PyTorch is not installed")
    if not cuda_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    import torch

    return torch


def _need_cupy() -> Any:
    if not importable("cupy"):
        pytest.skip("no CUDA GPU for CuPy: cupy is not installed")
    if not cupy_available():
        pytest.skip("no CUDA GPU: cupy.cuda.runtime.getDeviceCount() found no device")
    import cupy

    return cupy


def _sample(code: str, shape: tuple[int, ...] = (3, 5)) -> np.ndarray:
    n = int(np.prod(shape)) * numpy_dtype(code).itemsize
    raw = (np.arange(n, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
    if code == "BOOL":
        return (raw % 2).astype(bool).reshape(shape)
    return raw.view(numpy_dtype(code)).reshape(shape)


def test_torch_cuda_round_trip_every_dtype_and_layout(tmp_path: Path) -> None:
    torch = _need_torch_cuda()
    for code in sorted(backend_dtypes("torch-cuda")):
        for layout in LAYOUTS:
            a = _sample(code)
            path = ac.save_checkpoint(
                tmp_path / f"{code}_{layout}", {"t": to_backend(a, "torch-cuda", layout)}
            )
            on_gpu = ac.load_checkpoint(path, xp=torch, device="cuda:0").model["t"]
            assert on_gpu.device.type == "cuda"
            assert_same_array(on_gpu, a, f"{code}/{layout}")
            assert_same_array(ac.load_checkpoint(path).model["t"], a, f"{code}/{layout}")


def test_torch_cuda_requires_grad_and_zero_d(tmp_path: Path) -> None:
    torch = _need_torch_cuda()
    w = torch.randn(4, 3, device="cuda", requires_grad=True)
    state = {
        "w": w,
        "wT": w.T,
        "s": torch.tensor(3.0, device="cuda"),
        "e": torch.zeros(0, 2, device="cuda"),
    }
    ac.save_checkpoint(tmp_path / "c", state)
    got = ac.load_checkpoint(tmp_path / "c", xp="torch", device=torch.device("cuda")).model
    for k, v in state.items():
        assert torch.equal(got[k], v.detach()), k


def test_torch_cuda_bad_ordinal_is_invalid_input(tmp_path: Path) -> None:
    torch = _need_torch_cuda()
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)})
    with pytest.raises(ac.InvalidInputError):
        ac.load_checkpoint(tmp_path / "c", xp=torch, device=f"cuda:{torch.cuda.device_count()}")


def test_async_snapshot_of_cuda_tensors_is_taken_before_save_returns(tmp_path: Path) -> None:
    torch = _need_torch_cuda()
    w = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "c", {"w": w})
        w.fill_(-1)  # allowed as soon as save() returns
        ckpt.wait()
    got = ac.load_checkpoint(tmp_path / "c").model["w"]
    assert got[:3].tolist() == [0.0, 1.0, 2.0] and got[-1] == (1 << 20) - 1


def test_cupy_round_trip_every_dtype(tmp_path: Path) -> None:
    cupy = _need_cupy()
    for code in sorted(backend_dtypes("cupy")):
        for layout in ("c", "strided"):
            a = _sample(code)
            x = to_backend(a, "cupy")
            if layout == "strided":
                big = cupy.zeros((3, 10), x.dtype)
                big[:, ::2] = x
                x = big[:, ::2]
            path = ac.save_checkpoint(tmp_path / f"{code}_{layout}", {"t": x})
            for device in (None, 0, "cuda:0", cupy.cuda.Device(0)):
                got = ac.load_checkpoint(path, xp=cupy, device=device).model["t"]
                assert isinstance(got, cupy.ndarray)
                assert_same_array(got, a, f"{code}/{layout}/{device}")


def test_cupy_bad_device_is_invalid_input(tmp_path: Path) -> None:
    _need_cupy()
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)})
    with pytest.raises(ac.InvalidInputError):
        ac.load_checkpoint(tmp_path / "c", xp="cupy", device="tpu")


def test_mixed_gpu_frameworks_in_one_mapping(tmp_path: Path) -> None:
    torch = _need_torch_cuda()
    cupy = _need_cupy()
    state = {
        "t": torch.ones(3, device="cuda"),
        "c": cupy.arange(4, dtype=cupy.int32),
        "n": np.array([1, 2], np.float16),
    }
    ac.save_checkpoint(tmp_path / "c", state)
    got = ac.load_checkpoint(tmp_path / "c").model
    assert got["t"].tolist() == [1, 1, 1] and got["c"].tolist() == [0, 1, 2, 3]
    assert got["n"].dtype == np.float16


def test_cupy_bad_ordinal_is_invalid_input(tmp_path: Path) -> None:
    cupy = _need_cupy()
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)})
    count = cupy.cuda.runtime.getDeviceCount()
    for device in (count, f"cuda:{count}", "cuda:x"):
        with pytest.raises(ac.InvalidInputError):
            ac.load_checkpoint(tmp_path / "c", xp=cupy, device=device)


def test_cupy_load_of_bf16_names_the_tensor_and_the_fix(tmp_path: Path) -> None:
    _need_cupy()
    # CuPy has no BF16 (nor float8): a clear error instead of CuPy's own TypeError.
    ac.save_checkpoint(tmp_path / "c", {"w": _sample("BF16")})
    with pytest.raises(ac.UnsupportedArrayError, match=r"'w'.*BF16.*xp=torch"):
        ac.load_checkpoint(tmp_path / "c", xp="cupy")


def test_torch_cuda_strided_views_in_an_async_save(tmp_path: Path) -> None:
    torch = _need_torch_cuda()
    base = torch.arange(64, device="cuda", dtype=torch.float32).reshape(8, 8)
    state = {
        "t": base.t(),
        "every_other": base[:, ::2],
        "row": base[3],
        "s": base[2, 2],
        "neg": torch.zeros(3, device="cuda") - base[0, :3],
        "e": base[:0],
        "h": base.to(torch.bfloat16).t(),
    }
    expected = {k: v.cpu().clone() for k, v in state.items()}
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.save(tmp_path / "c", state)
        base.fill_(-1)  # every view above reads `base`: the snapshot must already hold it
        ckpt.wait()
    got = ac.load_checkpoint(tmp_path / "c", xp=torch, device="cuda:0").model
    for k, v in expected.items():
        assert got[k].device.type == "cuda", k
        assert got[k].dtype == v.dtype and torch.equal(got[k].cpu(), v), k
