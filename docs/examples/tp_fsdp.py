"""Tensor parallel x FSDP on a 2 x 2 mesh (4 processes) saves; FSDP alone on 2 loads it.

Each of the 4 ranks shards the model over "tp" (ColwiseParallel, RowwiseParallel) and
then over "dp" (``fully_shard``), which gives strided shards (``_StridedShard``); it saves
``model.state_dict()`` and ``optimizer.state_dict()`` as they are. Two processes that
shard the same model with FSDP alone load it back in place, each reading only the bytes
of its own shards.

    python tp_fsdp.py CKPT_DIR
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import arrayckpt as ac

X = torch.linspace(-1, 1, 32).reshape(8, 4)


def build(world: int, tp: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    if tp:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        dp = mesh["dp"]
    else:
        dp = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=dp)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()


def create_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """A fresh AdamW holds no state to fill: one step with zero gradients at lr=0."""
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
    model, opt = build(world, tp=mode == "save")
    if mode == "save":
        for _ in range(3):
            train_step(model, opt)
        if rank == 0:
            print("0.weight is", model.state_dict()["0.weight"].placements)
        ac.save_distributed_checkpoint(
            ckpt, rank, world, model.state_dict(), opt.state_dict(), ac.TrainingState(3)
        )
    else:
        create_optimizer_state(model, opt)
        stats = ac.ReadStats()
        ac.load_distributed_checkpoint(
            ckpt,
            rank,
            world_size=world,
            into=model.state_dict(),
            optimizer_into=opt.state_dict(),
            stats=stats,
        )
        whole = ac.load_distributed_checkpoint(ckpt, 0, world_size=1)  # unsharded values
        for name, p in model.state_dict().items():
            assert torch.equal(p.full_tensor(), torch.from_numpy(whole.model[name])), name
        for index, state in opt.state_dict()["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):
                saved = torch.from_numpy(whole.optimizer["state"][index][moment])
                assert torch.equal(state[moment].full_tensor(), saved), (index, moment)
        train_step(model, opt)  # training goes on from step 3
        print(f"rank {rank}: read {stats.bytes_read} bytes")
    dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    directory = sys.argv[1]
    mp.spawn(run, args=(4, free_port(), directory, "save"), nprocs=4)
    mp.spawn(run, args=(2, free_port(), directory, "load"), nprocs=2)
    print("saved by TP x FSDP on 4 ranks, restored by FSDP on 2: weights and AdamW state exact")
