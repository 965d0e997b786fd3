"""What `import arrayckpt` and `arrayckpt --help` cost, from `python -X importtime`.

    python bench/import_time.py            # median of 7 fresh interpreters each
    python bench/import_time.py --runs 3

Targets (issue 11, a 2-core machine): `import arrayckpt` <= 0.15 s, `arrayckpt --help`
<= 0.3 s. Prints the medians, the heaviest imports and whether each target is met; exits 1
when one is missed. Each run is a new process, so nothing is cached in memory but the OS's
page cache (as for a user's second command).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPORT_TARGET_S, HELP_TARGET_S = 0.15, 0.3
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def import_times(code: str) -> dict[str, float]:
    """Cumulative seconds per module for one fresh ``python -X importtime -c code``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        out[name.strip()] = int(cumulative) / 1e6
    return out


def help_wall_s() -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "arrayckpt", "--help"],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="fresh interpreters per figure")
    args = ap.parse_args()
    runs = [import_times("import arrayckpt") for _ in range(args.runs)]
    imported = statistics.median(r["arrayckpt"] for r in runs)
    helped = statistics.median(help_wall_s() for _ in range(args.runs))
    heaviest = sorted(runs[-1].items(), key=lambda kv: -kv[1])
    top = [(n, s) for n, s in heaviest if "." not in n and n != "arrayckpt"][:6]
    print(f"median of {args.runs} fresh interpreters")
    print(
        f"  import arrayckpt        {imported:6.3f} s  (target <= {IMPORT_TARGET_S} s, "
        "python -X importtime, cumulative)"
    )
    print(
        f"  arrayckpt --help        {helped:6.3f} s  (target <= {HELP_TARGET_S} s, "
        "wall time of the whole process)"
    )
    print("  heaviest top-level imports (last run): " + ", ".join(f"{n} {s:.3f} s" for n, s in top))
    print("  ml_dtypes imported: " + ("yes" if "ml_dtypes" in runs[-1] else "no"))
    met = imported <= IMPORT_TARGET_S and helped <= HELP_TARGET_S
    print("targets met" if met else "target MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
