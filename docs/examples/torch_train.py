"""A PyTorch training loop that checkpoints with CheckpointManager and resumes after a crash.

python torch_train.py ROOT --crash-at 60   # trains, saves every 25 steps, "crashes"
python torch_train.py ROOT                 # resumes from the latest complete step
"""

from __future__ import annotations

import argparse
import os

import torch

import arrayckpt as ac


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)  # data depends on the step only: resuming replays it
    x = torch.randn(64, 16, generator=g)
    return x, torch.sin(x[:, :2].sum(1, keepdim=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--crash-at", type=int, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    with ac.CheckpointManager(args.root, keep_last=2, keep_every=50) as mgr:
        # One call resumes: the parameters are filled in place, the optimizer state
        # (moments, step counts, lr, betas) comes back as PyTorch's own state dict.
        ckpt = mgr.restore(xp=torch, into=model.state_dict())
        start = 1
        if ckpt is not None:
            optimizer.load_state_dict(ckpt.optimizer)
            start = ckpt.training_state.step + 1
            print(f"resumed from step {ckpt.training_state.step}")

        for step in range(start, args.steps + 1):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 25 == 0:
                # Returns once the tensors are copied; the write runs in the background.
                mgr.save(
                    step,
                    model.state_dict(),
                    optimizer.state_dict(),
                    ac.TrainingState(
                        step=step, learning_rate=1e-2, metadata={"loss": f"{loss.item():.6f}"}
                    ),
                )
                print(f"step {step}: loss {loss.item():.4f}, saved")
            if step == args.crash_at:
                os._exit(3)  # a crash: no cleanup, and the last save may be cut short
    print(f"done: loss {loss.item():.6f}, steps kept: {mgr.steps()}")


if __name__ == "__main__":
    main()
