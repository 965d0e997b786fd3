"""One gloo rank of the FSDP2 <-> JAX tests; writes result_{rank}.json.

Usage: python tests/_jax_fsdp2_worker.py {train|resume} CKPT_DIR OUT_DIR

``train`` (2 ranks) takes 3 AdamW steps, saves model and optimizer state to CKPT_DIR,
then takes 3 more, recording every loss. ``resume`` (any world size) builds the same
model, loads CKPT_DIR (saved by JAX from sharded arrays) into it and its optimizer in
place, checks every value against ``CKPT_DIR/../torch`` (what ``train`` saved), and takes
the same 3 steps. The layers' sizes divide by JAX's mesh axes (JAX shards evenly only).
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

import _fsdp2_worker as fsdp2
import torch
import torch.distributed as dist
from _fsdp2_worker import init_state

import arrayckpt as ac

SCENARIO, CKPT, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
X = torch.linspace(-1, 1, 64).reshape(8, 8)
Y = torch.linspace(1, -1, 64).reshape(8, 8)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    return fsdp2.build((8, 16, 8))


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> float:
    return fsdp2.step(model, opt, rank, X, Y)


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
            result["losses"] = before + [step(model, opt, rank) for _ in range(3)]
        else:
            init_state(model, opt)
            got = ac.load_distributed_checkpoint(
                CKPT,
                rank,
                world_size=world,
                into=model.state_dict(),
                optimizer_into=opt.state_dict(),
            )
            want = ac.load_distributed_checkpoint(CKPT.parent / "torch", 0, world_size=1)
            result["step"] = got.training_state.step
            result["equal"] = {
                name: torch.equal(p.full_tensor(), torch.from_numpy(want.model[name]))
                for name, p in model.state_dict().items()
            }
            for i, state in opt.state_dict()["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    saved = torch.from_numpy(want.optimizer["state"][i][key])
                    result["equal"][f"{i}.{key}"] = torch.equal(state[key].full_tensor(), saved)
                result["equal"][f"{i}.step"] = float(state["step"]) == 3.0
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
