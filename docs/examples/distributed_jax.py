"""Coordinated checkpoints over jax.distributed: two CPU processes on this machine.

    python distributed_jax.py ROOT --steps 3   # starts both processes; saves steps 1..3
    python distributed_jax.py ROOT --steps 5   # resumes from step 3

Each process holds half of a tensor-parallel layer (its rows of ``w``). Once
jax.distributed is initialised (and torch.distributed is not), the default
``coordinator="auto"`` commits every save through jax.distributed's own service: a step
appears whole, for every process, or not at all.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import arrayckpt as ac

WORLD = 2
TP = ac.ShardingConfig(ac.TensorParallel(), {"w": 0, "w.momentum": 0})


def run(process_id: int, port: int, root: str, steps: int) -> None:
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=WORLD,
        process_id=process_id,
        coordinator_bind_address=f"127.0.0.1:{port}",  # this machine only
        initialization_timeout=60,
    )
    rank = jax.process_index()
    mgr = ac.CheckpointManager(root)  # every process: lists the complete steps
    latest = mgr.latest_step()  # every process sees the same committed steps
    w, momentum, start = jnp.full((4, 8), float(rank)), jnp.zeros((4, 8)), 1
    if latest is not None:
        ckpt = ac.load_distributed_checkpoint(mgr.directory(latest), rank, xp="jax.numpy")
        w, momentum, start = ckpt.model["w"], ckpt.optimizer["w.momentum"], latest + 1
        print(f"process {rank}: resumed from step {latest}", flush=True)

    with ac.AsyncCheckpointer() as ckpt:
        for step in range(start, steps + 1):
            grad = jnp.sin(w + step)  # stands in for this process's gradient
            momentum = 0.9 * momentum + grad
            w = w - 0.01 * momentum
            # Returns once the arrays are copied; the commit runs on the writer thread.
            ckpt.save_distributed(
                mgr.directory(step),
                rank,
                WORLD,
                {"w": w},
                {"w.momentum": momentum},
                ac.TrainingState(step),
                TP,
            )
    # The checkpointer is closed: the last step is committed on every process.
    if rank == 0:
        one = ac.load_distributed_checkpoint(mgr.directory(steps), 0, world_size=1)
        print(f"step {steps} for one process: w {one.model['w'].shape}", flush=True)
        np.testing.assert_array_equal(one.model["w"][:4], np.asarray(w))
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
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                args.root,
                "--steps",
                str(args.steps),
                "--process-id",
                str(i),
                "--port",
                str(port),
            ]
        )
        for i in range(WORLD)
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
