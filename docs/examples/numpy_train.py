"""A NumPy training loop that checkpoints with CheckpointManager and resumes after a crash.

python numpy_train.py ROOT --crash-at 60   # trains, saves every 20 steps, "crashes"
python numpy_train.py ROOT                 # resumes from the latest complete step
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import arrayckpt as ac


def init() -> dict:
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((8, 1)).astype(np.float32), "b": np.zeros(1, np.float32)}
    momentum = {k: np.zeros_like(v) for k, v in params.items()}
    return {"params": params, "momentum": momentum}


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)  # data depends on the step only: resuming replays it
    x = rng.standard_normal((64, 8)).astype(np.float32)
    return x, x @ np.arange(8, dtype=np.float32)[:, None] + 1.0


def train_step(state: dict, step: int, lr: float) -> float:
    params, momentum = state["params"], state["momentum"]
    x, y = batch(step)
    err = x @ params["w"] + params["b"] - y
    grads = {"w": 2 * x.T @ err / len(x), "b": 2 * err.mean(0)}
    for k, g in grads.items():
        momentum[k] *= 0.9
        momentum[k] += g
        params[k] -= lr * momentum[k]
    return float((err**2).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--crash-at", type=int, default=None)
    args = parser.parse_args()
    lr = 0.01
    state = init()
    with ac.CheckpointManager(args.root, keep_last=2) as mgr:
        # One call resumes: the latest complete step, or None on a fresh start.
        ckpt = mgr.restore(into=state["params"])  # parameters are filled in place
        start = 1
        if ckpt is not None:
            state["momentum"] = ckpt.optimizer
            start = ckpt.training_state.step + 1
            print(f"resumed from step {ckpt.training_state.step}")
        for step in range(start, args.steps + 1):
            loss = train_step(state, step, lr)
            if step % 20 == 0:
                mgr.save(
                    step,
                    state["params"],
                    state["momentum"],
                    ac.TrainingState(step=step, learning_rate=lr, metadata={"loss": f"{loss:.6f}"}),
                )
                print(f"step {step}: loss {loss:.4f}, saved")
            if step == args.crash_at:
                os._exit(3)  # a crash: no cleanup, and the last save may be cut short
    print(f"done: loss {loss:.6f}")


if __name__ == "__main__":
    main()
