"""PyTorch tensors on CPU and CUDA; CUDA copies go through pinned buffers on a side stream."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..dtypes import DType
from ..errors import InvalidInputError, UnsupportedArrayError
from ..hostcopy import copy_bytes
from ..staging import Allocator, host_view
from .base import SideStreamBackend


def torch_dtype(dtype: DType) -> torch.dtype:
    found = getattr(torch, dtype.name, None)
    if not isinstance(found, torch.dtype):
        raise UnsupportedArrayError(
            f"this PyTorch ({torch.__version__}) has no dtype for {dtype.code}; upgrade PyTorch "
            "or load with xp=numpy"
        )
    return found


def _torch_view_of(np_dtype: np.dtype[Any]) -> tuple[torch.dtype, np.dtype[Any] | None]:
    """The torch dtype of arrays of ``np_dtype``, and ``None`` where ``torch.from_numpy``
    takes them as they are (every plain NumPy dtype), else the integer dtype of their
    size to hand it instead (ml_dtypes' BF16 and F8), viewed back as the torch dtype."""
    tdtype = torch_dtype(dtypes.from_numpy(np_dtype, tensor="?"))
    try:
        if torch.from_numpy(np.empty(1, np_dtype)).dtype == tdtype:
            return tdtype, None
    except TypeError:
        pass
    return tdtype, np.dtype(f"<i{np_dtype.itemsize}")


class TorchBackend(SideStreamBackend):
    name = "torch"

    def __init__(self) -> None:
        super().__init__()
        # by NumPy dtype: the lookup costs microseconds, and a load converts every tensor
        self._from_numpy: dict[np.dtype[Any], tuple[torch.dtype, np.dtype[Any] | None]] = {}

    def dtype(self, x: Any, key: str) -> DType:
        if x.layout != torch.strided:
            raise UnsupportedArrayError(
                f"tensor {key!r}: layout {x.layout} is not supported; call .to_dense() first"
            )
        if x.device.type == "meta":
            raise UnsupportedArrayError(f"tensor {key!r} is on the meta device and has no data")
        return dtypes.from_name(str(x.dtype), tensor=key)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def stages_pinned(self, x: Any) -> bool:
        return bool(x.device.type != "cpu")

    def host_view(self, x: Any, key: str, dtype: DType) -> np.ndarray | None:
        if x.device.type != "cpu" or x.is_conj() or x.is_neg() or not x.is_contiguous():
            return None
        return self.to_host(x, key, dtype, None)  # a view in exactly these cases

    def to_host(self, x: Any, key: str, dtype: DType, alloc: Allocator | None) -> np.ndarray:
        x = x.detach().resolve_conj().resolve_neg()
        shape = tuple(x.shape)
        on_device = x.device.type != "cpu"
        if alloc is None and not on_device and x.is_contiguous():
            # Not `reshape(-1)`: a "contiguous" tensor with <= 1 element may keep any
            # stride (e.g. shape (1,), stride (2,)), which `view(torch.uint8)` rejects.
            flat = x.as_strided((x.numel(),), (1,))
            return host_view(flat.view(torch.uint8).numpy(), dtype, shape)
        nbytes = x.numel() * dtype.itemsize
        flat = alloc(nbytes, on_device) if alloc else np.empty(nbytes, np.uint8)
        if nbytes == 0:  # NumPy gives empty buffers stride 0, which torch cannot view
            return host_view(flat, dtype, shape)
        dst = torch.from_numpy(flat).view(x.dtype).view(shape)
        if on_device:
            stream = self._side_stream(x.device)
            # Order the copy after the work that produced `x` on the caller's stream.
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                dst.copy_(x, non_blocking=True)
            self._keep_until_synchronized(x)
        elif x.is_contiguous():
            # as_strided, not reshape: see the view above (shape (1,), stride (2,))
            src = x.as_strided((x.numel(),), (1,))
            copy_bytes(flat, src.view(torch.uint8).numpy())
        else:
            dst.copy_(x)
        return host_view(flat, dtype, shape)

    def _side_stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def views_host(self, device: Any) -> bool:
        target = self._device(device)
        return target is None or target.type == "cpu"

    def from_host(self, host: np.ndarray, device: Any) -> Any:
        target = self._device(device)
        found = self._from_numpy.get(host.dtype)
        if found is None:
            found = self._from_numpy[host.dtype] = _torch_view_of(host.dtype)
        tdtype, raw = found
        if host.size == 0:  # NumPy gives empty buffers stride 0, which torch cannot view
            return torch.empty(host.shape, dtype=tdtype, device=target)
        # BF16/F8 (ml_dtypes): torch knows their bytes, not their NumPy dtype
        t = torch.from_numpy(host) if raw is None else torch.from_numpy(host.view(raw)).view(tdtype)
        if target is not None and target.type != "cpu":
            t = t.to(target)
        return t

    def check_device(self, device: Any) -> None:
        target = self._device(device)
        if target is None or target.type == "cpu":
            return
        if target.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {device!r} is not available: torch.cuda.is_available() is False"
            )
        if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device {device!r} is out of range: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        try:  # "cuda" parses on a CPU-only build; only an allocation tells it is unusable
            torch.empty(0, device=target)
        except (RuntimeError, AssertionError) as exc:
            raise InvalidInputError(f"device {device!r} is not available: {exc}") from exc

    @staticmethod
    def _device(device: Any) -> torch.device | None:
        if device is None:
            return None
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidInputError(f"{device!r} is not a PyTorch device: {exc}") from exc


def pinned_empty(nbytes: int) -> np.ndarray:
    """Page-locked host memory, so device-to-host copies run at full PCIe speed."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
