"""A training run for tests/test_exact_resume.py: resumes from its latest checkpoint,
logs each step's loss and learning rate, and can pause after a step to be killed.

    python resume_child.py torch|numpy ROOT STEPS [PAUSE_AFTER_STEP]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import arrayckpt as ac

WARMUP, BATCH, N, EVERY = 5, 8, 96, 4


def schedule(step: int, total: int) -> float:
    """Linear warmup, then cosine decay: a factor of the base learning rate."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, total - WARMUP)))


def log(root: Path, record: dict[str, Any]) -> None:
    with open(root / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def pause_here(root: Path) -> None:
    """Wait to be SIGKILLed; leave by itself if nobody does."""
    (root / "paused").write_text(str(os.getpid()))
    time.sleep(300)
    sys.exit(3)


def run_torch(root: Path, steps: int, pause: int | None) -> None:
    import torch

    torch.manual_seed(0)
    data_gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, generator=data_gen)
    y = torch.sin(x.sum(1, keepdim=True))
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    shuffle = torch.Generator().manual_seed(2)
    epoch, index, epoch_start = 0, 0, shuffle.get_state()
    with ac.CheckpointManager(root / "ckpt", keep_last=2) as mgr:
        ckpt = mgr.restore(xp="torch", into=model.state_dict())
        step = 0
        if ckpt is not None:
            step = ckpt.training_state.step
            opt.load_state_dict(ckpt.optimizer)
            sched.load_state_dict(ckpt.extra["scheduler"])
            data = ckpt.extra["data"]
            epoch, index, epoch_start = data["epoch"], data["index"], data["epoch_start"]
            ac.set_rng_state(ckpt.extra["rng"])
            log(root, {"resumed_from": step})
        shuffle.set_state(epoch_start)
        perm = torch.randperm(N, generator=shuffle)
        while step < steps:
            if index == N // BATCH:
                epoch, index, epoch_start = epoch + 1, 0, shuffle.get_state()
                perm = torch.randperm(N, generator=shuffle)
            batch = perm[index * BATCH : (index + 1) * BATCH]
            lr = opt.param_groups[0]["lr"]
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step, index = step + 1, index + 1
            log(root, {"step": step, "loss": float(loss).hex(), "lr": float(lr).hex()})
            if step % EVERY == 0:
                mgr.save(
                    step,
                    model.state_dict(),
                    opt.state_dict(),
                    ac.TrainingState(step, epoch),
                    extra={
                        "scheduler": sched.state_dict(),
                        "data": {"epoch": epoch, "index": index, "epoch_start": epoch_start},
                        "rng": ac.get_rng_state(),
                    },
                )
            if step == pause:
                pause_here(root)
    ac.save_checkpoint(root / "final", model.state_dict())


def run_numpy(root: Path, steps: int, pause: int | None) -> None:
    data_rng = np.random.default_rng(1)
    x = data_rng.standard_normal((N, 8))
    y = np.sin(x.sum(1, keepdims=True))
    model = {
        "w1": data_rng.standard_normal((8, 32)) / 3,
        "b1": np.zeros(32),
        "w2": data_rng.standard_normal((32, 1)) / 6,
        "b2": np.zeros(1),
    }
    moments = {k: {"m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in model.items()}
    np.random.seed(0)  # the global generator drives dropout
    shuffle = np.random.default_rng(2)  # PCG64: its state holds 128-bit ints
    epoch, index, epoch_start = 0, 0, shuffle.bit_generator.state
    with ac.CheckpointManager(root / "ckpt", keep_last=2) as mgr:
        ckpt = mgr.restore()
        step = 0
        if ckpt is not None:
            step = ckpt.training_state.step
            model = {k: np.array(v) for k, v in ckpt.model.items()}
            moments = {k: {n: np.array(a) for n, a in m.items()} for k, m in ckpt.optimizer.items()}
            data = ckpt.extra["data"]
            epoch, index, epoch_start = data["epoch"], data["index"], data["epoch_start"]
            ac.set_rng_state(ckpt.extra["rng"])
            log(root, {"resumed_from": step})
        shuffle.bit_generator.state = epoch_start
        perm = shuffle.permutation(N)
        while step < steps:
            if index == N // BATCH:
                epoch, index, epoch_start = epoch + 1, 0, shuffle.bit_generator.state
                perm = shuffle.permutation(N)
            batch = perm[index * BATCH : (index + 1) * BATCH]
            lr = 1e-2 * schedule(step, steps)
            xb, yb = x[batch], y[batch]
            h = np.tanh(xb @ model["w1"] + model["b1"])
            keep = (np.random.rand(*h.shape) > 0.1) / 0.9
            hd = h * keep
            err = hd @ model["w2"] + model["b2"] - yb
            loss = float(np.mean(err**2))
            g = 2 * err / len(xb)
            gh = (g @ model["w2"].T) * keep * (1 - h**2)
            grads = {"w2": hd.T @ g, "b2": g.sum(0), "w1": xb.T @ gh, "b1": gh.sum(0)}
            step, index = step + 1, index + 1
            for k, grad in grads.items():  # AdamW
                m, v = moments[k]["m"], moments[k]["v"]
                m[:] = 0.9 * m + 0.1 * grad
                v[:] = 0.999 * v + 0.001 * grad**2
                update = (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
                model[k] -= lr * (update + (0.1 * model[k] if k.startswith("w") else 0))
            log(root, {"step": step, "loss": loss.hex(), "lr": lr.hex()})
            if step % EVERY == 0:
                mgr.save(
                    step,
                    model,
                    moments,
                    ac.TrainingState(step, epoch, lr),
                    extra={
                        "data": {"epoch": epoch, "index": index, "epoch_start": epoch_start},
                        "rng": ac.get_rng_state(),
                    },
                )
            if step == pause:
                pause_here(root)
    ac.save_checkpoint(root / "final", model)


if __name__ == "__main__":
    kind, root_arg, steps_arg = sys.argv[1:4]
    pause_arg = int(sys.argv[4]) if len(sys.argv) > 4 else None
    run = run_torch if kind == "torch" else run_numpy
    run(Path(root_arg), int(steps_arg), pause_arg)
