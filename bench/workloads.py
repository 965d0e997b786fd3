"""The benchmark workloads: W1 (few large tensors), W2 (many tiny ones), W3 (transformer-like,
torch), W4 (the same shape of state as JAX arrays: Flax-style params and an optax AdamW state).

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
    "W4": "JAX on CPU, ~310 MiB: a Flax-style transformer's f32 params and their optax "
    "AdamW state (mu, nu)",
}


@dataclass
class Workload:
    name: str
    model: Any  # a flat dict of arrays; for "jax", a pytree (nested dicts)
    optimizer: Any  # the same; for "jax", an optax state (tuples of namedtuples)
    framework: str  # "numpy", "torch" or "jax"

    def leaves(self) -> list[Any]:
        if self.framework == "jax":
            import jax

            return jax.tree_util.tree_leaves((self.model, self.optimizer))
        return [*self.model.values(), *self.optimizer.values()]

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.leaves())

    @property
    def tensors(self) -> int:
        return len(self.leaves())

    def as_torch(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The same state as torch tensors (sharing memory when it is on the host)."""
        import torch

        def conv(x: Any) -> Any:
            return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

        return {k: conv(v) for k, v in self.model.items()}, {
            k: conv(v) for k, v in self.optimizer.items()
        }

    def as_numpy(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The same bytes as flat dicts of NumPy arrays (bf16 as ml_dtypes.bfloat16), on
        the host; JAX leaves named by their pytree paths (views of the JAX buffers)."""
        if self.framework == "jax":
            return _flat_numpy(self.model), _flat_numpy(self.optimizer)

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


def _flat_numpy(tree: Any) -> dict[str, np.ndarray]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


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
    if name == "W4":
        if device != "cpu":
            raise SystemExit("W4 is JAX state on the CPU: run it without --gpu")
        return _jax_transformer(quick)
    raise SystemExit(f"unknown workload {name!r}; choose W1, W2, W3 or W4")


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


def _jax_transformer(quick: bool) -> Workload:
    """Flax-style params (``{"params": {module: {"kernel", "bias", ...}}}``) of a small
    transformer in float32 and the optax AdamW state for them, as jax.Arrays on the CPU.
    The moments are random (optax starts them at zero, which a layer below might compress)."""
    import jax
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)

    def rand(*shape: int) -> Any:
        return jnp.asarray(rng.random(shape, dtype=np.float32))

    d, layers, vocab = (128, 2, 4096) if quick else (512, 6, 8192)
    params: dict[str, Any] = {"embed": {"embedding": rand(vocab, d)}}
    for i in range(layers):
        params[f"block_{i}"] = {
            "attn": {w: {"kernel": rand(d, d)} for w in ("query", "key", "value", "out")},
            "mlp": {
                "Dense_0": {"kernel": rand(d, 4 * d), "bias": rand(4 * d)},
                "Dense_1": {"kernel": rand(4 * d, d), "bias": rand(d)},
            },
            "LayerNorm_0": {"scale": rand(d), "bias": rand(d)},
            "LayerNorm_1": {"scale": rand(d), "bias": rand(d)},
        }
    params["lm_head"] = {"kernel": rand(d, vocab)}
    tree = {"params": params}
    # The state's structure without allocating optax's zeros (freed memory would be reused
    # unseen by what is measured), then random moments and a step count
    shapes = jax.eval_shape(optax.adamw(1e-3).init, tree)
    opt = jax.tree_util.tree_map(
        lambda x: rand(*x.shape) if x.shape else jnp.zeros((), x.dtype), shapes
    )
    return Workload("W4", tree, opt, "jax")
