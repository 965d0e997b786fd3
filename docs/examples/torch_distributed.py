"""Two processes train data-parallel with torch.distributed (gloo); rank 0 checkpoints.

The model is replicated, so one copy is saved: rank 0 owns the CheckpointManager, and on
resume every rank loads the step rank 0 chose. Every collective has a timeout.

    python torch_distributed.py ROOT --steps 40   # trains and saves steps 20 and 40
    python torch_distributed.py ROOT --steps 80   # resumes from step 40
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import arrayckpt as ac

WORLD_SIZE = 2
TIMEOUT = datetime.timedelta(seconds=60)


def run(rank: int, root: str, steps: int, port: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=TIMEOUT,
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mgr = ac.CheckpointManager(root, keep_last=2) if rank == 0 else None

    # Rank 0 picks the step to resume from; every rank loads that same step.
    # A plain tensor broadcast (broadcast_object_list would pickle); -1: nothing saved yet.
    latest = mgr.latest_step() if mgr is not None else None
    chosen = torch.tensor([-1 if latest is None else latest], dtype=torch.int64)
    dist.broadcast(chosen, src=0)
    resume_step = int(chosen.item())
    start = 1
    if resume_step >= 0:
        ckpt = ac.load_checkpoint(
            f"{root}/step_{resume_step:08d}", xp=torch, into=model.state_dict()
        )
        optimizer.load_state_dict(ckpt.optimizer)
        start = resume_step + 1
        print(f"rank {rank}: resumed from step {resume_step}", flush=True)

    for step in range(start, steps + 1):
        g = torch.Generator().manual_seed(step * WORLD_SIZE + rank)  # each rank its own shard
        x = torch.randn(32, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), torch.sin(x[:, :2].sum(1, keepdim=True)))
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # average the gradients: data parallelism
            dist.all_reduce(p.grad)
            p.grad /= WORLD_SIZE
        optimizer.step()
        if step % 20 == 0 and mgr is not None:
            mgr.save(step, model.state_dict(), optimizer.state_dict(), ac.TrainingState(step))
            print(f"rank 0: step {step}: loss {loss.item():.4f}, saved", flush=True)

    if mgr is not None:
        mgr.close()  # the last save is committed before anyone reads it
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    spread -= flat
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"done at step {steps}: ranks agree: {bool(spread.abs().max() == 0)}", flush=True)
    dist.destroy_process_group()
    leave_without_shutdown()


def leave_without_shutdown() -> None:
    """End this process now, skipping the interpreter's shutdown.

    PyTorch's gloo worker threads outlive `destroy_process_group` and may free a finished
    collective's tensors while the interpreter shuts down, which aborts the process
    ("terminate called without an active exception"; pytorch/pytorch#179291). Here every
    checkpoint is committed (the manager was closed) and the output is flushed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    mp.spawn(run, args=(args.root, args.steps, free_port()), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
