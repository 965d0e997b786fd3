"""Coordinated, asynchronous distributed checkpoints with torch.distributed.

Run (CPU, two processes on this machine):

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 \
        docs/examples/distributed_torchrun.py /tmp/ckpt

Each rank holds half of a tensor-parallel layer. Saves are asynchronous: the training loop
keeps running its own collectives while the writer thread commits the checkpoint over a
dedicated gloo group. Afterwards rank 0 reshards the checkpoint for one process and merges it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import arrayckpt as ac

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/arrayckpt-example")
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(rank)
model = {"attn.wq": torch.randn(4, 8), "norm.weight": torch.ones(8)}  # wq: this rank's rows
optim = {"attn.wq.exp_avg": torch.zeros(4, 8)}
sharding = ac.ShardingConfig(ac.TensorParallel(), {"attn.wq": 0, "attn.wq.exp_avg": 0})

with ac.AsyncCheckpointer() as ckpt:
    for step in range(1, 4):
        grad = torch.randn(4, 8)
        dist.all_reduce(grad)  # the training loop's own collective, on the default group
        model["attn.wq"] -= 0.01 * grad
        optim["attn.wq.exp_avg"].mul_(0.9).add_(grad, alpha=0.1)
        # Returns once this rank's tensors are copied; torch.distributed is initialised,
        # so the save is coordinated: committed once all ranks wrote, or not at all.
        ckpt.save_distributed(
            root / f"step_{step}", rank, world, model, optim, ac.TrainingState(step), sharding
        )

dist.barrier()
if rank == 0:
    # Every rank's save returned after the commit: all three checkpoints are complete.
    one = ac.load_distributed_checkpoint(root / "step_3", 0, world_size=1, xp=torch)
    print("resharded for 1 rank:", {k: tuple(v.shape) for k, v in one.model.items()})
    ac.consolidate_checkpoint(root / "step_3", root / "merged")
    merged = ac.load_checkpoint(root / "merged", xp=torch)
    assert torch.equal(merged.model["attn.wq"], one.model["attn.wq"])
    print("merged checkpoint at", root / "merged", "step", merged.training_state.step)
dist.destroy_process_group()
# Skip the interpreter's shutdown: PyTorch's gloo worker threads outlive the process group
# and may free a tensor during it, which aborts the process (pytorch/pytorch#179291). The
# checkpointer is closed, so every save is committed.
sys.stdout.flush()
os._exit(0)
