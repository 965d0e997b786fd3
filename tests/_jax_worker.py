"""One process of a jax.distributed test job; its results go to OUT/result_{id}.json.

Usage: python tests/_jax_worker.py {main|kill|sharded|load_sharded} PROCESS_ID PORT OUT_DIR

The job is two processes on 127.0.0.1:PORT (the coordination service binds loopback
only). From the environment, ``main`` takes TORCH_PORT (a free port for the scenario
that runs torch.distributed beside jax); ``kill`` takes KILLED (the process id that
SIGKILLs itself mid-save) and RECOVERABLE=1 (jax_enable_recoverability). Every wait has
a deadline; the parent test kills the process group if the process outlives its limit.
``sharded`` runs with 4 CPU devices per process (XLA_FLAGS from the parent);
``load_sharded`` is one process alone, with 8, reading what ``sharded`` saved in OUT_DIR.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np

import arrayckpt as ac
from arrayckpt import fsops
from arrayckpt.distributed import JaxCoordinator
from arrayckpt.distributed.coordinator import resolve

MODE, PID, PORT, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
WORLD = 2
TP = ac.ShardingConfig(ac.TensorParallel(), {"w": 0, "w.exp_avg": 0})
WAIT_MS = 60_000


def state(rank: int, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    w = np.full((2, 8), rank + 10 * step, np.float32)
    return {"w": w, "norm": np.ones(8, np.float32)}, {"w.exp_avg": w * 2}


def whole(step: int) -> np.ndarray:
    return np.concatenate([state(r, step)[0]["w"] for r in range(WORLD)])


class FailOnRank1(fsops.FileSystem):
    def write_safetensors(self, path: Path, specs: Any, metadata: Any, **kw: Any) -> None:
        if path.parent.name == "rank_1":
            raise OSError(28, "No space left on device (injected)")
        super().write_safetensors(path, specs, metadata, **kw)


class DieMidSave(fsops.FileSystem):
    """SIGKILL this process while it writes its part of a checkpoint into the temporary."""

    def write_safetensors(self, path: Path, specs: Any, metadata: Any, **kw: Any) -> None:
        if ".arrayckpt-tmp-" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        super().write_safetensors(path, specs, metadata, **kw)


def client() -> Any:
    from jax._src.distributed import global_state

    return global_state.client


def barrier(name: str) -> None:
    client().wait_at_barrier(f"test/{name}", WAIT_MS)


class Scenarios:
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def run(self, name: str, fn: Any, sync: bool = True) -> None:
        started = time.perf_counter()
        try:
            self.results[name] = {"ok": True, **(fn() or {})}
        except Exception as exc:
            self.results[name] = {
                "ok": False,
                "type": type(exc).__name__,
                "error": str(exc),
                "trace": traceback.format_exc(),
            }
        self.results[name]["elapsed"] = time.perf_counter() - started
        self.write()
        if sync:
            barrier(name)

    def write(self) -> None:
        (OUT / f"result_{PID}.json").write_text(json.dumps(self.results, indent=1))


def main_job(root: Path) -> Scenarios:
    s = Scenarios()
    rank = jax.process_index()

    def auto() -> dict[str, Any]:
        import arrayckpt.distributed.coordinator as coordinator

        assert "torch.distributed" not in sys.modules  # "auto" finds jax, not torch
        chosen = resolve("auto", rank, WORLD)
        assert isinstance(chosen, JaxCoordinator), chosen
        assert resolve("jax", rank, WORLD) is chosen  # one coordinator per client
        assert resolve(client(), rank, WORLD) is chosen
        assert coordinator._kind(client()) == "jax"
        return {}

    def sync_save() -> dict[str, Any]:
        m, o = state(rank, 1)
        out = ac.save_distributed_checkpoint(
            root / "sync", rank, WORLD, m, o, ac.TrainingState(1), TP
        )
        assert (Path(out) / "sharding_meta.json").exists()  # returned only after the commit
        np.testing.assert_array_equal(ac.load_distributed_checkpoint(out, rank).model["w"], m["w"])
        one = ac.load_distributed_checkpoint(out, 0, world_size=1)
        np.testing.assert_array_equal(one.model["w"], whole(1))
        assert one.optimizer is not None and one.training_state.step == 1
        return {"committed": sorted(p.name for p in Path(out).iterdir())}

    def given() -> dict[str, Any]:
        for name, coordinator in (("client", client()), ("named", "jax")):
            m, o = state(rank, 2)
            ac.save_distributed_checkpoint(
                root / f"given_{name}", rank, WORLD, m, o, None, TP, coordinator=coordinator
            )
            got = ac.load_distributed_checkpoint(root / f"given_{name}", 0, world_size=1)
            np.testing.assert_array_equal(got.model["w"], whole(2))
        return {}

    def async_save() -> dict[str, Any]:
        step = jax.jit(lambda x: x * 0.5 + 1.0)
        x = jax.numpy.zeros(1024)
        with ac.AsyncCheckpointer() as ckpt:
            m, o = state(rank, 3)
            future = ckpt.save_distributed(
                root / "async", rank, WORLD, m, o, ac.TrainingState(3), TP
            )
            m["w"] += 100  # after the snapshot: must not reach the checkpoint
            # The training loop keeps computing and never calls arrayckpt: the commit must
            # complete on the writer thread alone.
            steps = 0
            while not future.done():
                x = step(x).block_until_ready()
                steps += 1
            future.result(timeout=0)
        got = ac.load_distributed_checkpoint(root / "async", 0, world_size=1)
        np.testing.assert_array_equal(got.model["w"], whole(3))
        return {"train_steps_during": steps}

    def manager() -> dict[str, Any]:
        # Every process opens the run's manager; the steps are committed through jax.
        mgr = ac.CheckpointManager(root / "run")
        for step in (4, 5):
            m, o = state(rank, step)
            ac.save_distributed_checkpoint(
                mgr.directory(step), rank, WORLD, m, o, ac.TrainingState(step), TP
            )
            assert mgr.latest_step() == step  # committed for every process on return
        with ac.AsyncCheckpointer() as ckpt:
            m, o = state(rank, 6)
            ckpt.save_distributed(mgr.directory(6), rank, WORLD, m, o, ac.TrainingState(6), TP)
        latest = mgr.latest_step()
        assert latest is not None
        mine = ac.load_distributed_checkpoint(mgr.directory(latest), rank)
        np.testing.assert_array_equal(mine.model["w"], state(rank, 6)[0]["w"])
        return {"steps": mgr.steps()}

    def fault(name: str, use_async: bool) -> Any:
        def run() -> dict[str, Any]:
            m, o = state(rank, 7)
            fs = FailOnRank1() if rank == 1 else fsops.FileSystem()
            with fsops.use(fs):
                if use_async:
                    ckpt = ac.AsyncCheckpointer()
                    ckpt.save_distributed(root / name, rank, WORLD, m, o, None, TP, timeout=20)
                    ckpt.close()  # waits for the write and raises its error
                else:
                    ac.save_distributed_checkpoint(
                        root / name, rank, WORLD, m, o, None, TP, timeout=20
                    )
            return {}

        return run

    def leftover_keys() -> dict[str, Any]:
        # After six saves (two failed) through "jax": only the last decision is kept.
        return {"keys": sorted(k for k, _ in client().key_value_dir_get("arrayckpt/"))}

    def absent(missing: int) -> Any:
        def run() -> dict[str, Any]:
            # A coordinator of its own: the absent process leaves it out of step, not "jax".
            coordinator = JaxCoordinator(name=f"absent{missing}", timeout=2)
            if rank == missing:
                return {"skipped": True}  # this process never calls save
            m, o = state(rank, 8)
            ac.save_distributed_checkpoint(
                root / f"absent{missing}", rank, WORLD, m, o, None, TP, coordinator=coordinator
            )
            return {}

        return run

    def precedence() -> dict[str, Any]:
        # Both engines running: "auto" keeps to torch.distributed, as documented.
        import datetime

        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{os.environ['TORCH_PORT']}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=30),
        )
        try:
            chosen = resolve("auto", rank, WORLD)
            assert type(chosen).__name__ == "TorchCoordinator", chosen
            assert isinstance(resolve("jax", rank, WORLD), JaxCoordinator)
        finally:
            dist.destroy_process_group()
        return {}

    s.run("auto", auto)
    s.run("sync", sync_save)
    s.run("given", given)
    s.run("async", async_save)
    s.run("manager", manager)
    s.run("fault", fault("fault", False))
    s.run("fault_async", fault("fault_async", True))
    s.run("leftover_keys", leftover_keys)
    s.run("absent1", absent(1))
    s.run("absent0", absent(0))
    s.run("precedence", precedence)
    s.results["listing"] = sorted(p.name for p in root.iterdir())
    s.write()
    return s


def kill_job(root: Path) -> Scenarios:
    s = Scenarios()
    rank = jax.process_index()
    killed = int(os.environ["KILLED"])
    mgr = ac.CheckpointManager(root)

    def first() -> dict[str, Any]:
        m, o = state(rank, 1)
        ac.save_distributed_checkpoint(mgr.directory(1), rank, WORLD, m, o, ac.TrainingState(1), TP)
        return {}

    def second() -> dict[str, Any]:
        m, o = state(rank, 2)
        fs = DieMidSave() if rank == killed else fsops.FileSystem()
        with fsops.use(fs):
            ac.save_distributed_checkpoint(
                mgr.directory(2), rank, WORLD, m, o, ac.TrainingState(2), TP, timeout=3
            )
        return {}

    s.run("first", first)
    s.run("second", second, sync=False)  # the other process is dead: no barrier
    s.results["steps"] = mgr.steps()
    restored = ac.load_distributed_checkpoint(mgr.directory(1), 0, world_size=1)
    np.testing.assert_array_equal(restored.model["w"], whole(1))
    s.results["restored_step"] = restored.training_state.step
    s.write()
    return s


def global_values() -> dict[str, np.ndarray]:
    """The global arrays the sharded scenario saves (known to every process and the test)."""
    return {
        "w": np.arange(8 * 12, dtype=np.float32).reshape(8, 12) / 7,
        "e": np.arange(4 * 8 * 2, dtype=np.int32).reshape(4, 8, 2) * 3,
        "cols": np.arange(8 * 6, dtype=np.float32).reshape(8, 6) - 5,
        "rep": np.arange(4, dtype=np.float32),
        "flat": np.arange(16, dtype=np.float32) / 3,
    }


def mesh_sharding(spec: tuple[Any, ...]) -> Any:
    from jax.sharding import NamedSharding, PartitionSpec

    # (4, 2) over the 8 global devices: process 0 holds mesh rows 0-1, process 1 rows 2-3.
    return NamedSharding(jax.make_mesh((4, 2), ("data", "model")), PartitionSpec(*spec))


#: How the sharded scenario lays each array out over the global mesh.
SAVED_AS: dict[str, tuple[Any, ...]] = {
    "w": ("data", "model"),
    "e": (None, "data"),  # split across the processes along dimension 1
    "cols": (None, "model"),  # replicated over "data": process 0 writes all of it
    "rep": (),  # on every device: written once
    "flat": (("data", "model"),),
}


def sharded_job(root: Path) -> Scenarios:
    s = Scenarios()
    rank = jax.process_index()
    values = global_values()

    def build(name: str) -> Any:
        v = values[name]
        return jax.make_array_from_callback(v.shape, mesh_sharding(SAVED_AS[name]), lambda i: v[i])

    def save() -> dict[str, Any]:
        assert jax.device_count() == 8 and jax.local_device_count() == 4
        model = {k: build(k) for k in ("w", "e", "cols", "rep")}
        optim = {"flat": build("flat")}
        assert not model["w"].is_fully_addressable  # each process holds only its shards
        ac.save_distributed_checkpoint(
            root / "sharded", rank, WORLD, model, optim, ac.TrainingState(7)
        )
        with ac.AsyncCheckpointer() as ckpt:
            ckpt.save_distributed(root / "sharded_async", rank, WORLD, model, optim)
        meta = json.loads((root / "sharded" / "sharding_meta.json").read_text())
        mine = meta["arrayckpt"]["ranks"][rank]
        return {"manifest": {part: mine.get(part, {}) for part in ("model", "optimizer")}}

    def load_here() -> dict[str, Any]:
        # Back onto both processes' devices in other layouts: each device its own slice.
        other = {"w": ("model", "data"), "e": ("data",), "cols": ("data", "model"), "rep": ()}
        template = {
            k: jax.ShapeDtypeStruct(values[k].shape, values[k].dtype, sharding=mesh_sharding(spec))
            for k, spec in other.items()
        }
        got = ac.load_distributed_checkpoint(root / "sharded", rank, into=template).model
        for k in other:
            assert got[k].sharding == template[k].sharding, k
            for shard in got[k].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), values[k][shard.index])
        return {}

    s.run("save", save)
    s.run("load_here", load_here)
    return s


def load_on_one_process(root: Path) -> dict[str, Any]:
    """The two processes' checkpoints, restored by one process driving 8 devices."""
    values = global_values()
    assert jax.process_count() == 1 and jax.device_count() == 8
    specs = {"w": ("model", None), "e": (None, None, "model"), "cols": ("data",), "rep": ("data",)}
    model = {
        k: jax.ShapeDtypeStruct(values[k].shape, values[k].dtype, sharding=mesh_sharding(spec))
        for k, spec in specs.items()
    }
    optim = {"flat": jax.ShapeDtypeStruct((16,), np.float32, sharding=mesh_sharding(()))}
    report: dict[str, Any] = {}
    for name in ("sharded", "sharded_async"):
        got = ac.load_checkpoint(root / name, xp="jax.numpy", into=model, optimizer_into=optim)
        exact = {}
        for k, x in {**got.model, **got.optimizer}.items():
            want = values[k]
            exact[k] = (
                x.sharding == {**model, **optim}[k].sharding
                and np.array_equal(np.asarray(x), want)
                and all(
                    np.array_equal(np.asarray(sh.data), want[sh.index])
                    for sh in x.addressable_shards
                )
            )
        report[name] = exact
    whole = ac.load_distributed_checkpoint(root / "sharded", 0, world_size=1)
    report["numpy"] = {k: bool(np.array_equal(v, values[k])) for k, v in whole.model.items()}
    report["step"] = whole.training_state.step
    return report


def main() -> None:
    # A hung process prints every thread's stack and exits, so the parent sees why.
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_TIMEOUT", "60")), exit=True)
    if MODE == "load_sharded":  # one process on its own: no jax.distributed job
        (OUT / "result_0.json").write_text(json.dumps(load_on_one_process(OUT / "ckpts")))
        return
    if os.environ.get("RECOVERABLE") == "1":
        jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(
        f"127.0.0.1:{PORT}",
        num_processes=WORLD,
        process_id=PID,
        coordinator_bind_address=f"127.0.0.1:{PORT}",  # loopback only
        initialization_timeout=60,
    )
    root = OUT / "ckpts"
    root.mkdir(exist_ok=True)
    if MODE == "main":
        main_job(root)
    elif MODE == "kill":
        kill_job(root)
        sys.stdout.flush()
        os._exit(0)  # the peer is dead: skip jax's shutdown barrier
    elif MODE == "sharded":
        sharded_job(root)
    else:
        raise SystemExit(f"unknown mode {MODE}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
