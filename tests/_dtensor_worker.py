"""One torch.distributed (gloo) rank of the DTensor tests; writes result_{rank}.json.

Usage: python tests/_dtensor_worker.py {save|load} CKPT_DIR OUT_DIR
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import arrayckpt as ac

SCENARIO, CKPT, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])


def global_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The values every test checks against: the same on every rank and world size."""
    w = torch.arange(15, dtype=torch.float32).reshape(5, 3)  # 5 rows: uneven over 2 and 3
    c = torch.arange(10, dtype=torch.int64).reshape(2, 5) * 7
    return (
        {"w": w, "c": c, "b": torch.arange(4, dtype=torch.float32) / 4, "plain": torch.ones(3)},
        {"w.exp_avg": w * 0.5},
    )


def sharded(mesh: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    model, opt = global_state()
    return (
        {
            "w": distribute_tensor(model["w"], mesh, [Shard(0)]),
            "c": distribute_tensor(model["c"], mesh, [Shard(1)]),
            "b": distribute_tensor(model["b"], mesh, [Replicate()]),
            "plain": model["plain"].clone(),
        },
        {"w.exp_avg": distribute_tensor(opt["w.exp_avg"], mesh, [Shard(0)])},
    )


def main() -> None:
    faulthandler.dump_traceback_later(90, exit=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, Any] = {"rank": rank}
    try:
        model, opt = sharded(mesh)
        if SCENARIO == "save":
            extra = {"rank": rank, "buf": torch.arange(2) + rank}  # each rank's own
            ac.save_distributed_checkpoint(
                CKPT, rank, world, model, opt, ac.TrainingState(7, metadata={"k": "v"}), extra=extra
            )
            with ac.AsyncCheckpointer() as ckpt:  # the same save, from the writer thread
                ckpt.save_distributed(
                    CKPT.parent / "async", rank, world, model, opt, ac.TrainingState(7), extra=extra
                ).result(timeout=60)
            result["ok"] = True
        else:
            for v in [*model.values(), *opt.values()]:
                (v.to_local() if hasattr(v, "to_local") else v).zero_()
            stats = ac.ReadStats()
            ckpt = ac.load_distributed_checkpoint(
                CKPT, rank, world_size=world, into=model, optimizer_into=opt, stats=stats
            )
            want_model, want_opt = global_state()
            result["equal"] = {
                n: bool(
                    torch.equal(
                        v.full_tensor() if hasattr(v, "full_tensor") else v,
                        {**want_model, **want_opt}[n],
                    )
                )
                for n, v in [*model.items(), *opt.items()]
            }
            result["filled_in_place"] = ckpt.model["w"] is model["w"]
            result["step"] = ckpt.training_state.step
            result["metadata"] = ckpt.training_state.metadata
            extra = ckpt.extra
            result["extra"] = None if extra is None else [extra["rank"], extra["buf"].tolist()]
            result["bytes_read"] = stats.bytes_read
            bigger = {"w": distribute_tensor(torch.zeros(6, 3), mesh, [Shard(0)])}
            try:
                ac.load_distributed_checkpoint(CKPT, rank, world_size=world, into=bigger)
            except ac.CheckpointError as exc:
                result["bigger"] = f"{type(exc).__name__}: {exc}"
            result["ok"] = True
    except Exception:
        result["ok"] = False
        result["error"] = traceback.format_exc()
    (OUT / f"result_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort (see examples)


if __name__ == "__main__":
    main()
