"""Direct writes (``O_DIRECT``) against writes through the page cache, A/B, per size.

    python bench/direct_writes.py                  # 64M,256M,1G,4G; 5 saves per case
    python bench/direct_writes.py --sizes 512M --runs 9 --gaps 3
    python bench/direct_writes.py --quick          # 128 MiB, 2 saves: a smoke test

For each size (float32 state in 16 or 64 MiB tensors), each gap and each mode
(``ARRAYCKPT_DIRECT_WRITES`` 1 and 0), a fresh process times a synchronous
`save_checkpoint` and an `AsyncCheckpointer` save + wait (durable), after one untimed
warm-up of each, and the process's CPU time per save (the CPU a training loop loses to
the save). The gap is a pause before each save: with none, a save's page cache reuses the
pages of the file deleted just before; after 3 s, on a virtual machine that reports freed
memory to its host, they are cold again, as between a training loop's saves. The modes
alternate, process by process, so that drifts of the machine fall on both. Prints medians
and direct / buffered ratios. Exits 0: the figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from measure import mem_available, parse_size  # noqa: E402

SIZES = "64M,256M,1G,4G"
#: Seconds of pause before each save: back to back, and as far apart as freed memory
#: takes to go cold.
GAPS = "0,3"
MODES = {"direct": "1", "buffered": "0"}
#: Room left for the rest of the machine beside a case's state and staging.
MARGIN = 2 << 30


def child(nbytes: int, runs: int, root: Path, gap: float) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import arrayckpt as ac

    rng = np.random.default_rng(0)
    tensor = min(64 << 20, max(16 << 20, nbytes // 8), nbytes)
    state = {f"t{i}": rng.random(tensor // 4, dtype=np.float32) for i in range(nbytes // tensor)}
    times: dict[str, list[float]] = {}

    def timed(key: str, save: Any) -> None:
        for r in range(runs + 1):  # run 0 warms up
            target = root / f"{key}{r}"
            time.sleep(gap)
            cpu, t = time.process_time(), time.perf_counter()
            save(target)
            if r:
                times.setdefault(key, []).append(time.perf_counter() - t)
                times.setdefault(key + "_cpu", []).append(time.process_time() - cpu)
            shutil.rmtree(target)

    timed("sync", lambda target: ac.save_checkpoint(target, state))
    with ac.AsyncCheckpointer() as ckpt:
        timed("async", lambda target: ckpt.save(target, state).result())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gaps", default=GAPS, help="seconds of pause before each save")
    ap.add_argument("--rounds", type=int, default=2, help="processes per mode and size")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", type=Path, default=os.environ.get("BENCH_DIR"))
    ap.add_argument("--child", nargs=3, metavar=("NBYTES", "DIR", "GAP"))
    args = ap.parse_args()
    if args.child:
        nbytes, where, gap = args.child
        print(json.dumps(child(int(nbytes), args.runs, Path(where), float(gap))))
        return
    if args.quick:
        args.sizes, args.runs, args.rounds = "128M", 2, 1
    parent = Path(args.dir or tempfile.gettempdir())
    load = os.getloadavg()[0]
    rows: dict[tuple[float, int], dict[str, list[dict[str, float]]]] = {}
    sizes = [parse_size(size) for size in args.sizes.split(",")]
    for gap, nbytes in [(float(g), n) for g in args.gaps.split(",") for n in sizes]:
        if 2 * nbytes + MARGIN > mem_available():
            print(f"{nbytes >> 20} MiB: skipped, needs {(2 * nbytes + MARGIN) >> 30} GiB of memory")
            continue
        results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode, value in MODES.items():
                root = Path(tempfile.mkdtemp(prefix="direct-", dir=parent))
                try:
                    done = subprocess.run(
                        [
                            *(
                                sys.executable,
                                __file__,
                                "--child",
                                str(nbytes),
                                str(root),
                                str(gap),
                            ),
                            *("--runs", str(args.runs)),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=3600,
                        check=True,
                        env={**os.environ, "ARRAYCKPT_DIRECT_WRITES": value},
                    )
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                results[mode].append(json.loads(done.stdout.splitlines()[-1]))
        rows[gap, nbytes] = results
    print(
        f"\ndirect vs buffered writes: float32 state in 16-64 MiB tensors, medians of "
        f"{args.runs} saves x {args.rounds} processes per mode; {os.cpu_count()} CPUs, load "
        f"average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    keys = ("sync", "sync_cpu", "async", "async_cpu")
    print(f"{'gap':>4s} {'size':>6s}  {'mode':9s}" + "".join(f"{k:>11s}" for k in keys))
    for (gap, nbytes), results in rows.items():
        medians = {
            mode: {k: statistics.median(r[k] for r in runs) for k in keys}
            for mode, runs in results.items()
        }
        for mode, m in medians.items():
            line = f"{gap:3.0f}s {nbytes >> 20:5d}M  {mode:9s}"
            print(line + "".join(f"{m[k]:10.3f}s" for k in keys))
        d, b = medians["direct"], medians["buffered"]
        print(f"{'':11s}  {'ratio':9s}" + "".join(f"{d[k] / b[k]:10.2f}x" for k in keys))


if __name__ == "__main__":
    main()
