"""One gloo rank of the FSDP2 + AdamW resume test; writes result_{rank}.json.

Usage: python tests/_fsdp2_worker.py {train|resume} CKPT_DIR OUT_DIR

``train`` (2 ranks) takes 3 AdamW steps, saves model and optimizer state (the nested
``optimizer.state_dict()`` as FSDP2 hands it), then takes 3 more, recording every loss.
``resume`` (any world size) builds the same model, loads the checkpoint into it and its
optimizer in place, and takes the same 3 steps.
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
from torch.distributed.fsdp import fully_shard

import arrayckpt as ac

SCENARIO, CKPT, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
X = torch.linspace(-1, 1, 40).reshape(8, 5)
Y = torch.linspace(1, -1, 24).reshape(8, 3)


def build(
    widths: tuple[int, int, int] = (5, 7, 3),
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An FSDP2 MLP of ``widths`` (in, hidden, out) with AdamW, the same on every rank."""
    torch.manual_seed(0)
    a, b, c = widths
    model = torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.Tanh(), torch.nn.Linear(b, c))
    for m in (model[0], model[2], model):
        fully_shard(m)
        # Sum gradients instead of averaging: with only rank 0 contributing (see step),
        # the sum is exactly rank 0's gradient at every world size.
        m.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        m.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  # plain SUM
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    rank: int,
    x: torch.Tensor = X,
    y: torch.Tensor = Y,
) -> float:
    # Summing different ranks' gradients rounds differently at each world size, so the
    # whole batch is rank 0's; the others' zero gradients add exactly nothing.
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    (loss if rank == 0 else loss * 0.0).backward()
    opt.step()
    return float(loss.item())


def init_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Create AdamW's state (exp_avg, exp_avg_sq, step) so that a load can fill it: one
    step with zero gradients at lr=0 leaves the parameters as they are."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr
    opt.zero_grad()


def main() -> None:
    faulthandler.dump_traceback_later(90, exit=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank}
    try:
        model, opt = build()
        if SCENARIO == "train":
            before = [step(model, opt, rank) for _ in range(3)]
            ac.save_distributed_checkpoint(
                CKPT, rank, world, model.state_dict(), opt.state_dict(), ac.TrainingState(3)
            )
            with ac.AsyncCheckpointer() as ckpt:  # the same save, from the writer thread
                ckpt.save_distributed(
                    CKPT.parent / "async",
                    rank,
                    world,
                    model.state_dict(),
                    opt.state_dict(),
                    ac.TrainingState(3),
                ).result(timeout=60)
            result["losses"] = before + [step(model, opt, rank) for _ in range(3)]
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
            result["opt_steps"] = sorted({float(s["step"]) for s in opt.state.values()})
            result["bytes_read"] = stats.bytes_read
            result["losses"] = [step(model, opt, rank) for _ in range(3)]
        result["ok"] = True
    except Exception:
        result["ok"] = False
        result["error"] = traceback.format_exc()
    (OUT / f"result_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort (see examples)


if __name__ == "__main__":
    main()
