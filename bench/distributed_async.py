"""Measures coordinated distributed saves beside training collectives (torch.distributed, gloo).

Run: torchrun --nproc-per-node 2 --master-addr 127.0.0.1 bench/distributed_async.py [MiB]
Prints, on rank 0: building the dedicated group, a synchronous coordinated save, the stall
of an asynchronous one, and the latency of the training loop's all_reduce alone and while
the background commit runs (on its own gloo group).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import arrayckpt as ac
from arrayckpt.distributed.coordinator import resolve

mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
root = tempfile.mkdtemp() if rank == 0 else ""
shared = [root]
dist.broadcast_object_list(shared, src=0)  # the bench may pickle; the library never does
root = shared[0]
n = mib * 2**20 // 4 // 8
model = {f"layer{i}.w": torch.randn(n) for i in range(8)}
sharding = ac.ShardingConfig(ac.TensorParallel(), {k: 0 for k in model})
grad = torch.randn(2**18)  # 1 MiB


def allreduce_ms(count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        dist.all_reduce(grad)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


t0 = time.perf_counter()
resolve("auto", rank, world)
group_s = time.perf_counter() - t0
dist.barrier()
t0 = time.perf_counter()
ac.save_distributed_checkpoint(
    f"{root}/sync", rank, world, model, None, ac.TrainingState(1), sharding
)
sync_s = time.perf_counter() - t0
alone = allreduce_ms(50)
with ac.AsyncCheckpointer() as ckpt:
    # The first save warms the staging buffers (page faults); the second shows steady state.
    ckpt.save_distributed(
        f"{root}/warmup", rank, world, model, None, ac.TrainingState(2), sharding
    ).result()
    dist.barrier()
    future = ckpt.save_distributed(
        f"{root}/async", rank, world, model, None, ac.TrainingState(2), sharding
    )
    stall = ckpt.last_stall_s
    t0 = time.perf_counter()
    during: list[float] = []
    flag = torch.zeros(1)
    while True:  # same number of collectives on every rank: stop when all saves are done
        during += allreduce_ms(1)
        flag[0] = float(future.done())
        dist.all_reduce(flag)
        if flag[0] == world:
            break
    async_s = time.perf_counter() - t0
    future.result()
if rank == 0:
    print(f"world {world}, {mib} MiB per rank, 8 tensors")
    print(f"  dedicated gloo group, built once:     {group_s * 1e3:8.1f} ms")
    print(f"  synchronous coordinated save:         {sync_s * 1e3:8.1f} ms")
    print(f"  asynchronous save, caller's stall:    {stall * 1e3:8.1f} ms  (warm buffers)")
    print(f"  asynchronous save, until committed:   {async_s * 1e3:8.1f} ms")
    print(f"  1 MiB all_reduce alone (median):      {statistics.median(alone):8.2f} ms")
    print(
        f"  1 MiB all_reduce during commit (med): {statistics.median(during):8.2f} ms"
        f"  ({len(during)} calls)"
    )
dist.destroy_process_group()
