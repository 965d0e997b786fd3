"""Coordinated checkpoints of sharded jax.Arrays over jax.distributed: two CPU processes
with two devices each, one global mesh of four.

    python distributed_jax.py ROOT --steps 3   # starts both processes; saves steps 1..3
    python distributed_jax.py ROOT --steps 5   # resumes from step 3

Once jax.distributed is initialised (and torch.distributed is not), the default
``coordinator="auto"`` commits every save through jax.distributed's own service: a step
appears whole, for every process, or not at all. Each process writes only the shards
its devices hold; the shardings come from the arrays.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

# Before jax is imported: this example runs on CPU, two devices per process.
os.environ["JAX_PLATFORMS"] = "cpu"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    os.environ["XLA_FLAGS"] = flags.strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import arrayckpt as ac

WORLD = 2


@jax.jit
def train_step(params: dict, momentum: dict, step: jax.Array) -> tuple[dict, dict]:
    grads = jax.tree.map(lambda p: jnp.sin(p + step), params)  # stands in for a gradient
    momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, grads)
    params = jax.tree.map(lambda p, m: p - 0.01 * m, params, momentum)
    return params, momentum


def run(process_id: int, port: int, root: str, steps: int) -> None:
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=WORLD,
        process_id=process_id,
        coordinator_bind_address=f"127.0.0.1:{port}",  # this machine only
        initialization_timeout=60,
    )
    rank = jax.process_index()
    mesh = jax.make_mesh((2, 2), ("data", "model"))  # process 0 holds mesh row 0
    layout = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P())}
    init = {"w": np.arange(64, dtype=np.float32).reshape(8, 8) / 64, "b": np.zeros(8, np.float32)}
    params = {k: jax.device_put(v, layout[k]) for k, v in init.items()}
    momentum = jax.tree.map(jnp.zeros_like, params)
    mgr = ac.CheckpointManager(root)  # on every process: lists the complete steps
    latest, start = mgr.latest_step(), 1
    if latest is not None:
        # The arrays are templates: each device reads only its own slice of each tensor.
        ckpt = ac.load_distributed_checkpoint(
            mgr.directory(latest), rank, into=params, optimizer_into=momentum
        )
        params, momentum, start = ckpt.model, ckpt.optimizer, latest + 1
        print(f"process {rank}: resumed from step {latest}", flush=True)

    with ac.AsyncCheckpointer() as ckpt:
        for step in range(start, steps + 1):
            params, momentum = train_step(params, momentum, jnp.float32(step))
            # Returns once this process's shards are copied; the commit runs on the writer
            # thread. sharding=None: the layout comes from the arrays.
            ckpt.save_distributed(
                mgr.directory(step), rank, WORLD, params, momentum, ac.TrainingState(step)
            )
    # The checkpointer is closed: the last step is committed on every process.
    if rank == 0:
        one = ac.load_distributed_checkpoint(mgr.directory(steps), 0, world_size=1)
        w = params["w"]
        same = all(np.array_equal(s.data, one.model["w"][s.index]) for s in w.addressable_shards)
        print(
            f"step {steps} for one process: w {one.model['w'].shape}, matches: {same}", flush=True
        )
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_id is not None:
        run(args.process_id, args.port, args.root, args.steps)
        return
    # jax.distributed wants one process per participant: start this script twice.
    port, me = free_port(), [sys.executable, __file__, args.root, "--steps", str(args.steps)]
    procs = [
        subprocess.Popen([*me, "--process-id", str(i), "--port", str(port)]) for i in range(WORLD)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    sys.exit(max(codes, key=abs))


if __name__ == "__main__":
    main()
