"""One of several processes of one JAX program (jax.distributed, 4 CPU devices each) that
saves and loads sharded jax.Arrays; torch.distributed (gloo) coordinates the commit.
Writes result_{rank}.json.

Usage: python tests/_jax_multiproc_worker.py JAX_PORT CKPT_DIR OUT_DIR
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import datetime
import faulthandler
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch.distributed as dist
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import arrayckpt as ac

PORT, CKPT, OUT = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
W = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 3
B = np.arange(8, dtype=np.float32)


def make(value: np.ndarray, sharding: Any) -> Any:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def main() -> None:
    faulthandler.dump_traceback_later(90, exit=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    jax.distributed.initialize(f"127.0.0.1:{PORT}", num_processes=world, process_id=rank)
    result: dict[str, Any] = {"rank": rank}
    try:
        mesh = jax.make_mesh((4, 2), ("data", "model"))  # 8 devices, 4 in each process

        def ns(*spec: Any) -> NamedSharding:
            return NamedSharding(mesh, P(*spec))

        state = {"w": make(W, ns("data", "model")), "b": make(B, ns("model"))}
        ac.save_distributed_checkpoint(CKPT, rank, world, state, None, ac.TrainingState(2))
        # Loaded back by the same processes in other shardings: each reads only its boxes.
        template = {
            "w": jax.ShapeDtypeStruct(W.shape, np.float32, sharding=ns(None, "data")),
            "b": jax.ShapeDtypeStruct(B.shape, np.float32, sharding=ns(("data", "model"))),
        }
        stats = ac.ReadStats()
        got = ac.load_distributed_checkpoint(
            CKPT, rank, world_size=world, into=template, stats=stats
        ).model
        result["shards_equal"] = all(
            np.array_equal(np.asarray(s.data), want[s.index])
            for name, want in (("w", W), ("b", B))
            for s in got[name].addressable_shards
        )
        result["shardings"] = all(got[n].sharding == template[n].sharding for n in template)
        result["bytes_read"] = stats.bytes_read
        # Devices interleaved across processes: a process's rows are not one box.
        order = np.array(jax.devices())[[0, 4, 1, 5, 2, 6, 3, 7]]
        mixed = NamedSharding(jax.sharding.Mesh(order, ("x",)), P("x"))
        try:
            ac.save_distributed_checkpoint(
                CKPT.parent / "interleaved", rank, world, {"w": make(W, mixed)}
            )
            result["interleaved"] = "saved"
        except ac.CheckpointError as exc:
            result["interleaved"] = f"{type(exc).__name__}: {exc}"
        result["ok"] = True
    except Exception:
        result["ok"] = False
        result["error"] = traceback.format_exc()
    (OUT / f"result_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: jax.distributed's shutdown waits for peers


if __name__ == "__main__":
    main()
