"""Async saves of GPU arrays: pinned staging buffers, side-stream copies, snapshot semantics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from async_helpers import GatedFS

import arrayckpt as ac
from arrayckpt import fsops

pytestmark = pytest.mark.gpu


def _torch_cuda() -> Any:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    return torch


def _cupy() -> Any:
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA GPU: CuPy sees 0 devices")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no CUDA GPU: {exc}")
    return cupy


def test_torch_cuda_save_snapshots_before_return_through_pinned_buffers(tmp_path: Path) -> None:
    torch = _torch_cuda()
    a = torch.randn(1024, 1024, device="cuda")
    # Queue slow work on the caller's stream: the side-stream copy must wait for it.
    w = a @ a @ a
    b = torch.arange(4096, device="cuda", dtype=torch.bfloat16)
    expected_w, expected_b = w.cpu(), b.cpu()
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save(tmp_path / "c", {"w": w, "b": b}, {"m": w.t()})
        w.zero_()  # on the caller's stream, right after save returned
        b.fill_(7)
        fs.open_gate()
        future.result()
        pinned = [
            torch.from_numpy(buf).is_pinned()
            for bufs in ckpt.staging._used.values()
            for buf in bufs
        ]
    assert pinned and all(pinned)
    got = ac.load_checkpoint(tmp_path / "c", xp=torch, device="cuda:0")
    assert got.model["w"].device.type == "cuda"
    assert torch.equal(got.model["w"].cpu(), expected_w)
    assert torch.equal(got.model["b"].cpu(), expected_b)
    assert torch.equal(got.optimizer["m"].cpu(), expected_w.t())


def test_torch_cuda_staging_is_reused_between_saves(tmp_path: Path) -> None:
    torch = _torch_cuda()
    state = {"w": torch.ones(1 << 20, device="cuda"), "v": torch.zeros(3, device="cuda")}
    fs = GatedFS()
    fs.open_gate()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        for step in range(3):
            state["w"].add_(1)
            ckpt.save(tmp_path / f"s{step}", state)
        ckpt.wait()
    assert fs.pointers[0] == fs.pointers[1] == fs.pointers[2]
    got = ac.load_checkpoint(tmp_path / "s2").model["w"]
    np.testing.assert_array_equal(got, np.full(1 << 20, 4, np.float32))


def test_cupy_save_snapshots_before_return_through_pinned_buffers(tmp_path: Path) -> None:
    cupy = _cupy()
    x = cupy.arange(1 << 20, dtype=cupy.float32)
    y = (x @ x.reshape(-1, 1)).reshape(1) + x[:5]  # queued work before the copy
    expected_x, expected_y = cupy.asnumpy(x), cupy.asnumpy(y)
    fs = GatedFS()
    with fsops.use(fs), ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save(tmp_path / "c", {"x": x, "y": y})
        x.fill(-1)
        y.fill(-1)
        fs.open_gate()
        future.result()
        pointers = [buf.ctypes.data for bufs in ckpt.staging._used.values() for buf in bufs]
    for ptr in pointers:
        attributes = cupy.cuda.runtime.pointerGetAttributes(ptr)
        assert attributes.type == cupy.cuda.runtime.memoryTypeHost  # page-locked
    got = ac.load_checkpoint(tmp_path / "c", xp=cupy)
    np.testing.assert_array_equal(cupy.asnumpy(got.model["x"]), expected_x)
    np.testing.assert_array_equal(cupy.asnumpy(got.model["y"]), expected_y)


def test_torch_cuda_background_staging_and_prepare(tmp_path: Path) -> None:
    """Device copies are issued before `save` returns, ordered after the caller's stream;
    the arrays may change once ``staged`` resolves; `prepare` warms pinned buffers."""
    torch = _torch_cuda()
    a = torch.randn(2048, 2048, device="cuda")
    w = a @ a @ a  # slow work on the caller's stream, which the copy must wait for
    state = {"w": w, "b": torch.arange(4096, device="cuda", dtype=torch.bfloat16)}
    expected = {k: v.cpu() for k, v in state.items()}
    with ac.AsyncCheckpointer() as ckpt:
        ckpt.prepare(state).result(timeout=60)
        warmed = ckpt.staging.nbytes
        future = ckpt.save(tmp_path / "step_1", state, background_staging=True)
        future.staged.result(timeout=60)
        for v in state.values():
            v.add_(1)
        future.result()
        assert ckpt.staging.nbytes == warmed  # the save used the warmed (pinned) buffers
    got = ac.load_checkpoint(tmp_path / "step_1", xp="torch")
    for k, v in expected.items():
        assert torch.equal(got.model[k], v)


def test_cuda_tensors_under_a_staging_budget_are_staged_and_must_fit(tmp_path: Path) -> None:
    """Device arrays have no host view: a bounded save stages them (pinned) and writes the
    host arrays in place; device arrays beyond the budget are refused up front."""
    torch = _torch_cuda()
    mib = 1 << 20
    device = {f"g{i}": torch.full((mib // 4,), float(i), device="cuda") for i in range(2)}
    host = {f"h{i}": np.full(mib // 4, i, np.float32) for i in range(4)}
    with ac.AsyncCheckpointer(max_staging_bytes=3 * mib) as ckpt:
        future = ckpt.save(tmp_path / "ok", {**device, **host})
        assert ckpt.staging.nbytes <= 3 * mib
        for t in device.values():
            t.add_(1)
        future.result()
        with pytest.raises(ac.InvalidInputError, match="max_staging_bytes"):
            ckpt.save(
                tmp_path / "over", {f"g{i}": torch.zeros(mib, device="cuda") for i in range(4)}
            )
    out = ac.load_checkpoint(tmp_path / "ok").model
    assert out["g1"][0] == 1.0 and out["h3"][0] == 3.0
