"""Save time and extra host memory against the size of the state, 256 MiB to 16 GiB.

    python bench/scaling.py                    # 256M,1G,4G,8G,16G: every case that fits
    python bench/scaling.py --quick            # 256 MiB, 2 runs, a 64 MiB budget: a smoke test
    python bench/scaling.py --sizes 4G,8G --runs 5

For each size (float32 state in 64 MiB tensors) four cases, each in a fresh process so its
extra peak RSS is its own (``ru_maxrss`` at the end minus ``ru_maxrss`` once the state is
built): a raw write + fsync of the same bytes (the limit), arrayckpt's `AsyncCheckpointer`
save + wait (stall and total), ``safetensors.numpy.save_file`` + fsync, and the same
arrayckpt save with ``AsyncCheckpointer(max_staging_bytes=2 GiB)`` (``--budget``). Each
case times
``--runs`` saves after one untimed warm-up (the first save of a process is
bench/run.py's and bench/staging.py's subject) and reports medians.

A case whose memory (the state plus what it stages) does not fit in MemAvailable with a
margin, or whose file does not fit on the disk, is skipped, saying so; every file is
removed as soon as its case ends. Linear scaling shows as total / raw write and extra RSS
/ state staying flat from size to size. Exits 0: targets are reported, not asserted
(timings on shared machines vary).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from measure import fsync_path, mem_available, parse_size, raw_direct_write  # noqa: E402

import arrayckpt as ac  # noqa: E402

GiB = 1 << 30
SIZES = "256M,1G,4G,8G,16G"
BUDGET = "2G"
#: Room left for the rest of the machine (and this run's parent) beside a case's needs.
MARGIN = 2 * GiB
CASES = {
    "raw": "raw write + fsync",
    "raw_direct": "raw direct write + fsync",
    "arrayckpt": "arrayckpt async",
    "safetensors": "safetensors.numpy save_file",
    "budget": "arrayckpt, max_staging_bytes",
}


def show_size(nbytes: int) -> str:
    return f"{nbytes / GiB:g} GiB" if nbytes >= GiB else f"{nbytes >> 20} MiB"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def has_budget() -> bool:
    return "max_staging_bytes" in inspect.signature(ac.AsyncCheckpointer).parameters


def needs(case: str, nbytes: int, tensor_bytes: int, budget: int) -> int:
    """Host memory a case holds at its peak: the state, plus arrayckpt's staging (a copy
    of the state, or the budget plus one tensor). The raw write and safetensors (in
    0.8, the version this project needs, it writes from the arrays' own memory) add
    nothing."""
    if case == "arrayckpt":
        return 2 * nbytes
    if case == "budget":
        return nbytes + min(budget, nbytes) + tensor_bytes
    return nbytes


# --- one case in a fresh process ---------------------------------------------------------


def child(
    case: str, nbytes: int, tensor_bytes: int, budget: int, runs: int, root: Path
) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    count = max(1, nbytes // tensor_bytes)
    state = {f"t{i}": rng.random(tensor_bytes // 4, dtype=np.float32) for i in range(count)}
    gc.collect()
    base = peak_rss()
    ckpt = None
    if case in ("arrayckpt", "budget"):
        ckpt = ac.AsyncCheckpointer(**({"max_staging_bytes": budget} if case == "budget" else {}))
    times: dict[str, list[float]] = {}
    for r in range(runs + 1):  # run 0 warms up
        target = root / f"run{r}"
        t = time.perf_counter()
        got: dict[str, float] = {}
        if ckpt is not None:
            future = ckpt.save(target, state)
            got["stall"] = time.perf_counter() - t
            future.result()
        elif case == "raw":
            with open(target, "wb", buffering=0) as f:
                for a in state.values():
                    f.write(a.data)
                os.fsync(f.fileno())
        elif case == "raw_direct":
            raw_direct_write(target, nbytes)
        else:
            save_file(state, str(target))
            fsync_path(target)
        got["total"] = time.perf_counter() - t
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        if r:
            for key, seconds in got.items():
                times.setdefault(key, []).append(seconds)
    if ckpt is not None:
        ckpt.close()
    return {
        "medians": {k: statistics.median(v) for k, v in times.items()},
        "extra_rss": peak_rss() - base,
        "tensors": count,
    }


# --- the parent: sizes, fits, table -------------------------------------------------------


def run_child(
    case: str, nbytes: int, tensor_bytes: int, budget: int, runs: int, parent: Path
) -> dict[str, Any] | str:
    """The case's result, or why it did not run."""
    need = needs(case, nbytes, tensor_bytes, budget) + MARGIN
    if need > mem_available():
        return f"skipped: needs {need / GiB:.1f} GiB, {mem_available() / GiB:.1f} GiB available"
    if nbytes + MARGIN > shutil.disk_usage(parent).free:
        return f"skipped: needs {show_size(nbytes + MARGIN)} of disk in {parent}"
    root = Path(tempfile.mkdtemp(prefix=f"scaling-{case}-", dir=parent))
    try:
        done = subprocess.run(
            [
                *(sys.executable, __file__, "--child", case, str(nbytes), str(tensor_bytes)),
                *("--budget", str(budget), "--runs", str(runs), "--dir", str(root)),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if done.returncode != 0:
        return "FAILED: " + " | ".join(done.stderr.strip().splitlines()[-3:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def verdict(case: str, r: dict[str, Any], row: dict[str, Any], tensor: int, budget: int) -> str:
    """The issue's targets for this row: arrayckpt's total <= 1.05x the raw write + fsync
    and never behind safetensors; with the budget, extra RSS <= budget + largest tensor."""
    total = r["medians"]["total"]
    raw = row.get("raw")
    st = row.get("safetensors")
    if case == "arrayckpt":
        checks = []
        if isinstance(raw, dict):
            checks.append(total <= 1.05 * raw["medians"]["total"])
        if isinstance(st, dict):
            checks.append(total <= st["medians"]["total"])
        return "" if not checks else "pass" if all(checks) else "FAIL"
    if case == "budget":
        return "pass" if r["extra_rss"] <= budget + tensor else "FAIL"
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default=SIZES, help=f"comma-separated (default {SIZES})")
    ap.add_argument("--runs", type=int, default=3, help="timed saves per case (default 3)")
    ap.add_argument("--tensor-mib", type=int, default=64)
    ap.add_argument("--budget", default=BUDGET, help=f"max_staging_bytes (default {BUDGET})")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 2 runs, budget 64M")
    ap.add_argument("--dir", type=Path, default=os.environ.get("BENCH_DIR"))
    ap.add_argument("--child", nargs=3, metavar=("CASE", "NBYTES", "TENSOR_BYTES"))
    args = ap.parse_args()
    if args.child:
        case, nbytes, tensor_bytes = args.child
        budget = parse_size(args.budget)
        print(json.dumps(child(case, int(nbytes), int(tensor_bytes), budget, args.runs, args.dir)))
        return
    # A SIGTERM (a timeout, a CI stop) unwinds like Ctrl-C: subprocess.run kills the
    # child and the case's files (up to 16 GiB) are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:  # a budget below the state: the chunked path runs too
        args.sizes, args.runs, args.budget = "256M", 2, "64M"
    budget = parse_size(args.budget)
    parent = Path(args.dir or tempfile.gettempdir())
    budgeted = has_budget()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: dict[int, dict[str, Any]] = {}
    for size in args.sizes.split(","):
        nbytes = parse_size(size)
        tensor = min(args.tensor_mib << 20, nbytes)
        row: dict[str, Any] = {}
        for case in CASES:
            if case == "budget" and not budgeted:
                row[case] = "n/a (no max_staging_bytes)"
                continue
            row[case] = run_child(case, nbytes, tensor, budget, args.runs, parent)
            shown = row[case] if isinstance(row[case], str) else row[case]["medians"]
            print(f"  {show_size(nbytes):>8s} {case:12s} {shown}", file=sys.stderr)
        rows[nbytes] = row
    print(
        f"\nscaling: float32 state in {args.tensor_mib} MiB tensors, medians of {args.runs} "
        f"saves after a warm-up, each case in a fresh process; {os.cpu_count()} CPUs, load "
        f"average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, "
        f"{mem_available() / GiB:.1f} GiB available; max_staging_bytes {show_size(budget)}"
    )
    print(
        f"{'size':>8s}  {'case':30s} {'stall s':>8s} {'total s':>8s} {'s/GiB':>6s} "
        f"{'/raw':>6s} {'+peak RSS':>10s} {'/state':>6s}  target"
    )
    for nbytes, row in rows.items():
        tensor = min(args.tensor_mib << 20, nbytes)
        raw = row.get("raw")
        for i, (case, label) in enumerate(CASES.items()):
            size_s = show_size(nbytes) if i == 0 else ""
            r = row[case]
            if isinstance(r, str):
                print(f"{size_s:>8s}  {label:30s} {r}")
                continue
            m = r["medians"]
            stall = f"{m['stall']:8.3f}" if "stall" in m else f"{'':8s}"
            over = f"{m['total'] / raw['medians']['total']:5.2f}x" if isinstance(raw, dict) else ""
            print(
                f"{size_s:>8s}  {label:30s} {stall} {m['total']:8.3f} "
                f"{m['total'] / (nbytes / GiB):6.3f} {over:>6s} "
                f"{r['extra_rss'] / 2**20:6.0f} MiB {r['extra_rss'] / nbytes:5.2f}x  "
                f"{verdict(case, r, row, tensor, budget)}"
            )
    print(
        "\ntargets: arrayckpt async total <= 1.05x raw write + fsync and <= 1.0x safetensors; "
        f"with max_staging_bytes, extra RSS <= {show_size(budget)} + the largest tensor"
    )
    print(f"(whole run {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
