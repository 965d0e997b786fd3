"""One gloo rank of the TP x FSDP tests (tests/test_dtensor_tp.py); writes result_{rank}.json.

Usage: python tests/_dtensor_tp_worker.py {train|resume|fsdp} CKPT_DIR OUT_DIR

``train`` (4 ranks, a 2 x 2 ("dp", "tp") mesh): a ColwiseParallel + RowwiseParallel model
under ``fully_shard`` on "dp" takes 3 AdamW steps, is saved (synchronously, and from the
writer thread), and takes 3 more; a tensor is also saved under every placement pair a
2-D mesh gives, and two inconsistent saves are tried. ``resume`` (4 ranks, the same
mesh) loads the model back and takes the same 3 steps, and loads each placement's tensor
into another placement. ``fsdp`` (2 ranks) loads the TP x FSDP checkpoint into the same
model sharded by FSDP alone.
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
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

import arrayckpt as ac
from arrayckpt.distributed.global_shards import dtensor_runs

SCENARIO, CKPT, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
X = torch.linspace(-1, 1, 40).reshape(8, 5)
Y = torch.linspace(1, -1, 24).reshape(8, 3)
#: 7 rows and 6 columns: uneven over 2 and over 4 (a strided shard's rows are not one run).
G = torch.arange(42, dtype=torch.float32).reshape(7, 6)
PLACEMENTS: dict[str, tuple[Any, Any]] = {
    "s0_s0": (Shard(0), Shard(0)),
    "s0_s1": (Shard(0), Shard(1)),
    "s1_s0": (Shard(1), Shard(0)),
    "r_s1": (Replicate(), Shard(1)),
    "s0_r": (Shard(0), Replicate()),
    "r_r": (Replicate(), Replicate()),
    "ss0_s0": (_StridedShard(0, split_factor=2), Shard(0)),
    "s0_ss0": (Shard(0), _StridedShard(0, split_factor=2)),
    "ss1_s1": (_StridedShard(1, split_factor=2), Shard(1)),
}


def build(mesh: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """6 hidden units: even over "tp" (3 each), uneven over "dp" (2 and 1 rows)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    if mesh.ndim == 2:
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        mesh = mesh["dp"]
    for m in (model[0], model[2], model):
        fully_shard(m, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y)
    loss.backward()
    opt.step()
    return float(loss.item())


def init_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Create AdamW's state so that a load can fill it (lr=0: no weight changes)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr
    opt.zero_grad()


def holds_its_runs(v: DTensor) -> bool:
    """The local tensor is exactly the global indices `dtensor_runs` says it holds."""
    runs = dtensor_runs(tuple(v.shape), v.device_mesh, tuple(v.placements), "check")
    index = [torch.tensor([s + i for s, n in r for i in range(n)], dtype=torch.long) for r in runs]
    return bool(torch.equal(v.to_local(), G[index[0]][:, index[1]]))


def error_of(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except ac.CheckpointError as exc:
        return {"type": type(exc).__name__, "error": str(exc)}
    return {"type": None, "error": ""}


def inconsistent_saves(mesh: Any, rank: int, world: int) -> dict[str, Any]:
    """Ranks disagreeing on placements, and a local tensor its placements do not give."""

    def from_local(local: torch.Tensor, placements: tuple[Any, ...]) -> DTensor:
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=G.shape, stride=G.stride()
        )

    def own_box(placements: tuple[Any, ...]) -> torch.Tensor:
        runs = dtensor_runs(tuple(G.shape), mesh, placements, "g")
        (r0,), (r1,) = runs
        return G[r0[0] : r0[0] + r0[1], r1[0] : r1[0] + r1[1]].clone()

    mixed = (Shard(0), Shard(1)) if rank < 2 else (Shard(1), Shard(0))
    disagree = from_local(own_box(mixed), mixed)
    plain = (Shard(0), Shard(0))
    wrong = from_local(G[:2].clone() if rank == 3 else own_box(plain), plain)
    return {
        "disagree": error_of(
            lambda: ac.save_distributed_checkpoint(
                CKPT.parent / "bad1", rank, world, {"g": disagree}
            )
        ),
        "wrong_shape": error_of(
            lambda: ac.save_distributed_checkpoint(CKPT.parent / "bad2", rank, world, {"g": wrong})
        ),
    }


def main() -> None:
    faulthandler.dump_traceback_later(100, exit=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=40))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank}
    try:
        if SCENARIO == "fsdp":
            mesh = init_device_mesh("cpu", (world,))
        else:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model, opt = build(mesh)
        zoo = (
            # src_data_rank=None: torch splits G on each rank itself (its strided shards
            # cannot be scattered unevenly), which is what `holds_its_runs` checks against.
            {
                k: distribute_tensor(G, mesh, list(p), src_data_rank=None)
                for k, p in PLACEMENTS.items()
            }
            if mesh.ndim == 2
            else {}
        )
        if SCENARIO == "train":
            # A manager on every rank: each step is one coordinated save; keep the last 2.
            with ac.CheckpointManager(CKPT.parent / "managed", keep_last=2) as mgr:
                before = []
                for i in range(1, 4):
                    before.append(step(model, opt))
                    mgr.save(i, model.state_dict(), opt.state_dict())
            result["placements"] = {
                n: [str(p) for p in v.placements] for n, v in model.state_dict().items()
            }
            result["runs_match"] = {k: holds_its_runs(v) for k, v in zoo.items()}
            state = (model.state_dict(), opt.state_dict(), ac.TrainingState(3))
            ac.save_distributed_checkpoint(CKPT, rank, world, *state)
            with ac.AsyncCheckpointer() as ckpt:  # the same save, from the writer thread
                ckpt.save_distributed(CKPT.parent / "async", rank, world, *state).result(60)
            ac.save_distributed_checkpoint(CKPT.parent / "zoo", rank, world, zoo)
            # The reference: the unsharded values, gathered by torch, saved by one process.
            whole = {n: v.full_tensor() for n, v in model.state_dict().items()}
            whole_opt = {
                f"{i}.{k}": v.full_tensor() if isinstance(v, DTensor) else v
                for i, s in opt.state_dict()["state"].items()
                for k, v in s.items()
            }
            if rank == 0:
                ac.save_checkpoint(CKPT.parent / "whole", whole, whole_opt, ac.TrainingState(3))
            result["errors"] = inconsistent_saves(mesh, rank, world)
            result["losses"] = before + [step(model, opt) for _ in range(3)]
        else:
            init_state(model, opt)
            stats = ac.ReadStats()
            got = ac.load_distributed_checkpoint(
                CKPT,
                rank,
                world_size=world,
                into=model.state_dict(),
                optimizer_into=opt.state_dict(),
                stats=stats,
            )
            result["step"] = got.training_state.step
            result["bytes_read"] = stats.bytes_read
            reference = ac.load_checkpoint(CKPT.parent / "whole")
            result["equal"] = equal_to(reference, model, opt)
            if SCENARIO == "fsdp":  # again, through a manager: the newest step it kept
                for v in [*model.state_dict().values(), *optimizer_tensors(opt)]:
                    (v.to_local() if isinstance(v, DTensor) else v).zero_()
                managed = ac.CheckpointManager(CKPT.parent / "managed").restore(
                    into=model.state_dict(), optimizer_into=opt.state_dict()
                )
                assert managed is not None
                result["managed_step"] = managed.training_state.step
                result["managed_equal"] = equal_to(reference, model, opt)
            if SCENARIO == "resume":
                result["zoo"] = load_zoo(mesh, rank, world, zoo)
                result["target_errors"] = target_errors(mesh, rank, world)
            result["losses"] = [step(model, opt) for _ in range(3)]
        result["ok"] = True
    except Exception:
        result["ok"] = False
        result["error"] = traceback.format_exc()
    (OUT / f"result_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort (see examples)


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state_dict()["state"].values() for v in s.values()]


def equal_to(reference: Any, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, bool]:
    """Each parameter and optimizer tensor, gathered whole, against the reference."""
    got = {n: v.full_tensor() for n, v in model.state_dict().items()}
    got.update(
        {
            f"{i}.{k}": v.full_tensor() if isinstance(v, DTensor) else v
            for i, s in opt.state_dict()["state"].items()
            for k, v in s.items()
        }
    )
    want = {**reference.model, **reference.optimizer}
    return {n: bool(torch.equal(v, torch.from_numpy(want[n]))) for n, v in got.items()}


def load_zoo(mesh: Any, rank: int, world: int, zoo: dict[str, DTensor]) -> dict[str, Any]:
    """Each placement's saved tensor loaded into the next placement's target."""
    names = list(zoo)
    targets = {}
    for i, name in enumerate(names):
        target = zoo[names[(i + 1) % len(names)]]
        target.to_local().zero_()
        targets[name] = target
    stats = ac.ReadStats()
    ac.load_distributed_checkpoint(
        CKPT.parent / "zoo", rank, world_size=world, into=targets, stats=stats
    )
    return {
        "equal": {n: bool(torch.equal(t.full_tensor(), G)) for n, t in targets.items()},
        "local": {n: holds_its_runs(t) for n, t in targets.items()},
        "bytes_read": stats.bytes_read,
    }


def target_errors(mesh: Any, rank: int, world: int) -> dict[str, Any]:
    strided = [_StridedShard(0, split_factor=2), Shard(0)]

    def distribute(t: torch.Tensor) -> DTensor:
        return distribute_tensor(t, mesh, strided, src_data_rank=None)

    def load(name: str, target: Any) -> dict[str, Any]:
        return error_of(
            lambda: ac.load_distributed_checkpoint(
                CKPT.parent / "zoo", rank, world_size=world, into={name: target}
            )
        )

    bad_local = DTensor.from_local(
        torch.zeros(5, 6), mesh, strided, run_check=False, shape=G.shape, stride=G.stride()
    )
    return {
        "larger": load("ss0_s0", distribute(torch.zeros(8, 6))),
        "changed": load("ss0_s0", distribute(torch.zeros(7, 5))),
        "dtype": load("ss0_s0", distribute(G.double())),
        "bad_local": load("ss0_s0", bad_local),
    }


if __name__ == "__main__":
    main()
