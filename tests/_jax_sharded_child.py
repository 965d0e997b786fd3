"""One process driving 8 CPU JAX devices (the flag must be set before jax is imported, so
the tests run this as a child); prints a JSON report of what it observed.

Usage: python tests/_jax_sharded_child.py {formats|from_torch} DIR [OUT_DIR]

``formats``: sharded arrays (2-D mesh, replicated axes, bf16, int, 0-d) saved by
``save_checkpoint`` and ``save_distributed_checkpoint`` into DIR, restored into other
shardings, and the errors of mismatched templates. ``from_torch``: the FSDP2 checkpoint in
DIR restored as sharded arrays on the mesh, then saved from them into OUT_DIR.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import arrayckpt as ac

MESH = jax.make_mesh((4, 2), ("data", "model"))


def ns(*spec: Any) -> NamedSharding:
    return NamedSharding(MESH, P(*spec))


def sds(shape: tuple[int, ...], dtype: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def leaves(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check(got: Any, template: Any, want: Any) -> dict[str, bool]:
    """Per leaf: the template's sharding, the wanted values, each device only its slice."""
    out = {}
    want_leaves = leaves(want)
    for path, t in leaves(template).items():
        x, w = leaves(got)[path], np.asarray(want_leaves[path])
        sharding = t.sharding if t.sharding is not None else None
        out[path] = (
            isinstance(x, jax.Array)
            and (sharding is None or x.sharding == sharding)
            and x.dtype == t.dtype
            and np.array_equal(np.asarray(x), w)
            and all(np.array_equal(np.asarray(s.data), w[s.index]) for s in x.addressable_shards)
        )
    return out


def error(fn: Any) -> str:
    try:
        fn()
    except ac.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def formats(root: Path) -> dict[str, Any]:
    w = np.arange(8 * 12, dtype=np.float32).reshape(8, 12) / 7
    e = np.arange(4 * 8 * 2, dtype=np.int32).reshape(4, 8, 2) * 3
    h = np.arange(16, dtype=np.float32) / 3
    values = {
        "params": {"w": w, "e": e, "h": np.asarray(jnp.asarray(h, jnp.bfloat16))},
        "rep": np.arange(4, dtype=np.float32),
        "step": np.asarray(5, np.int32),
    }
    saved_as = {
        "params": {"w": ns("data", "model"), "e": ns(None, "data"), "h": ns(("data", "model"))},
        "rep": ns(),  # every device holds it: written once
        "step": None,  # one device: not sharded, saved as it is
    }
    state = jax.tree.map(
        lambda v, s: jax.device_put(v, s) if s is not None else jnp.asarray(v),
        values,
        saved_as,
        is_leaf=lambda x: x is None,
    )
    report: dict[str, Any] = {}
    ac.save_checkpoint(root / "plain", state)
    ac.save_distributed_checkpoint(root / "dist", 0, 1, state, None, ac.TrainingState(5))
    with ac.AsyncCheckpointer() as ckpt:  # staging buffers, and the writer thread
        ckpt.save(root / "async_plain", state).result(timeout=60)
        ckpt.save_distributed(root / "async_dist", 0, 1, state).result(timeout=60)
    meta = json.loads((root / "dist" / "sharding_meta.json").read_text())
    report["manifest"] = meta["arrayckpt"]["ranks"][0]["model"]
    report["plain_whole"] = {
        k: bool(np.array_equal(v, leaves(values)[k]))
        for k, v in leaves(ac.load_checkpoint(root / "plain").model).items()
    }
    template = {
        "params": {
            "w": sds((8, 12), jnp.float32, ns("model", "data")),
            "e": sds((4, 8, 2), jnp.int32, ns("data", None, "model")),
            "h": sds((16,), jnp.bfloat16, ns("model")),  # replicated over "data"
        },
        "rep": sds((4,), jnp.float32, ns("data")),
        "step": sds((), jnp.int32),
    }
    for src in ("plain", "dist", "async_plain", "async_dist"):
        got = ac.load_checkpoint(root / src, xp="jax.numpy", into=template)
        report[f"{src}_restored"] = check(got.model, template, values)
    for verify in (True, False):
        stats = ac.ReadStats()
        got = ac.load_distributed_checkpoint(
            root / "dist", 0, into=template, stats=stats, verify=verify
        )
        report[f"dist_restored_verify_{verify}"] = check(got.model, template, values)
        report[f"stats_verify_{verify}"] = [stats.bytes_read, stats.ranges]
    report["nbytes"] = sum(np.asarray(v).nbytes for v in leaves(values).values())
    for src in ("plain", "dist"):
        for name, shape, dtype in [
            ("larger", (16, 12), jnp.float32),
            ("changed", (8, 11), jnp.float32),
            ("dtype", (8, 12), jnp.float16),
        ]:
            bad = {**template, "params": {**template["params"], "w": sds(shape, dtype)}}
            report[f"{src}_error_{name}"] = error(
                lambda src=src, bad=bad: ac.load_checkpoint(root / src, into=bad)
            )
    damaged = root / "damaged"
    shutil.copytree(root / "dist", damaged)
    data = bytearray((damaged / "rank_0" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte
    (damaged / "rank_0" / "model.safetensors").write_bytes(bytes(data))
    report["damaged"] = error(lambda: ac.load_checkpoint(damaged, into=template))
    return report


def torch_templates() -> tuple[dict[str, Any], dict[str, Any]]:
    """The FSDP2 model (Linear(8, 16), Tanh, Linear(16, 8)) and its AdamW state, as
    sharded JAX arrays on the 8-device mesh."""
    model = {
        "0.weight": sds((16, 8), jnp.float32, ns("data", "model")),
        "0.bias": sds((16,), jnp.float32, ns(("data", "model"))),
        "2.weight": sds((8, 16), jnp.float32, ns("model", "data")),
        "2.bias": sds((8,), jnp.float32, ns()),
    }
    state = {
        i: {"step": sds((), jnp.float32, ns()), "exp_avg": t, "exp_avg_sq": t}
        for i, t in enumerate(model.values())
    }
    # torch's param_groups (lr, betas, ...) come back as saved: `...` takes what is there
    return model, {"state": state, "param_groups": ...}


def from_torch(root: Path, out: Path) -> dict[str, Any]:
    model_t, opt_t = torch_templates()
    whole = ac.load_distributed_checkpoint(root, 0, world_size=1)
    stats = ac.ReadStats()
    via_dist = ac.load_distributed_checkpoint(
        root, 0, into=model_t, optimizer_into=opt_t, stats=stats
    )
    got = ac.load_checkpoint(root, xp="jax.numpy", into=model_t, optimizer_into=opt_t)
    report: dict[str, Any] = {
        "step": got.training_state.step,
        "model": check(got.model, model_t, whole.model),
        "optimizer": check(got.optimizer["state"], opt_t["state"], whole.optimizer["state"]),
        "via_dist": check(via_dist.model, model_t, whole.model),
        "param_groups": got.optimizer["param_groups"] == whole.optimizer["param_groups"],
        "bytes_read": stats.bytes_read,
        "nbytes": sum(v.nbytes for v in leaves(whole.model).values())
        + sum(v.nbytes for v in leaves(whole.optimizer["state"]).values()),
    }
    ac.save_distributed_checkpoint(
        out, 0, 1, got.model, got.optimizer, ac.TrainingState(got.training_state.step)
    )
    back = ac.load_checkpoint(out, xp="jax.numpy", into=model_t, optimizer_into=opt_t)
    report["round_trip"] = check(back.model, model_t, whole.model)
    # without an optimizer template it comes whole, in its structure; optimizer=False: none
    plain_opt = ac.load_checkpoint(root, into=model_t).optimizer
    report["whole_optimizer"] = bool(
        np.array_equal(plain_opt["state"][1]["exp_avg"], whole.optimizer["state"][1]["exp_avg"])
    )
    report["no_optimizer"] = ac.load_checkpoint(root, into=model_t, optimizer=False).optimizer
    return report


if __name__ == "__main__":
    scenario, where = sys.argv[1], Path(sys.argv[2])
    found = formats(where) if scenario == "formats" else from_torch(where, Path(sys.argv[3]))
    print(json.dumps(found))
