"""The demo: a NumPy MLP trains on shuffled minibatches, checkpoints with an async
CheckpointManager (the shuffling generator's state as ``extra=``), "crashes", resumes from
the latest step, and repeats the losses it had before the crash bit for bit."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import InvalidInputError
from .manager import CheckpointManager
from .training_state import TrainingState


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, 16)).astype(np.float32)
    w = rng.standard_normal((16, 1)).astype(np.float32)
    y = np.sin(x @ w) + 0.1 * x[:, :1] ** 2
    return x, y.astype(np.float32)


def _init(seed: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    model = {
        "layers.0.weight": (rng.standard_normal((16, 256)) / 4).astype(np.float32),
        "layers.0.bias": np.zeros(256, np.float32),
        "layers.1.weight": (rng.standard_normal((256, 1)) / 16).astype(np.float32),
        "layers.1.bias": np.zeros(1, np.float32),
    }
    optimizer = {f"{k}.momentum": np.zeros_like(v) for k, v in model.items()}
    return model, optimizer


def _step(
    model: dict[str, np.ndarray],
    opt: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    lr: float,
) -> float:
    """One step of SGD with momentum on mean squared error; updates arrays in place."""
    h = np.tanh(x @ model["layers.0.weight"] + model["layers.0.bias"])
    pred = h @ model["layers.1.weight"] + model["layers.1.bias"]
    err = pred - y
    loss = float(np.mean(err**2))
    g_pred = 2 * err / len(x)
    g_h = (g_pred @ model["layers.1.weight"].T) * (1 - h**2)
    grads = {
        "layers.1.weight": h.T @ g_pred,
        "layers.1.bias": g_pred.sum(0),
        "layers.0.weight": x.T @ g_h,
        "layers.0.bias": g_h.sum(0),
    }
    for name, g in grads.items():
        m = opt[f"{name}.momentum"]
        m *= 0.9
        m += g
        model[name] -= lr * m
    return loss


BATCH = 256


def _save(
    mgr: CheckpointManager,
    step: int,
    model: dict[str, np.ndarray],
    opt: dict[str, np.ndarray],
    loss: float,
    lr: float,
    shuffle: np.random.Generator,
    rollback: bool = False,
) -> None:
    state = TrainingState(step=step, epoch=0, learning_rate=lr, metadata={"loss": f"{loss:.6f}"})
    started = time.perf_counter()
    # Returns once the arrays are copied; writes in the background. `extra` holds what
    # else an exact resume needs: here the data order (the generator's 128-bit PCG64 state).
    mgr.save(
        step, model, opt, state, extra={"shuffle": shuffle.bit_generator.state}, rollback=rollback
    )
    stall = time.perf_counter() - started
    print(
        f"  step {step:4d}  loss {loss:.5f}  saved {Path(mgr.directory(step)).name} "
        f"asynchronously, training stalled {stall * 1e3:.2f} ms"
    )


def run(
    directory: str | None = None,
    steps: int = 300,
    every: int = 50,
    crash_at: int = 180,
    lr: float = 0.05,
) -> None:
    """Train, checkpoint every ``every`` steps, lose everything at ``crash_at``, resume.

    Raises:
        InvalidInputError: ``steps`` is too short to checkpoint, crash and resume.
        AssertionError: the resumed run's losses differ from the original run's.
    """
    if steps < 2 * every:
        raise InvalidInputError(
            f"steps must be at least {2 * every} to checkpoint, crash and resume, got {steps}"
        )
    crash_at = min(crash_at, steps * 3 // 5) if steps <= crash_at else crash_at
    if directory is not None:
        _train(Path(directory), steps, every, crash_at, lr, kept=True)
        return
    # Without --dir nothing is left behind in the temporary directory.
    with tempfile.TemporaryDirectory(prefix="arrayckpt-demo-") as tmp:
        _train(Path(tmp), steps, every, crash_at, lr, kept=False)
    print(f"removed {tmp}; run with --dir DIR to keep the checkpoints")


def _train(root: Path, steps: int, every: int, crash_at: int, lr: float, *, kept: bool) -> None:
    x, y = _data()
    model, opt = _init()
    shuffle = np.random.default_rng(2)
    print(
        f"arrayckpt demo: 2-layer MLP (16-256-1), SGD+momentum, CheckpointManager(keep_last=3) "
        f"in {root}"
    )
    losses: dict[int, float] = {}
    with CheckpointManager(root, keep_last=3) as mgr:
        previous = mgr.steps()
        if previous:
            print(
                f"  {root} holds steps {previous} of an earlier run: this run starts from "
                "scratch, so its first save rolls back (deletes) those steps"
            )
        for step in range(1, crash_at + 1):
            batch = shuffle.integers(0, len(x), BATCH)
            losses[step] = _step(model, opt, x[batch], y[batch], lr)
            if step % every == 0:
                # Steps only move forward; an explicit rollback replaces the earlier run's.
                _save(mgr, step, model, opt, losses[step], lr, shuffle, rollback=step == every)
    print(
        f"  step {crash_at:4d}  loss {losses[crash_at]:.5f}  -- simulated crash: all "
        "in-memory state lost"
    )
    del model, opt, shuffle

    with CheckpointManager(root, keep_last=3) as mgr:
        started = time.perf_counter()
        ckpt = mgr.restore()  # the latest complete step, checksums verified
        if ckpt is None:
            raise AssertionError(f"no checkpoint was written to {root}")
        state = ckpt.training_state
        print(
            f"resumed from {Path(mgr.directory(state.step)).name} (step {state.step}, saved loss "
            f"{state.metadata['loss']}) in {(time.perf_counter() - started) * 1e3:.2f} ms; "
            "CRC32C of every tensor verified"
        )
        model = {k: np.array(v) for k, v in ckpt.model.items()}
        opt = {k: np.array(v) for k, v in (ckpt.optimizer or {}).items()}
        shuffle = np.random.default_rng()
        shuffle.bit_generator.state = ckpt.extra["shuffle"]
        for step in range(state.step + 1, steps + 1):
            batch = shuffle.integers(0, len(x), BATCH)
            loss = _step(model, opt, x[batch], y[batch], state.learning_rate)
            if step in losses and loss != losses[step]:
                raise AssertionError(
                    f"step {step}: resumed loss {loss!r} != original {losses[step]!r}"
                )
            again = " (bit-identical to before the crash)" if step in losses else ""
            if step % every == 0:
                _save(mgr, step, model, opt, loss, state.learning_rate, shuffle)
            elif step == state.step + 1:
                print(f"  step {step:4d}  loss {loss:.5f}{again}")
    latest = Path(mgr.directory(mgr.latest_step() or 0))
    sizes = ", ".join(f"{f.name} ({f.stat().st_size} B)" for f in sorted(latest.iterdir()))
    print(f"kept steps {mgr.steps()}; newest on disk: {sizes}")
    if kept:
        print(f"next: python -m arrayckpt ls {root}   (or inspect / verify {latest})")
