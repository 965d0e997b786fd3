"""One gloo rank of the distributed object-store tests; writes result_{rank}.json.

Usage: python tests/_s3dist_worker.py SCENARIO URL OUT_DIR  (S3 settings from AWS_* only)

- ``train`` (2 ranks): FSDP2 + AdamW as in tests/_fsdp2_worker.py; 3 steps, then the state
  is saved to ``URL`` (synchronously) and ``URL-async`` (`AsyncCheckpointer`, training
  collectives running meanwhile), then 3 more steps; every loss is recorded.
- ``resume`` (any world size): the same model loaded from ``URL`` in place, 3 steps.
- ``sharded`` (2 ranks): ShardingConfig state (tensor parallel and ZeroPartitioned).
- ``fail`` (2 ranks): rank 1 cannot reach the store; every rank must fail.
- ``kill0`` / ``kill1`` (2 ranks): a first step, then a second whose large upload on the
  named rank the test interrupts with SIGKILL; the survivor records its error.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from _fsdp2_worker import build, init_state, step

import arrayckpt as ac
from arrayckpt.storage import objects

SCENARIO, URL, OUT = sys.argv[1], sys.argv[2], Path(sys.argv[3])
TP = ac.ShardingConfig(ac.TensorParallel(), {"w": 0, "v": 1})
#: Global tensors of the ``sharded`` scenario, and each rank's rows of ``w`` (uneven).
W = np.arange(40, dtype=np.float32).reshape(10, 4)
V = np.arange(18, dtype=np.int64).reshape(3, 6)
ROWS = [(0, 6), (6, 10)]


class Fetched(logging.Handler):
    """The bytes of tensor data a load fetched from the store, as arrayckpt logs them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.data_bytes = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("read %s: %d bytes of tensor data"):
            self.data_bytes += int(record.args[1])  # type: ignore[index]


def network_threads() -> set[str]:
    """Record the name of every thread that opens a store (every request goes through one)."""
    names: set[str] = set()
    real = objects.open_store

    def recording(*args: Any, **kwargs: Any) -> Any:
        names.add(threading.current_thread().name)
        return real(*args, **kwargs)

    objects.open_store = recording  # type: ignore[assignment]
    return names


def allreduce(flag: float = 0.0) -> float:
    t = torch.full((256,), flag)
    dist.all_reduce(t)
    return float(t[0])


def train(rank: int, world: int) -> dict[str, Any]:
    model, opt = build()
    before = [step(model, opt, rank) for _ in range(3)]
    got = ac.save_distributed_checkpoint(
        URL, rank, world, model.state_dict(), opt.state_dict(), ac.TrainingState(3)
    )
    threads = network_threads()
    with ac.AsyncCheckpointer() as ckpt:
        future = ckpt.save_distributed(
            URL + "-async", rank, world, model.state_dict(), opt.state_dict(), ac.TrainingState(3)
        )
        during = 0
        # Every rank runs the same number of collectives: stop once all saves are done.
        while allreduce(float(future.done() and during >= 20)) < world:
            during += 1
        async_got = future.result(timeout=60)
    return {
        "saved": [str(got), str(async_got)],
        "allreduces_during": during,
        "network_threads": sorted(threads),
        "losses": before + [step(model, opt, rank) for _ in range(3)],
    }


def resume(rank: int, world: int) -> dict[str, Any]:
    model, opt = build()
    init_state(model, opt)
    fetched = Fetched()
    logging.getLogger("arrayckpt").addHandler(fetched)
    logging.getLogger("arrayckpt").setLevel(logging.DEBUG)
    stats = ac.ReadStats()
    got = ac.load_distributed_checkpoint(
        URL,
        rank,
        world_size=world,
        into=model.state_dict(),
        optimizer_into=opt.state_dict(),
        stats=stats,
    )
    return {
        "step": got.training_state.step,
        "opt_steps": sorted({float(s["step"]) for s in opt.state.values()}),
        "bytes_read": stats.bytes_read,
        "bytes_fetched": fetched.data_bytes,
        "losses": [step(model, opt, rank) for _ in range(3)],
    }


def sharded(rank: int, world: int) -> dict[str, Any]:
    lo, hi = ROWS[rank]
    model = {"w": W[lo:hi], "v": V[:, 3 * rank : 3 * rank + 3], "b": np.ones(3, np.float16)}
    ac.save_distributed_checkpoint(
        URL + "/tp", rank, world, model, {"w": W[lo:hi] * 2}, ac.TrainingState(7), TP
    )
    zero = ac.ShardingConfig(ac.ZeroPartitioned(3))
    ac.save_distributed_checkpoint(
        URL + "/zero", rank, world, {f"p{rank}": np.full(4, rank)}, None, ac.TrainingState(8), zero
    )
    return {"w": W.tolist(), "v": V.tolist()}


def failure(exc: BaseException, started: float) -> dict[str, Any]:
    return {"type": type(exc).__name__, "error": str(exc), "elapsed": time.monotonic() - started}


def fail(rank: int, world: int) -> dict[str, Any]:
    ac.save_distributed_checkpoint(URL + "/step_1", rank, world, {"x": np.full(3, rank)})
    dead = {"endpoint": "http://127.0.0.1:9", "retry_config": {"max_retries": 0}}
    started = time.monotonic()
    try:
        ac.save_distributed_checkpoint(
            URL + "/step_2",
            rank,
            world,
            {"x": np.full(3, rank + 10)},
            storage_options=dead if rank == 1 else None,
        )
    except ac.CheckpointError as exc:
        return failure(exc, started)
    return {"type": None}


def kill(rank: int, world: int, victim: int) -> dict[str, Any]:
    zero = ac.ShardingConfig(ac.ZeroPartitioned(3))
    first = {f"p{rank}": np.full(4, rank)}
    ac.save_distributed_checkpoint(
        URL + "/step_1", rank, world, first, None, ac.TrainingState(1), zero
    )
    # The victim's upload is long enough to be interrupted: 64 MiB, then 256 MiB.
    big = rank == victim
    model = {f"p{rank}": np.ones((16 << 20) if big else 4, np.float32)}
    optimizer = {f"m{rank}": np.full((64 << 20) if big else 4, 2.0, np.float32)}
    started = time.monotonic()
    try:
        ac.save_distributed_checkpoint(
            URL + "/step_2", rank, world, model, optimizer, ac.TrainingState(2), zero
        )
    except ac.CheckpointError as exc:
        return failure(exc, started)
    return {"type": None}


def main() -> None:
    faulthandler.dump_traceback_later(100, exit=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank}
    try:
        if SCENARIO.startswith("kill"):
            result.update(kill(rank, world, int(SCENARIO[4:])))
        else:
            result.update(
                {"train": train, "resume": resume, "sharded": sharded, "fail": fail}[SCENARIO](
                    rank, world
                )
            )
        result["ok"] = True
    except Exception:
        result["ok"] = False
        result["error"] = traceback.format_exc()
    (OUT / f"result_{rank}.json").write_text(json.dumps(result))
    if not SCENARIO.startswith("kill"):  # there a peer is gone: no collective teardown
        dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort (see examples)


if __name__ == "__main__":
    main()
