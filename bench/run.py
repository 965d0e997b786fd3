"""arrayckpt benchmarks, side by side with memcpy, raw writes and peers.

    python bench/run.py            # full run (W1, W2, W3; median of 7 runs each)
    python bench/run.py --quick    # small sizes, 3 runs: a smoke test of the suite
    python bench/run.py --gpu      # on a CUDA device: torch tensors on cuda:0 (and CuPy
                                   # arrays where CuPy is installed)

Each measurement runs in its own process (bench/measure.py) so peak RSS is its own. Prints
a table and the ratios, checks the targets, writes JSON to bench/results/ and, with
``--plot``, a PNG of W1/W3 to docs/img/bench.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
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

import workloads  # noqa: E402

SAVES = [
    ("memcpy", "limit: warm memcpy, 1 thread"),
    ("memcpy_threads", "limit: warm memcpy, all cores"),
    ("raw_write", "limit: raw write + fsync"),
    ("raw_write_overlapped", "limit: raw write, disk started early"),
    ("arrayckpt_async", "arrayckpt AsyncCheckpointer"),
    ("arrayckpt_sync", "arrayckpt save_checkpoint"),
    ("st_numpy", "safetensors.numpy.save_file"),
    ("st_torch", "safetensors.torch.save_file"),
    ("torch_save", "torch.save"),
    ("dcp_save", "DCP save"),
    ("dcp_async", "DCP async_save"),
]
LOADS = [
    ("arrayckpt_load", "arrayckpt load (mmap, CRC verified)"),
    ("arrayckpt_load_eager", "arrayckpt load (mmap=False, verified)"),
    ("np_fromfile", "np.fromfile"),
    ("st_load", "safetensors load_file [torch: lazy]"),
    ("torch_load", "torch.load(mmap=True) [lazy]"),
]
GPU_SAVES = [
    ("d2h_pinned", "limit: D2H into pinned, 1 sync"),
    ("d2h_cpu", "plain .cpu() of each tensor"),
    ("arrayckpt_async", "arrayckpt AsyncCheckpointer"),
    ("arrayckpt_sync", "arrayckpt save_checkpoint"),
    ("st_torch", "safetensors.torch.save_file"),
    ("torch_save", "torch.save"),
    ("dcp_save", "DCP save"),
    ("dcp_async", "DCP async_save"),
    ("dcp_async_pinned", "DCP async_save, pinned stager"),
]
#: Run with ``--gpu`` where CuPy is importable: the same state as CuPy arrays.
CUPY_SAVES = [
    ("cupy_d2h_pinned", "CuPy limit: get into pinned, 1 sync"),
    ("cupy_asnumpy", "CuPy: cupy.asnumpy of each array"),
    ("cupy_arrayckpt_async", "arrayckpt AsyncCheckpointer, CuPy"),
]
GPU_CASES = [c for c, _ in GPU_SAVES]
LABELS = dict(SAVES + LOADS + GPU_SAVES + CUPY_SAVES)
SHORT = {
    "W1": "W1: 512 MiB, 32 f32 tensors",
    "W2": "W2: 20,000 x 4 KiB",
    "W3": "W3: transformer-like, 260 MiB, 189 tensors",
}
#: Cases that do not apply to a workload (safetensors.numpy has no bfloat16).
#: CuPy has no bfloat16, so W3 has no CuPy form.
SKIP = {"W3": {"st_numpy", *(c for c, _ in CUPY_SAVES)}}


def run_case(workload: str, case: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "measure.py"),
        workload,
        case,
        "--runs",
        str(args.runs),
        "--dir",
        str(tmp / f"{workload}-{case}"),
        "--device",
        args.device,
    ]
    if args.quick:
        cmd.append("--quick")
    started = time.perf_counter()
    load_average = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    shutil.rmtree(tmp / f"{workload}-{case}", ignore_errors=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        print(f"  {workload} {case}: FAILED: {' | '.join(tail)}", file=sys.stderr)
        return {"workload": workload, "case": case, "error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["medians"] = {k: statistics.median(v) for k, v in result["times"].items()}
    result["minimums"] = {k: min(v) for k, v in result["times"].items()}
    result["wall_s"] = time.perf_counter() - started
    result["load_average_1min"] = load_average
    med = " ".join(f"{k}={v:.4f}s" for k, v in result["medians"].items())
    print(f"  {workload:3s} {case:22s} {med}", file=sys.stderr)
    return result


def fmt_s(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}" if x >= 0.01 else f"{x:.4f}"


def table(results: dict[str, dict[str, Any]], workload: str) -> list[str]:
    rows = [r for (w, _), r in results.items() if w == workload and "medians" in r]
    if not rows:
        return []
    nbytes = rows[0]["nbytes"]
    lines = [
        f"\n{workload}: {workloads.DESCRIPTIONS[workload]} — {nbytes / 2**20:.0f} MiB, "
        f"{rows[0]['tensors']} tensors",
        f"{'':38s} {'stall s':>8s} {'write s':>8s} {'total s':>8s} {'load s':>8s} "
        f"{'GB/s':>6s} {'+peak RSS':>12s}",
    ]
    for r in rows:
        m = r["medians"]
        moved = m.get("total") or m.get("load") or m.get("stall")
        rss = r.get("extra_peak_rss")
        rss_s = "" if rss is None else f"{rss / 2**20:6.0f} MiB {rss / nbytes:4.2f}x"
        lines.append(
            f"{LABELS.get(r['case'], r['case']):38s} {fmt_s(m.get('stall')):>8s} "
            f"{fmt_s(m.get('write')):>8s} {fmt_s(m.get('total')):>8s} {fmt_s(m.get('load')):>8s} "
            f"{nbytes / moved / 1e9 if moved else 0:6.2f} {rss_s:>12s}"
        )
    return lines


def med(results: dict[str, dict[str, Any]], workload: str, case: str, key: str) -> float | None:
    r = results.get((workload, case))
    return None if r is None else r.get("medians", {}).get(key)


def ratios(results: dict[str, dict[str, Any]], workload: str) -> list[str]:
    ours_stall = med(results, workload, "arrayckpt_async", "stall")
    ours_total = med(results, workload, "arrayckpt_async", "total")
    ours_load = med(results, workload, "arrayckpt_load", "load")
    lines = [f"\n{workload} ratios (arrayckpt / other; < 1 means arrayckpt is faster)"]

    def add(label: str, ours: float | None, case: str, key: str) -> None:
        theirs = med(results, workload, case, key)
        if ours and theirs:
            lines.append(f"  {label:52s} {ours / theirs:6.2f}x")

    add("stall / warm memcpy (1 thread)", ours_stall, "memcpy", "stall")
    add("stall / warm memcpy (all cores)", ours_stall, "memcpy_threads", "stall")
    add("stall / GPU D2H into pinned", ours_stall, "d2h_pinned", "stall")
    add("stall / plain .cpu() of each tensor", ours_stall, "d2h_cpu", "stall")
    add("stall / DCP async_save stall", ours_stall, "dcp_async", "stall")
    add("stall / DCP async_save stall, pinned stager", ours_stall, "dcp_async_pinned", "stall")
    cupy_stall = med(results, workload, "cupy_arrayckpt_async", "stall")
    add("CuPy stall / CuPy get into pinned", cupy_stall, "cupy_d2h_pinned", "stall")
    add("CuPy stall / cupy.asnumpy of each array", cupy_stall, "cupy_asnumpy", "stall")
    add("total (durable) / raw write + fsync", ours_total, "raw_write", "total")
    add(
        "total (durable) / raw write, disk started early",
        ours_total,
        "raw_write_overlapped",
        "total",
    )
    for case in ("st_numpy", "st_torch", "torch_save", "dcp_save", "dcp_async", "dcp_async_pinned"):
        add(f"total / {LABELS[case]} (+fsync)", ours_total, case, "total")
    add(
        "sync save_checkpoint / raw write + fsync",
        med(results, workload, "arrayckpt_sync", "total"),
        "raw_write",
        "total",
    )
    for case in ("np_fromfile", "st_load", "torch_load"):
        add(f"load / {LABELS[case]}", ours_load, case, "load")
    return lines


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    w1 = results.get(("W1", "arrayckpt_async"), {})
    rss = w1.get("extra_peak_rss")

    def vs(workload: str, case: str, other: str, key: str) -> float | None:
        return ratio(med(results, workload, case, key), med(results, workload, other, key))

    checks = [
        ("W1 stall <= 1.3x warm memcpy", 1.3, vs("W1", "arrayckpt_async", "memcpy", "stall")),
        (
            "W1 durable total <= 1.10x raw write + fsync",
            1.10,
            vs("W1", "arrayckpt_async", "raw_write", "total"),
        ),
        ("W1 load <= 1.1x np.fromfile", 1.1, vs("W1", "arrayckpt_load", "np_fromfile", "load")),
        (
            "W1 extra peak RSS during async save <= 1.1x state",
            1.1,
            rss / w1["nbytes"] if rss is not None and w1.get("nbytes") else None,
        ),
        (
            "W2 total <= 1.5x safetensors.numpy.save_file (+fsync)",
            1.5,
            vs("W2", "arrayckpt_async", "st_numpy", "total"),
        ),
        (
            "W1 stall <= 0.5x DCP async_save stall",
            0.5,
            vs("W1", "arrayckpt_async", "dcp_async", "stall"),
        ),
    ]
    return [
        {
            "target": name,
            "limit": limit,
            "measured": value,
            "met": None if value is None else value <= limit,
        }
        for name, limit, value in checks
    ]


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c, _ in SAVES] + [c for c, _ in LOADS]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, workload in zip(axes, ("W1", "W3"), strict=True):
        names, stall, rest, load = [], [], [], []
        for case in cases:
            r = results.get((workload, case))
            if not r or "medians" not in r:
                continue
            m = r["medians"]
            names.append(LABELS[case])
            s = m.get("stall", 0.0)
            stall.append(s)
            rest.append(m["total"] - s if "total" in m else 0.0)
            load.append(m.get("load", 0.0))
        y = range(len(names))
        ax.barh(y, stall, color="#d62728", label="stall: caller blocked (memcpy: the copy)")
        ax.barh(y, rest, left=stall, color="#1f77b4", label="rest of total, until durable")
        ax.barh(y, load, color="#2ca02c", label="load")
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median)")
        ax.set_title(SHORT[workload], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 runs")
    ap.add_argument("--gpu", action="store_true", help="torch tensors on cuda:0")
    ap.add_argument("--runs", type=int, help="timed runs per measurement (default 7; quick 3)")
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--cases", help="comma-separated subset of cases")
    ap.add_argument(
        "--plot",
        type=Path,
        nargs="?",
        const=ROOT / "docs" / "img" / "bench.png",
        help="write the W1/W3 PNG (default path docs/img/bench.png)",
    )
    ap.add_argument("--tmp", type=Path, help="where checkpoints are written (default: $TMPDIR)")
    ap.add_argument("--replot", type=Path, help="only redraw --plot from a results JSON")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        by_key = {(r["workload"], r["case"]): r for r in saved["results"]}
        plot(by_key, args.plot or ROOT / "docs" / "img" / "bench.png", saved["report"][0])
        return
    # 7, not 5: this virtual disk's fsync latency is bimodal, medians of 5 flip between modes.
    args.runs = args.runs or (3 if args.quick else 7)
    args.device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU: torch.cuda.is_available() is False")
    chosen = set(args.cases.split(",")) if args.cases else None
    cases = GPU_CASES if args.gpu else [c for c, _ in SAVES + LOADS]
    if args.gpu and importlib.util.find_spec("cupy") is not None:
        cases = cases + [c for c, _ in CUPY_SAVES]
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
        "device": args.device,
    }
    tmp = Path(tempfile.mkdtemp(prefix="arrayckpt-bench-", dir=args.tmp))
    results: dict[tuple[str, str], dict[str, Any]] = {}
    started = time.perf_counter()
    try:
        for workload in args.workloads.split(","):
            for case in cases:
                if (chosen and case not in chosen) or case in SKIP.get(workload, ()):
                    continue
                results[(workload, case)] = run_case(workload, case, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    machine["load_average_after"] = os.getloadavg()
    lines = [
        f"arrayckpt benchmark — {machine['cpus']} CPUs, device {args.device}, "
        f"{'quick' if args.quick else 'full'} run, median of {args.runs} runs, "
        f"load average {machine['load_average_before'][0]:.1f} -> "
        f"{machine['load_average_after'][0]:.1f}"
    ]
    for workload in args.workloads.split(","):
        lines += table(results, workload)
        lines += ratios(results, workload)
    checked = targets(results)
    lines.append("\nTargets")
    for t in checked:
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']:56s} {value:>6s}  {verdict}")
    lines.append(f"\n(whole run {time.perf_counter() - started:.0f} s)")
    print("\n".join(lines))
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"bench-{args.device}-{'quick' if args.quick else 'full'}-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "runs": args.runs,
                "quick": args.quick,
                "results": [r for r in results.values()],
                "targets": checked,
                "report": lines,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    if args.plot:
        plot(results, args.plot, lines[0])
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
