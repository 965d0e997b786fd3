"""Print a results JSON of bench/run.py as the Markdown tables of docs/performance.md.

python bench/markdown.py bench/results/bench-cpu-full-....json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import LABELS, LOADS, SAVES


def main() -> None:
    saved = json.loads(Path(sys.argv[1]).read_text())
    results = {(r["workload"], r["case"]): r for r in saved["results"] if "medians" in r}
    for workload in ("W1", "W2", "W3", "W4"):
        rows = [(c, results[(workload, c)]) for c, _ in SAVES + LOADS if (workload, c) in results]
        if not rows:
            continue
        nbytes = rows[0][1]["nbytes"]
        print(f"\n### {workload}\n")
        print("| | stall s | staged s | total s | load s | +peak RSS |")
        print("|---|---:|---:|---:|---:|---:|")
        for case, r in rows:
            m = r["medians"]
            cells = [f"{m[k]:.3f}" if k in m else "" for k in ("stall", "staged", "total", "load")]
            rss = r.get("extra_peak_rss")
            rss_s = "" if rss is None else f"{rss / 2**20:.0f} MiB ({rss / nbytes:.2f}x)"
            name = LABELS[case]
            if case.startswith("arrayckpt"):
                name = f"**{name}**"
            print(f"| {name} | " + " | ".join(cells) + f" | {rss_s} |")


if __name__ == "__main__":
    main()
