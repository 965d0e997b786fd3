"""A JAX training loop: parameters and optimizer state are pytrees, checkpointed as they are.

python jax_train.py ROOT --crash-at 60   # trains, saves every 20 steps, "crashes"
python jax_train.py ROOT                 # resumes from the latest complete step
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    sys.exit("this example needs JAX: pip install jax")

import arrayckpt as ac


def init() -> tuple[dict, dict]:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "dense": [
            {"w": jax.random.normal(k1, (8, 32)) / 3, "b": jnp.zeros(32)},
            {"w": jax.random.normal(k2, (32, 1)) / 6, "b": jnp.zeros(1)},
        ]
    }
    opt_state = {"momentum": jax.tree_util.tree_map(jnp.zeros_like, params), "beta": 0.9}
    return params, opt_state


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["dense"][0]["w"] + params["dense"][0]["b"])
    return jnp.mean((h @ params["dense"][1]["w"] + params["dense"][1]["b"] - y) ** 2)


@jax.jit
def train_step(params: dict, momentum: dict, step: int) -> tuple[dict, dict, jax.Array]:
    x = jax.random.normal(jax.random.PRNGKey(step), (64, 8))  # replayed exactly on resume
    y = jnp.sin(x[:, :2].sum(1, keepdims=True))
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    momentum = jax.tree_util.tree_map(lambda m, g: 0.9 * m + g, momentum, grads)
    params = jax.tree_util.tree_map(lambda p, m: p - 0.05 * m, params, momentum)
    return params, momentum, loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--crash-at", type=int, default=None)
    args = parser.parse_args()

    params, opt_state = init()
    with ac.CheckpointManager(args.root, keep_last=2) as mgr:
        ckpt = mgr.restore(xp=jnp)  # JAX arrays are immutable: load new ones
        start = 1
        if ckpt is not None:
            params, opt_state = ckpt.model, ckpt.optimizer
            start = ckpt.training_state.step + 1
            print(f"resumed from step {ckpt.training_state.step}")
        for step in range(start, args.steps + 1):
            params, opt_state["momentum"], loss = train_step(params, opt_state["momentum"], step)
            if step % 20 == 0:
                mgr.save(step, params, opt_state, ac.TrainingState(step=step))
                print(f"step {step}: loss {float(loss):.4f}, saved")
            if step == args.crash_at:
                os._exit(3)  # a crash: no cleanup, and the last save may be cut short
    print(f"done: loss {float(loss):.6f}")


if __name__ == "__main__":
    main()
