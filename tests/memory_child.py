"""Child process for the memory-bound tests: ``python memory_child.py COMMAND DIR ARGS``.

``make KIND DIR COUNT MIB`` writes a checkpoint of ``COUNT`` float32 tensors of ``MIB``
MiB each (tensor ``i`` filled with ``i``); ``load CASE DIR`` loads it and prints one JSON
line: ``extra`` (the peak RSS the load added, from a VmHWM reset just before it) and
``kept`` (the bytes of the arrays it returned that it allocated). ``save HOW URL COUNT
MIB BUDGET`` saves such a state asynchronously to ``URL`` (an object store, configured
by the environment) through ``checkpointer`` or ``manager`` with ``max_staging_bytes``
of ``BUDGET`` MiB (``none``: unbounded) and prints ``extra`` (the peak RSS of the save,
from `save` to its commit), ``left`` (RSS beyond the start once closed) and ``staged``
(the staging pool's bytes before and after close). Each case runs in a fresh process so
that one case's freed memory cannot hide another's peak.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from memory import peak_rss, reset_peak, rss

import arrayckpt as ac


def _state(count: int, mib: int) -> dict[str, np.ndarray]:
    return {f"t{i:02d}": np.full((mib << 20) // 4, i, np.float32) for i in range(count)}


def make(kind: str, directory: str, count: str, mib: str) -> None:
    root = Path(directory)
    state = _state(int(count), int(mib))
    if kind == "checkpoint":
        ac.save_checkpoint(root, state)
    elif kind == "hf":  # one model.safetensors, as another tool writes it
        from safetensors.numpy import save_file

        (root / "hf").mkdir(parents=True)
        save_file(state, str(root / "hf" / "model.safetensors"))
    elif kind == "hf_shards":  # model-0000i-of-0000N.safetensors and their index
        ac.save_checkpoint(root / "src", state)
        ac.export_hf(root / "src", root / "hf", max_shard_size=4 * (int(mib) << 20))
    elif kind in ("zero", "tp"):  # two ranks, caller-coordinated
        names = sorted(state)
        if kind == "zero":
            sharding = ac.ShardingConfig(ac.ZeroPartitioned(1))
            parts = [{n: state[n] for n in names[r::2]} for r in range(2)]
        else:
            sharding = ac.ShardingConfig(ac.TensorParallel(), dict.fromkeys(names, 0))
            parts = [{n: np.array_split(state[n], 2)[r] for n in names} for r in range(2)]
        for r, part in enumerate(parts):
            ac.save_distributed_checkpoint(root, r, 2, part, sharding=sharding, coordinator=None)
    else:
        raise SystemExit(f"unknown kind {kind!r}")


def _targets(root: Path) -> dict[str, np.ndarray]:
    """Arrays of the checkpoint's tensors' shapes, their pages touched, for ``into=``."""
    lazy = ac.open_checkpoint(root)
    return {n: np.full(lazy.model.info(n).shape, -1, np.float32) for n in lazy.model}


def _lazy(root: Path, names: list[str]) -> dict[str, Any]:
    model = ac.open_checkpoint(root, mmap=False).model
    return {n: model[n] for n in names}


def _loads(root: Path) -> dict[str, Callable[[], Any]]:
    first = ["t00", "t01"]
    hf = root / "hf"
    return {
        "eager": lambda: ac.load_checkpoint(root, mmap=False).model,
        "mmap": lambda: ac.load_checkpoint(root).model,
        "eager_keys": lambda: ac.load_checkpoint(root, mmap=False, keys=first).model,
        "mmap_keys": lambda: ac.load_checkpoint(root, keys=first).model,
        "eager_jax": lambda: ac.load_checkpoint(root, mmap=False, xp="jax.numpy").model,
        "mmap_jax": lambda: ac.load_checkpoint(root, xp="jax.numpy").model,
        "eager_torch": lambda: ac.load_checkpoint(root, mmap=False, xp="torch").model,
        "eager_file": lambda: ac.load_file(root / "model.safetensors"),
        "lazy_eager": lambda: _lazy(root, first),
        "hf_eager": lambda: ac.load_checkpoint(hf, mmap=False).model,
        "hf_mmap": lambda: ac.load_checkpoint(hf).model,
        "dist_eager": lambda: (
            ac.load_distributed_checkpoint(root, 0, world_size=1, mmap=False).model
        ),
        "dist_mmap": lambda: ac.load_distributed_checkpoint(root, 0, world_size=1).model,
    }


def _warm_up(case: str) -> None:
    """Import the framework and start its runtime first: their memory is not the load's."""
    if case.endswith("_jax"):
        import jax.numpy as jnp

        jnp.asarray(np.ones(1)).block_until_ready()
    elif case.endswith("_torch"):
        import torch

        torch.from_numpy(np.ones(1)).clone()


def load(case: str, directory: str) -> None:
    root = Path(directory)
    into = case.endswith("_into")
    targets = _targets(root) if into else None
    mmap = not case.startswith("eager")
    run = (
        (lambda: ac.load_checkpoint(root, mmap=mmap, into=targets).model)
        if into
        else _loads(root)[case]
    )
    _warm_up(case)
    gc.collect()
    before = rss()
    reset_peak()
    got = run()
    extra = peak_rss() - before
    kept = 0 if into else sum(int(a.nbytes) for a in got.values())
    for name, a in got.items():  # the values arrived, not just the memory
        assert float(a.reshape(-1)[-1]) == int(name[1:]), name
    print(json.dumps({"extra": extra, "kept": kept}), flush=True)


def save(how: str, url: str, count: str, mib: str, budget_mib: str) -> None:
    state = _state(int(count), int(mib))
    budget = None if budget_mib == "none" else int(budget_mib) << 20
    # The client's runtime, connection pool and the writer thread start with a first tiny
    # save: their memory is the process's, not this save's.
    ac.save_checkpoint(f"{url}/warm", {"w": np.zeros(4, np.float32)})
    saver: Any
    if how == "manager":
        saver = ac.CheckpointManager(f"{url}/run", keep_last=1, max_staging_bytes=budget)
        saver.save(1, {"w": np.zeros(4, np.float32)}).result()
        run: Callable[[], Any] = lambda: saver.save(2, state).result()  # noqa: E731
        staging = saver._checkpointer.staging
    else:
        saver = ac.AsyncCheckpointer(max_staging_bytes=budget)
        run = lambda: saver.save(f"{url}/step_2", state).result()  # noqa: E731
        staging = saver.staging
    gc.collect()
    before = rss()
    reset_peak()
    where = run()
    extra = peak_rss() - before
    staged = staging.nbytes
    saver.close()
    gc.collect()
    left = rss() - before
    got = ac.load_checkpoint(where).model  # checksums verified
    for name, a in got.items():
        assert float(a.reshape(-1)[-1]) == int(name[1:]), name
    del got
    print(json.dumps({"extra": extra, "left": left, "staged": [staged, staging.nbytes]}))


if __name__ == "__main__":
    {"make": make, "load": load, "save": save}[sys.argv[1]](*sys.argv[2:])
