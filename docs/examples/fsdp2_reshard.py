"""FSDP2 on 2 processes saves its sharded state; 3 processes, then 1, load it back.

Each rank saves ``model.state_dict()`` as it is (DTensors); placements come from the
arrays. Loading fills the new model's DTensors in place, each rank reading only the
bytes of its own shards.

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


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    return fully_shard(model)


def run(rank: int, world: int, port: int, ckpt: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    model = build()
    if mode == "save":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.linspace(-1, 1, 32).reshape(8, 4)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        ac.save_distributed_checkpoint(ckpt, rank, world, model.state_dict(),
                                       training_state=ac.TrainingState(3))
    else:
        stats = ac.ReadStats()
        ckpt_state = ac.load_distributed_checkpoint(ckpt, rank, world_size=world,
                                                    into=model.state_dict(), stats=stats)
        # The trained weights, now sharded 3 ways (FSDP2's uneven rows), in the live model.
        whole = ac.load_distributed_checkpoint(ckpt, 0, world_size=1).model
        for name, p in model.state_dict().items():
            assert torch.equal(p.full_tensor(), torch.from_numpy(whole[name])), name
        print(f"rank {rank}: step {ckpt_state.training_state.step}, "
              f"read {stats.bytes_read} bytes of its shards")
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
    print("saved by 2 ranks, restored on 3: weights exact")
