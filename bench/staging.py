"""The first save of a process, JAX state and background staging, each in a fresh process.

    python bench/staging.py            # 1 GiB of float32 in 64 tensors, 5 processes per case
    python bench/staging.py --quick    # 256 MiB, 3 processes per case

A fresh process is the point: its staging memory has never been touched, which is what a
job restarted after preemption saves into. Prints medians and the ratios the targets are
stated in (first save vs a warm one; JAX stall vs a memcpy of the same bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _numpy_state(nbytes: int) -> dict[str, Any]:
    import numpy as np

    n = nbytes // 64 // 4
    return {f"w{i}": np.random.default_rng(i).random(n, np.float32) for i in range(64)}


def child(case: str, nbytes: int, root: Path) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import arrayckpt as ac

    out: dict[str, float] = {}
    if case == "jax":
        import jax.numpy as jnp

        state = {k: jnp.asarray(v) for k, v in _numpy_state(nbytes).items()}
        host = [np.asarray(v) for v in state.values()]
        dst = [np.empty_like(h) for h in host]
        for d, h in zip(dst, host, strict=True):  # warm the destination first
            np.copyto(d, h)
        t = time.perf_counter()
        for d, h in zip(dst, host, strict=True):
            np.copyto(d, h)
        out["memcpy"] = time.perf_counter() - t
    else:
        state = _numpy_state(nbytes)
    with ac.AsyncCheckpointer() as ckpt:
        if case == "prepared":
            t = time.perf_counter()
            ckpt.prepare(state).result()
            out["prepare"] = time.perf_counter() - t
        stalls, totals = [], []
        for i in range(4):
            t = time.perf_counter()
            future = ckpt.save(root / f"step_{i}", state, background_staging=case == "background")
            stalls.append(time.perf_counter() - t)
            future.staged.result()
            out.setdefault("staged", time.perf_counter() - t)
            future.result()
            totals.append(time.perf_counter() - t)
    out["first_stall"], out["first_total"] = stalls[0], totals[0]
    out["warm_stall"] = statistics.median(stalls[1:])
    out["warm_total"] = statistics.median(totals[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "NBYTES", "DIR"))
    args = parser.parse_args()
    if args.child:
        case, nbytes, root = args.child
        print(json.dumps(child(case, int(nbytes), Path(root))))
        return
    nbytes = (256 << 20) if args.quick else (1 << 30)
    repeats = 3 if args.quick else 5
    cases = ["cold", "prepared", "background"]
    try:
        import jax  # noqa: F401

        cases.append("jax")
    except ImportError:
        print("jax is not installed: the JAX case is skipped")
    results: dict[str, dict[str, float]] = {}
    for case in cases:
        runs: list[dict[str, float]] = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(dir=ROOT) as d:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", case, str(nbytes), d],
                    check=True,
                    capture_output=True,
                    text=True,
                )
            runs.append(json.loads(done.stdout.splitlines()[-1]))
        results[case] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"\nstaging: {nbytes >> 20} MiB in 64 float32 tensors, medians of {repeats} fresh processes"
    )
    print(
        f"{'case':<12}"
        + "".join(
            f"{k:>13}" for k in ("first stall", "first total", "warm stall", "warm total", "staged")
        )
    )
    for case, r in results.items():
        print(
            f"{case:<12}"
            + "".join(
                f"{r[k]:>12.3f}s"
                for k in ("first_stall", "first_total", "warm_stall", "warm_total", "staged")
            )
        )
    checks = [
        (
            "prepared first stall / warm stall <= 2",
            results["prepared"]["first_stall"] / results["prepared"]["warm_stall"],
            2.0,
        ),
        (
            "prepared first total / warm total <= 1.2",
            results["prepared"]["first_total"] / results["prepared"]["warm_total"],
            1.2,
        ),
        (
            "cold first stall / warm stall (no prepare, for reference)",
            results["cold"]["first_stall"] / results["cold"]["warm_stall"],
            None,
        ),
        (
            "background stall / default stall <= 0.1",
            results["background"]["warm_stall"] / results["cold"]["warm_stall"],
            0.1,
        ),
    ]
    if "jax" in results:
        checks.append(
            (
                "JAX stall / memcpy of the same bytes <= 0.1",
                results["jax"]["warm_stall"] / results["jax"]["memcpy"],
                0.1,
            )
        )
    print()
    for name, ratio, limit in checks:
        verdict = "" if limit is None else ("pass" if ratio <= limit else "FAIL")
        print(f"  {name:<58} {ratio:6.2f}x  {verdict}")
    print(f"  prepare() took {results['prepared']['prepare']:.3f} s in the background")


if __name__ == "__main__":
    main()
