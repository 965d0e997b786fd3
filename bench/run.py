"""arrayckpt benchmarks, side by side with memcpy, raw writes and peers.

    python bench/run.py            # full run (W1, W2, W3, W4; median of 7 runs each)
    python bench/run.py --quick    # small sizes, 3 runs: a smoke test of the suite
    python bench/run.py --gpu      # on a CUDA device: torch tensors on cuda:0 (and CuPy
                                   # arrays where CuPy is installed)

Each measurement runs in its own process (bench/measure.py) so peak RSS is its own; a
first-save case runs one fresh process per run. Prints a table and the ratios, checks the
targets (each a ratio with met / NOT met), writes JSON to bench/results/ and, with
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
    ("memcpy_cold", "limit: cold memcpy (fresh memory)"),
    ("memcpy_threads", "limit: warm memcpy, all cores"),
    ("raw_write", "limit: raw write + fsync"),
    ("raw_write_overlapped", "limit: raw write, disk started early"),
    ("raw_write_direct", "limit: raw direct write (O_DIRECT) + fsync"),
    ("arrayckpt_async", "arrayckpt AsyncCheckpointer"),
    ("arrayckpt_first", "arrayckpt first save of a process"),
    ("arrayckpt_first_prepared", "arrayckpt first save after prepare()"),
    ("arrayckpt_async_bg", "arrayckpt async, background_staging"),
    ("arrayckpt_sync", "arrayckpt save_checkpoint"),
    ("st_numpy", "safetensors.numpy.save_file"),
    ("st_torch", "safetensors.torch.save_file"),
    ("torch_save", "torch.save"),
    ("dcp_save", "DCP save"),
    ("dcp_async", "DCP async_save"),
    ("dcp_first", "DCP async_save, first of a process"),
    ("dcp_async_stager", "DCP async_save, DefaultStager"),
    ("orbax_async", "Orbax StandardCheckpointer (async)"),
    ("orbax_sync", "Orbax Checkpointer (sync)"),
]
LOADS = [
    ("arrayckpt_load", "arrayckpt load (mmap, CRC verified)"),
    ("arrayckpt_load_eager", "arrayckpt load (mmap=False, verified)"),
    ("np_fromfile", "np.fromfile"),
    ("st_load", "safetensors load_file [torch: lazy]"),
    ("torch_load", "torch.load(mmap=True) [lazy]"),
    ("orbax_load", "Orbax StandardCheckpointer.restore"),
    ("header_parse", "arrayckpt header parse, cold (model file)"),
]
#: Cases timed on the first save of a fresh process: one process per run, each running
#: this measure.py case with --first.
FIRST = {
    "arrayckpt_first": "arrayckpt_async",
    "arrayckpt_first_prepared": "arrayckpt_prepared",
    "dcp_first": "dcp_async",
}
GPU_SAVES = [
    ("d2h_pinned", "limit: D2H into pinned, 1 sync"),
    ("d2h_cpu", "plain .cpu() of each tensor"),
    ("arrayckpt_async", "arrayckpt AsyncCheckpointer"),
    ("arrayckpt_first", "arrayckpt first save of a process"),
    ("arrayckpt_first_prepared", "arrayckpt first save after prepare()"),
    ("arrayckpt_async_bg", "arrayckpt async, background_staging"),
    ("arrayckpt_sync", "arrayckpt save_checkpoint"),
    ("st_torch", "safetensors.torch.save_file"),
    ("torch_save", "torch.save"),
    ("dcp_save", "DCP save"),
    ("dcp_async", "DCP async_save"),
    ("dcp_first", "DCP async_save, first of a process"),
    ("dcp_async_pinned", "DCP async_save, pinned stager"),
    ("dcp_async_stager", "DCP async_save, DefaultStager"),
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
    "W4": "W4: JAX, Flax-style params + optax AdamW, 312 MiB",
}
ORBAX = {"orbax_async", "orbax_sync", "orbax_load"}
TORCH_ONLY = {"st_torch", "torch_save", "torch_load", "dcp_save", "dcp_async", "dcp_first"}
TORCH_ONLY |= {"dcp_async_stager", "dcp_async_pinned"}
#: Cases that do not apply to a workload: safetensors.numpy and CuPy have no bfloat16 (W3);
#: Orbax is for JAX and NumPy state of few arrays (W1, W4: 20,000 arrays of W2 would take
#: it minutes); W4 is JAX state, which the torch peers do not take.
SKIP = {
    "W2": ORBAX,
    "W3": {"st_numpy", *ORBAX, *(c for c, _ in CUPY_SAVES)},
    "W4": TORCH_ONLY | {c for c, _ in CUPY_SAVES},
}


def measure(workload: str, case: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One measure.py process: its JSON, or ``{"error": ...}``."""
    first = case in FIRST
    cmd = [
        sys.executable,
        str(HERE / "measure.py"),
        workload,
        FIRST.get(case, case),
        "--runs",
        str(args.runs),
        "--dir",
        str(tmp / f"{workload}-{case}"),
        "--device",
        args.device,
    ]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--first"] if first else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    shutil.rmtree(tmp / f"{workload}-{case}", ignore_errors=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["case"] = case
    return result


def run_case(workload: str, case: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    started = time.perf_counter()
    load_average = os.getloadavg()[0]
    # A first save happens once per process: as many fresh processes as runs.
    runs = [measure(workload, case, args, tmp) for _ in range(args.runs if case in FIRST else 1)]
    failed = next((r for r in runs if "error" in r), None)
    if failed:
        tail = failed["error"].strip().splitlines()[-3:]
        print(f"  {workload} {case}: FAILED: {' | '.join(tail)}", file=sys.stderr)
        return {"workload": workload, "case": case, "error": failed["error"]}
    result = runs[0]
    for other in runs[1:]:
        for key, seconds in other["times"].items():
            result["times"][key] += seconds
    peaks = [r["extra_peak_rss"] for r in runs if r["extra_peak_rss"] is not None]
    result["extra_peak_rss"] = max(peaks) if peaks else None
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
        f"{'':38s} {'stall s':>8s} {'staged s':>8s} {'write s':>8s} {'total s':>8s} "
        f"{'load s':>8s} {'GB/s':>6s} {'+peak RSS':>12s}",
    ]
    for r in rows:
        m = r["medians"]
        moved = m.get("total") or m.get("load") or m.get("stall")
        # a header parse moves no tensor bytes: its rate says nothing
        rate = "" if r["case"] == "header_parse" or not moved else f"{nbytes / moved / 1e9:6.2f}"
        rss = r.get("extra_peak_rss")
        rss_s = "" if rss is None else f"{rss / 2**20:6.0f} MiB {rss / nbytes:4.2f}x"
        lines.append(
            f"{LABELS.get(r['case'], r['case']):38s} {fmt_s(m.get('stall')):>8s} "
            f"{fmt_s(m.get('staged')):>8s} {fmt_s(m.get('write')):>8s} "
            f"{fmt_s(m.get('total')):>8s} {fmt_s(m.get('load')):>8s} "
            f"{rate:>6s} {rss_s:>12s}"
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
    add("stall / cold memcpy (fresh memory)", ours_stall, "memcpy_cold", "stall")
    add("stall / warm memcpy (all cores)", ours_stall, "memcpy_threads", "stall")
    add("stall / GPU D2H into pinned", ours_stall, "d2h_pinned", "stall")
    add("stall / plain .cpu() of each tensor", ours_stall, "d2h_cpu", "stall")
    add("stall / DCP async_save stall", ours_stall, "dcp_async", "stall")
    add("stall / DCP async_save stall, pinned stager", ours_stall, "dcp_async_pinned", "stall")
    add("stall / Orbax StandardCheckpointer stall", ours_stall, "orbax_async", "stall")
    first = med(results, workload, "arrayckpt_first", "stall")
    prepared = med(results, workload, "arrayckpt_first_prepared", "stall")
    add("first-save stall / warm stall", first, "arrayckpt_async", "stall")
    add("first-save stall after prepare() / warm stall", prepared, "arrayckpt_async", "stall")
    add("first-save stall / DCP first-save stall", first, "dcp_first", "stall")
    add(
        "first-save total / warm total",
        med(results, workload, "arrayckpt_first", "total"),
        "arrayckpt_async",
        "total",
    )
    bg_stall = med(results, workload, "arrayckpt_async_bg", "stall")
    bg_staged = med(results, workload, "arrayckpt_async_bg", "staged")
    add("background_staging stall / DefaultStager stall", bg_stall, "dcp_async_stager", "stall")
    add("background staged / DefaultStager staged", bg_staged, "dcp_async_stager", "staged")
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
    add(
        "total (durable) / raw direct write + fsync",
        ours_total,
        "raw_write_direct",
        "total",
    )
    for case in (
        "st_numpy",
        "st_torch",
        "torch_save",
        "dcp_save",
        "dcp_async",
        "dcp_async_pinned",
        "dcp_async_stager",
        "orbax_async",
        "orbax_sync",
    ):
        add(f"total / {LABELS[case]} (+fsync)", ours_total, case, "total")
    add(
        "sync save_checkpoint / raw write + fsync",
        med(results, workload, "arrayckpt_sync", "total"),
        "raw_write",
        "total",
    )
    for case in ("np_fromfile", "st_load", "torch_load", "orbax_load"):
        add(f"load / {LABELS[case]}", ours_load, case, "load")
    eager = med(results, workload, "arrayckpt_load_eager", "load")
    add("eager load (mmap=False) / np.fromfile", eager, "np_fromfile", "load")
    return lines


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15's goals (and the earlier ones still held), each a ratio against its limit."""

    def vs(workload: str, case: str, key: str, other: str) -> float | None:
        a, b = med(results, workload, case, key), med(results, workload, other, key)
        return a / b if a and b else None

    def rss(workload: str) -> float | None:
        r = results.get((workload, "arrayckpt_async"), {})
        extra = r.get("extra_peak_rss")
        return extra / r["nbytes"] if extra is not None and r.get("nbytes") else None

    def per_tensor_us(workload: str, case: str, key: str) -> float | None:
        r, seconds = results.get((workload, case), {}), med(results, workload, case, key)
        return seconds / r["tensors"] * 1e6 if seconds and r.get("tensors") else None

    ours = "arrayckpt_async"
    st = {"W1": "st_numpy", "W3": "st_torch", "W4": "st_numpy"}
    # (target, limit, measured[, unit]): a ratio unless a unit is given
    checks: list[tuple[Any, ...]] = [
        ("W1 stall <= 1.3x warm memcpy", 1.3, vs("W1", ours, "stall", "memcpy")),
        ("W1 stall <= 0.5x DCP async_save stall", 0.5, vs("W1", ours, "stall", "dcp_async")),
        ("W1 extra peak RSS during async save <= 1.1x state", 1.1, rss("W1")),
        (
            "W1 mapped load <= 1.1x np.fromfile",
            1.1,
            vs("W1", "arrayckpt_load", "load", "np_fromfile"),
        ),
    ]
    for w in ("W1", "W3", "W4"):  # every backend on the same fast path
        checks += [
            (
                f"{w} durable total <= 1.05x raw write + fsync",
                1.05,
                vs(w, ours, "total", "raw_write"),
            ),
            (
                f"{w} durable total <= 1.0x {LABELS[st[w]]} (+fsync)",
                1.0,
                vs(w, ours, "total", st[w]),
            ),
        ]
    for w in ("W1", "W3"):  # W4's loads make jax.Arrays: a copy np.fromfile does not make
        checks += [
            (
                f"{w} eager load <= 1.2x np.fromfile",
                1.2,
                vs(w, "arrayckpt_load_eager", "load", "np_fromfile"),
            ),
            (
                f"{w} first stall after prepare() <= 2x warm stall",
                2.0,
                vs(w, "arrayckpt_first_prepared", "stall", ours),
            ),
            (
                f"{w} first total after prepare() <= 1.2x warm total",
                1.2,
                vs(w, "arrayckpt_first_prepared", "total", ours),
            ),
            (
                f"{w} first stall (no prepare) <= 2x warm stall",
                2.0,
                vs(w, "arrayckpt_first", "stall", ours),
            ),
            (
                f"{w} first total (no prepare) <= 1.2x warm total",
                1.2,
                vs(w, "arrayckpt_first", "total", ours),
            ),
            (
                f"{w} background_staging stall <= 1.0x DCP DefaultStager stall",
                1.0,
                vs(w, "arrayckpt_async_bg", "stall", "dcp_async_stager"),
            ),
        ]
    checks += [
        (
            "W4 (JAX) stall <= 1.0x Orbax StandardCheckpointer stall",
            1.0,
            vs("W4", ours, "stall", "orbax_async"),
        ),
        ("W4 (JAX) stall <= 0.1x warm memcpy (no copy)", 0.1, vs("W4", ours, "stall", "memcpy")),
        ("W4 (JAX) extra peak RSS during async save <= 0.1x state", 0.1, rss("W4")),
        ("W2 stall <= 2x warm memcpy", 2.0, vs("W2", ours, "stall", "memcpy")),
        (
            "W2 header parse, cold, <= 2 us per tensor",
            2.0,
            per_tensor_us("W2", "header_parse", "load"),
            "us",
        ),
        (
            "W2 total <= 1.0x safetensors.numpy.save_file (+fsync)",
            1.0,
            vs("W2", ours, "total", "st_numpy"),
        ),
        (
            "W2 load <= 1.0x safetensors.numpy.load_file",
            1.0,
            vs("W2", "arrayckpt_load", "load", "st_load"),
        ),
    ]
    if any(case == "d2h_pinned" for _, case in results):  # a --gpu run
        for w in ("W1", "W3"):
            checks.append(
                (
                    f"{w} D2H snapshot >= 80 % of pinned D2H speed (stall <= 1.25x)",
                    1.25,
                    vs(w, ours, "stall", "d2h_pinned"),
                )
            )
    return [
        {
            "target": name,
            "limit": limit,
            "measured": value,
            "met": None if value is None else value <= limit,
            "unit": unit[0] if unit else "x",
        }
        for name, limit, value, *unit in checks
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


def transparent_hugepage() -> str:
    """The THP mode in force (``always``/``madvise``/``never``): first touches of fresh
    memory, so first saves and cold copies, depend on it."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return next((w[1:-1] for w in text.split() if w.startswith("[")), text.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 runs")
    ap.add_argument("--gpu", action="store_true", help="torch tensors on cuda:0")
    ap.add_argument("--runs", type=int, help="timed runs per measurement (default 7; quick 3)")
    ap.add_argument(
        "--workloads", help="comma-separated (default W1,W2,W3,W4; with --gpu W1,W2,W3)"
    )
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
    if args.workloads is None:  # W4 is JAX state on the CPU: not with --gpu
        jax_there = all(importlib.util.find_spec(m) for m in ("jax", "optax"))
        args.workloads = "W1,W2,W3" + (",W4" if jax_there and not args.gpu else "")
        if not jax_there and not args.gpu:
            print("jax or optax is not installed: W4 (JAX state) is skipped", file=sys.stderr)
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
        "transparent_hugepage": transparent_hugepage(),
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
        f"{machine['load_average_after'][0]:.1f}, transparent huge pages "
        f"{machine['transparent_hugepage']}"
    ]
    for workload in args.workloads.split(","):
        lines += table(results, workload)
        lines += ratios(results, workload)
    checked = targets(results)
    lines.append("\nTargets")
    for t in checked:
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}{t['unit']}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']:64s} {value:>7s}  {verdict}")
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
