"""FSDP2 + AdamW on 2 processes saves model and optimizer state; 3 processes load it back.

Each rank saves ``model.state_dict()`` and ``optimizer.state_dict()`` as they are: the
optimizer's is nested (``state`` keyed by parameter index, each with ``exp_avg`` and
``exp_avg_sq`` DTensors and a ``step`` tensor, plus ``param_groups``); placements come
from the arrays. Loading fills the new model's and optimizer's tensors in place, each rank
reading only the bytes of its own shards.

    python fsdp2_reshard.py CKPT_DIR
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import arrayckpt as ac

X = torch.linspace(-1, 1, 32).reshape(8, 4)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    model = fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()


def create_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """A fresh AdamW holds no state to fill: one step with zero gradients at lr=0 creates
    exp_avg, exp_avg_sq and step, sharded like the parameters, and changes no weight."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    opt.zero_grad()


def run(rank: int, world: int, port: int, ckpt: str, mode: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    model, opt = build()
    if mode == "save":
        for _ in range(3):
            train_step(model, opt)
        ac.save_distributed_checkpoint(
            ckpt, rank, world, model.state_dict(), opt.state_dict(), ac.TrainingState(3)
        )
    else:
        create_optimizer_state(model, opt)
        stats = ac.ReadStats()
        ckpt_state = ac.load_distributed_checkpoint(
            ckpt,
            rank,
            world_size=world,
            into=model.state_dict(),
            optimizer_into=opt.state_dict(),
            stats=stats,
        )
        # The trained weights and AdamW moments, now sharded 3 ways (FSDP2's uneven rows).
        whole = ac.load_distributed_checkpoint(ckpt, 0, world_size=1)
        for name, p in model.state_dict().items():
            assert torch.equal(p.full_tensor(), torch.from_numpy(whole.model[name])), name
        for index, state in opt.state_dict()["state"].items():
            saved = whole.optimizer["state"][index]
            assert float(state["step"]) == float(saved["step"]) == 3.0
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[moment].full_tensor(), torch.from_numpy(saved[moment])), (
                    index,
                    moment,
                )
        train_step(model, opt)  # training goes on from step 3
        print(
            f"rank {rank}: step {ckpt_state.training_state.step}, "
            f"read {stats.bytes_read} bytes of its shards"
        )
    dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    directory = sys.argv[1]
    mp.spawn(run, args=(2, free_port(), directory, "save"), nprocs=2)
    mp.spawn(run, args=(3, free_port(), directory, "load"), nprocs=3)
    print("saved by 2 ranks, restored on 3: weights and AdamW state exact")
