"""FSDP2 + AdamW saved on 2 processes, restored as sharded jax.Arrays on 8 devices, saved
from JAX, and restored as DTensors on 3 processes.

The checkpoint is the same format both ways: each tensor's boxes with their global
offsets. Torch and JAX never meet in one process; JAX runs in a child, because its CPU
device count is fixed when it is first imported.

    python fsdp2_to_jax.py CKPT_DIR
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import arrayckpt as ac

SIZES = (8, 16, 8)  # Linear(8, 16), Tanh, Linear(16, 8): JAX shards only evenly


def build_torch() -> tuple:
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Tanh(), torch.nn.Linear(SIZES[1], SIZES[2])
    )
    for layer in (model[0], model[2]):
        fully_shard(layer)
    model = fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def torch_rank(rank: int, world: int, port: int, directory: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    model, opt = build_torch()
    x = torch.linspace(-1, 1, 8 * SIZES[0]).reshape(8, SIZES[0])
    if world == 2:  # train 3 steps and save: each rank writes its rows
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        ac.save_distributed_checkpoint(
            f"{directory}/torch",
            rank,
            world,
            model.state_dict(),
            opt.state_dict(),
            ac.TrainingState(3),
        )
    else:  # restore what JAX saved: fill this rank's rows in place
        for p in model.parameters():  # create AdamW's state to fill (lr=0: no change)
            p.grad = torch.zeros_like(p)
        opt.param_groups[0]["lr"] = 0.0
        opt.step()
        opt.param_groups[0]["lr"] = 0.01
        ac.load_distributed_checkpoint(
            f"{directory}/jax",
            rank,
            world_size=world,
            into=model.state_dict(),
            optimizer_into=opt.state_dict(),
        )
        want = ac.load_distributed_checkpoint(f"{directory}/torch", 0, world_size=1)
        for name, p in model.state_dict().items():
            assert torch.equal(p.full_tensor(), torch.from_numpy(want.model[name])), name
        for i, state in opt.state_dict()["state"].items():
            saved = torch.from_numpy(want.optimizer["state"][i]["exp_avg_sq"])
            assert torch.equal(state["exp_avg_sq"].full_tensor(), saved), i
        if rank == 0:
            print("3 torch ranks: weights and AdamW state equal what 2 ranks saved")
    dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort


def jax_process(directory: str) -> None:
    """8 CPU devices in a (4, 2) mesh; the FSDP2 state restored onto it, then saved."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"))

    def sharded(shape: tuple, *spec: object) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(*spec)))

    model = {  # torch's names, JAX's shardings
        "0.weight": sharded((SIZES[1], SIZES[0]), "data", "model"),
        "0.bias": sharded((SIZES[1],), ("data", "model")),
        "2.weight": sharded((SIZES[2], SIZES[1]), "model", "data"),
        "2.bias": sharded((SIZES[2],)),  # replicated on every device
    }
    optimizer = {  # AdamW's state_dict: state by parameter index, param_groups as saved
        "state": {
            i: {"step": sharded(()), "exp_avg": t, "exp_avg_sq": t}
            for i, t in enumerate(model.values())
        },
        "param_groups": ...,  # not an array: whatever the checkpoint holds
    }
    got = ac.load_checkpoint(
        f"{directory}/torch", xp="jax.numpy", into=model, optimizer_into=optimizer
    )
    w = got.model["0.weight"]
    assert w.sharding == model["0.weight"].sharding
    print(
        f"JAX: 0.weight {w.shape} over {len(w.sharding.device_set)} devices, "
        f"shard {w.addressable_shards[0].data.shape} on each; "
        f"step {int(got.optimizer['state'][0]['step'])}"
    )
    whole = ac.load_distributed_checkpoint(f"{directory}/torch", 0, world_size=1)
    assert np.array_equal(np.asarray(w), whole.model["0.weight"])
    # and back: each jax.Array's shards are written as its global box
    ac.save_distributed_checkpoint(
        f"{directory}/jax", 0, 1, got.model, got.optimizer, got.training_state
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    if sys.argv[1] == "--jax":
        jax_process(sys.argv[2])
        sys.exit()
    import torch.multiprocessing as mp

    directory = sys.argv[1]
    mp.spawn(torch_rank, args=(2, free_port(), directory), nprocs=2)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    subprocess.run([sys.executable, str(Path(__file__)), "--jax", directory], env=env, check=True)
    mp.spawn(torch_rank, args=(3, free_port(), directory), nprocs=3)
