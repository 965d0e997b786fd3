"""One rank of a multi-process test (torch.distributed/gloo or MPI); results go to JSON.

Usage: python tests/_dist_worker.py {torch|mpi} OUT_DIR  (rank and size from the engine).
Every scenario is bounded by timeouts; the parent test kills the process group if not.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import arrayckpt as ac
from arrayckpt import fsops

ENGINE, OUT = sys.argv[1], Path(sys.argv[2])
TP = ac.ShardingConfig(ac.TensorParallel(), {"w": 0, "w.exp_avg": 0})


def state(rank: int, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    w = np.full((2, 8), rank + step, np.float32)
    return {"w": w, "norm": np.ones(8, np.float32)}, {"w.exp_avg": w * 2}


class FailOnRank1(fsops.FileSystem):
    def write_safetensors(self, path: Path, specs: Any, metadata: Any, **kw: Any) -> None:
        if path.parent.name == "rank_1":
            raise OSError(28, "No space left on device (injected)")
        super().write_safetensors(path, specs, metadata, **kw)


def setup() -> tuple[int, int, Any, Any]:
    if ENGINE == "torch":
        import datetime

        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
        rank, size = dist.get_rank(), dist.get_world_size()

        def allreduce(flag: float = 0.0) -> float:
            t = torch.full((1024,), flag)
            dist.all_reduce(t)
            return float(t[0])

        def given_group(members: list[int] | None = None) -> Any:
            if members is None:
                return dist.new_group(backend="gloo")
            halves = [
                dist.new_group(list(range(size // 2))),  # every rank builds both
                dist.new_group(list(range(size // 2, size))),
            ]
            return halves[0] if rank in members else halves[1]

        return rank, size, "auto", (allreduce, dist.barrier, given_group)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD

    def mpi_allreduce(flag: float = 0.0) -> float:
        buf = np.full(1024, flag)
        comm.Allreduce(MPI.IN_PLACE, buf)
        return float(buf[0])

    return comm.Get_rank(), comm.Get_size(), comm, (mpi_allreduce, comm.Barrier, comm.Dup)


def main() -> None:
    # A hung rank prints every thread's stack and exits, so the parent sees why.
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_TIMEOUT", "60")), exit=True)
    rank, size, coordinator, (allreduce, barrier, given_group) = setup()
    results: dict[str, Any] = {}
    root = OUT / "ckpts"

    def scenario(name: str, fn: Any) -> None:
        started = time.perf_counter()
        try:
            results[name] = {"ok": True, **(fn() or {})}
        except Exception as exc:
            results[name] = {
                "ok": False,
                "type": type(exc).__name__,
                "error": str(exc),
                "trace": traceback.format_exc(),
            }
        results[name]["elapsed"] = time.perf_counter() - started
        barrier()

    def sync_save() -> dict[str, Any]:
        m, o = state(rank, 1)
        out = ac.save_distributed_checkpoint(
            root / "sync", rank, size, m, o, ac.TrainingState(1), TP, coordinator=coordinator
        )
        assert (Path(out) / "sharding_meta.json").exists()  # returned only after the commit
        mine = ac.load_distributed_checkpoint(out, rank).model["w"]
        np.testing.assert_array_equal(mine, m["w"])
        whole = ac.load_distributed_checkpoint(out, 0, world_size=1)
        expect = np.concatenate([state(r, 1)[0]["w"] for r in range(size)])
        np.testing.assert_array_equal(whole.model["w"], expect)
        assert whole.optimizer is not None
        return {"committed": sorted(p.name for p in Path(out).iterdir())}

    def async_save() -> dict[str, Any]:
        with ac.AsyncCheckpointer() as ckpt:
            # Training collectives on this thread while the commit's run on the writer thread.
            t0 = time.perf_counter()
            for _ in range(50):
                allreduce()
            alone = time.perf_counter() - t0
            m, o = state(rank, 2)
            future = ckpt.save_distributed(
                root / "async", rank, size, m, o, ac.TrainingState(2), TP, coordinator=coordinator
            )
            stall = ckpt.last_stall_s
            m["w"] += 100  # after the snapshot: must not reach the checkpoint
            t0 = time.perf_counter()
            during = 0
            # Every rank must run the same number of collectives: stop when all are done.
            while allreduce(float(future.done() and during >= 50)) < size:
                during += 1
                if during > 100_000:
                    raise AssertionError("save never finished")
            busy = time.perf_counter() - t0
            future.result(timeout=30)
        got = ac.load_distributed_checkpoint(root / "async", rank).model["w"]
        np.testing.assert_array_equal(got, state(rank, 2)[0]["w"])
        return {
            "stall_s": stall,
            "allreduce_alone_s": alone / 50,
            "allreduce_during_s": busy / during,
            "allreduces_during": during,
        }

    def fault() -> dict[str, Any]:
        m, o = state(rank, 3)
        fs = FailOnRank1() if rank == 1 else fsops.FileSystem()
        with fsops.use(fs):
            ac.save_distributed_checkpoint(
                root / "fault", rank, size, m, o, None, TP, coordinator=coordinator, timeout=20
            )
        return {}

    def fault_async() -> dict[str, Any]:
        m, o = state(rank, 4)
        fs = FailOnRank1() if rank == 1 else fsops.FileSystem()
        ckpt = ac.AsyncCheckpointer()
        with fsops.use(fs):
            ckpt.save_distributed(
                root / "fault_async",
                rank,
                size,
                m,
                o,
                None,
                TP,
                coordinator=coordinator,
                timeout=20,
            )
            ckpt.close()  # waits for the write and raises its error
        return {}

    def absent() -> dict[str, Any]:
        if rank == size - 1:
            return {"skipped": True}  # this rank never calls save
        m, o = state(rank, 5)
        ac.save_distributed_checkpoint(
            root / "absent", rank, size, m, o, None, TP, coordinator=coordinator, timeout=2
        )
        return {}

    def given() -> dict[str, Any]:
        m, o = state(rank, 6)
        ac.save_distributed_checkpoint(
            root / "given", rank, size, m, o, None, TP, coordinator=given_group()
        )
        got = ac.load_distributed_checkpoint(root / "given", 0, world_size=1).model["w"]
        assert got.shape == (2 * size, 8)
        return {}

    def subgroups() -> dict[str, Any]:
        # Two halves save two checkpoints at once, each through its own process group.
        half = size // 2
        group = given_group(list(range(half)))
        sub_rank, which = rank % half, rank // half
        m, o = state(rank, 7)
        ac.save_distributed_checkpoint(
            root / f"half{which}", sub_rank, half, m, o, None, TP, coordinator=group
        )
        got = ac.load_distributed_checkpoint(root / f"half{which}", 0, world_size=1).model["w"]
        np.testing.assert_array_equal(
            got[:, 0], np.repeat([r + 7 for r in range(which * half, (which + 1) * half)], 2)
        )
        return {}

    scenario("sync", sync_save)
    if ENGINE == "torch" and size == 4:
        scenario("subgroups", subgroups)
    scenario("given", given)
    scenario("async", async_save)
    scenario("fault", fault)
    scenario("fault_async", fault_async)
    scenario("absent", absent)
    results["listing"] = sorted(p.name for p in root.iterdir())
    (OUT / f"result_{rank}.json").write_text(json.dumps(results, indent=1))
    if ENGINE == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
