"""The benchmark workloads: W1 (few large tensors), W2 (many tiny ones), W3 (transformer-like).

Values are random (not constant) so no layer below can compress or deduplicate them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MiB = 1 << 20

DESCRIPTIONS = {
    "W1": "512 MiB in 32 f32 tensors (numpy)",
    "W2": "20,000 f32 tensors of 4 KiB (numpy)",
    "W3": "transformer-like, ~260 MiB, 189 torch tensors: bf16 weights, f32 norms/biases, "
    "f32 Adam moments",
}


@dataclass
class Workload:
    name: str
    model: dict[str, Any]
    optimizer: dict[str, Any]
    framework: str  # "numpy" or "torch"

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for part in (self.model, self.optimizer) for t in part.values())

    @property
    def tensors(self) -> int:
        return len(self.model) + len(self.optimizer)

    def as_torch(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The same state as torch tensors (sharing memory when it is on the host)."""
        import torch

        def conv(x: Any) -> Any:
            return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

        return {k: conv(v) for k, v in self.model.items()}, {
            k: conv(v) for k, v in self.optimizer.items()
        }

    def as_numpy(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The same bytes as NumPy arrays (bf16 as ml_dtypes.bfloat16), on the host."""

        def conv(x: Any) -> np.ndarray:
            if isinstance(x, np.ndarray):
                return x
            import ml_dtypes
            import torch

            x = x.detach().cpu()
            if x.dtype == torch.bfloat16:
                return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return x.numpy()

        return {k: conv(v) for k, v in self.model.items()}, {
            k: conv(v) for k, v in self.optimizer.items()
        }

    def byte_buffers(self) -> list[np.ndarray]:
        """Every tensor as a flat uint8 host array (for memcpy and raw-write limits)."""
        model, optimizer = self.as_numpy()
        return [a.reshape(-1).view(np.uint8) for a in (*model.values(), *optimizer.values())]


def _nbytes(x: Any) -> int:
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    return int(x.numel() * x.element_size())


def build(name: str, *, quick: bool = False, device: str = "cpu") -> Workload:
    rng = np.random.default_rng(0)
    if name == "W1":
        n = (MiB if quick else 16 * MiB) // 4
        model = {f"layer{i}.weight": rng.random(n, dtype=np.float32) for i in range(32)}
        return _place(Workload(name, model, {}, "numpy"), device)
    if name == "W2":
        count = 2_000 if quick else 20_000
        block = rng.random(count * 1024, dtype=np.float32)
        model = {f"param{i}": block[i * 1024 : (i + 1) * 1024].copy() for i in range(count)}
        return _place(Workload(name, model, {}, "numpy"), device)
    if name == "W3":
        return _transformer(quick, device)
    raise SystemExit(f"unknown workload {name!r}; choose W1, W2 or W3")


def _place(w: Workload, device: str) -> Workload:
    if device == "cpu":
        return w
    model, optimizer = w.as_torch()
    return Workload(
        w.name,
        {k: v.to(device) for k, v in model.items()},
        {k: v.to(device) for k, v in optimizer.items()},
        "torch",
    )


def _transformer(quick: bool, device: str) -> Workload:
    import torch

    torch.manual_seed(0)
    d, layers, vocab = (256, 2, 4096) if quick else (512, 6, 8192)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "embed.weight": ((vocab, d), torch.bfloat16)
    }
    for i in range(layers):
        p = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            shapes[p + f"attn.{w}.weight"] = ((d, d), torch.bfloat16)
        shapes[p + "mlp.w1.weight"] = ((4 * d, d), torch.bfloat16)
        shapes[p + "mlp.w1.bias"] = ((4 * d,), torch.float32)
        shapes[p + "mlp.w2.weight"] = ((d, 4 * d), torch.bfloat16)
        shapes[p + "mlp.w2.bias"] = ((d,), torch.float32)
        shapes[p + "norm1.weight"] = ((d,), torch.float32)
        shapes[p + "norm2.weight"] = ((d,), torch.float32)
    shapes["norm.weight"] = ((d,), torch.float32)
    shapes["lm_head.weight"] = ((vocab, d), torch.bfloat16)
    model = {k: torch.randn(s, dtype=t, device=device) for k, (s, t) in shapes.items()}
    optimizer = {}
    for k, (s, _) in shapes.items():
        optimizer[f"state.{k}.exp_avg"] = torch.randn(s, device=device)
        optimizer[f"state.{k}.exp_avg_sq"] = torch.rand(s, device=device)
    return Workload("W3", model, optimizer, "torch")
