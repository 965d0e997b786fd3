"""The write and read pipeline against the hardware's limits, side by side, with pass/fail.

For each size, one process runs every case round-robin (so drifts of the disk hit them
alike) and reports medians:

- saves: raw write + fsync of the same bytes (the limit), ``safetensors.numpy.save_file``
  + fsync, arrayckpt's ``AsyncCheckpointer`` save + wait (its stall too), and arrayckpt's
  writer alone (`format.write_file` of a snapshot already taken);
- loads, from the page cache: ``np.fromfile`` of the raw bytes (the limit),
  ``safetensors.numpy.load_file``, and arrayckpt's eager load (``mmap=False``, every
  CRC32C verified) and mapped load (verified);
- per-tensor overhead: 20,000 tensors of 4 KiB (W2), against a warm memcpy and safetensors.

Run: ``python bench/stream.py [--sizes 256M,1G,4G] [--runs 5] [--tensor-mib 64]``.
Exits 0 either way: targets are reported, not asserted (timings on shared machines vary).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import fsync_path, parse_size

import arrayckpt as ac
from arrayckpt import format as fmt
from arrayckpt.snapshot import take_snapshot
from arrayckpt.staging import StagingPool


def state_of(nbytes: int, tensor_bytes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    count = max(1, nbytes // tensor_bytes)
    return {f"t{i}": rng.random(tensor_bytes // 4, dtype=np.float32) for i in range(count)}


def tiny_state(count: int = 20_000) -> dict[str, np.ndarray]:
    block = np.random.default_rng(0).random(count * 1024, dtype=np.float32)
    return {f"param{i}": block[i * 1024 : (i + 1) * 1024].copy() for i in range(count)}


Case = Callable[[Path], dict[str, float]]


def save_cases(state: dict[str, np.ndarray]) -> dict[str, Case]:
    from safetensors.numpy import save_file

    buffers = [a.reshape(-1).view(np.uint8) for a in state.values()]
    ckpt = ac.AsyncCheckpointer()
    snap = take_snapshot(state, None, None, staging=StagingPool())
    copies = [np.empty_like(b) for b in buffers]

    def memcpy(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        for d, s in zip(copies, buffers, strict=True):
            np.copyto(d, s)
        return {"stall": time.perf_counter() - t}

    def raw(d: Path) -> dict[str, float]:
        t = time.perf_counter()
        with open(d / "raw.bin", "wb", buffering=0) as f:
            for b in buffers:
                f.write(b.data)
            os.fsync(f.fileno())
        return {"total": time.perf_counter() - t}

    def st_save(d: Path) -> dict[str, float]:
        t = time.perf_counter()
        save_file(state, str(d / "st.safetensors"))
        fsync_path(d / "st.safetensors")
        return {"total": time.perf_counter() - t}

    def arrayckpt_async(d: Path) -> dict[str, float]:
        t = time.perf_counter()
        future = ckpt.save(d / "ckpt", state)
        stall = time.perf_counter() - t
        future.result()
        return {"stall": stall, "total": time.perf_counter() - t}

    def writer(d: Path) -> dict[str, float]:
        t = time.perf_counter()
        fmt.write_file(d / "w.safetensors", snap.model)
        return {"total": time.perf_counter() - t}

    return {
        "memcpy": memcpy,
        "raw_write_fsync": raw,
        "st_save_file_fsync": st_save,
        "arrayckpt_async": arrayckpt_async,
        "arrayckpt_writer": writer,
    }


def load_cases(state: dict[str, np.ndarray], root: Path) -> dict[str, Case]:
    from safetensors.numpy import load_file, save_file

    raw_path = root / "src.raw"
    with open(raw_path, "wb") as f:
        for a in state.values():
            f.write(a.data)
    st_path = root / "src.safetensors"
    save_file(state, str(st_path))
    ckpt = ac.save_checkpoint(root / "src", state)

    def timed(fn: Callable[[], object]) -> Case:
        def once(_: Path) -> dict[str, float]:
            t = time.perf_counter()
            got = fn()
            elapsed = time.perf_counter() - t
            del got
            return {"load": elapsed}

        return once

    return {
        "np_fromfile": timed(lambda: np.fromfile(raw_path, np.uint8)),
        "st_load_file": timed(lambda: load_file(str(st_path))),
        "arrayckpt_eager": timed(lambda: ac.load_checkpoint(ckpt, mmap=False)),
        "arrayckpt_mmap": timed(lambda: ac.load_checkpoint(ckpt)),
    }


def run_rounds(cases: dict[str, Case], runs: int, root: Path) -> dict[str, dict[str, float]]:
    times: dict[str, dict[str, list[float]]] = {name: {} for name in cases}
    for r in range(runs + 1):  # round 0 warms up
        for name, case in cases.items():
            d = root / f"{name}-{r}"
            d.mkdir()
            result = case(d)
            shutil.rmtree(d)
            if r:
                for key, seconds in result.items():
                    times[name].setdefault(key, []).append(seconds)
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256M,1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tensor-mib", type=int, default=64)
    ap.add_argument("--no-tiny", action="store_true", help="skip the 20,000 x 4 KiB state")
    ap.add_argument("--dir", type=Path, default=os.environ.get("BENCH_DIR"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="arrayckpt-stream-", dir=args.dir))
    checks: list[tuple[str, float, float | None]] = []
    print(f"stream bench: {os.cpu_count()} CPUs, median of {args.runs} runs, in {root}")
    try:
        workloads = [
            (s, state_of(parse_size(s), args.tensor_mib << 20)) for s in args.sizes.split(",")
        ]
        if not args.no_tiny:
            workloads.append(("20000x4KiB", tiny_state()))
        for label, state in workloads:
            nbytes = sum(a.nbytes for a in state.values())
            saves = run_rounds(save_cases(state), args.runs, root)
            loads_root = root / "loads"
            loads_root.mkdir()
            loads = run_rounds(load_cases(state, loads_root), args.runs, root)
            shutil.rmtree(loads_root)
            print(f"\n{label}: {nbytes / 2**20:.0f} MiB in {len(state)} tensors")
            for name, m in {**saves, **loads}.items():
                cols = "  ".join(f"{k} {v:8.4f} s" for k, v in m.items())
                print(f"  {name:22s} {cols}")
            total = saves["arrayckpt_async"]["total"]
            tiny = label.startswith("20000")
            if not tiny:
                checks.append(
                    (
                        f"{label} async total <= 1.05x raw write + fsync",
                        1.05,
                        ratio(total, saves["raw_write_fsync"]["total"]),
                    )
                )
                checks.append(
                    (
                        f"{label} writer alone <= 1.05x raw write + fsync",
                        1.05,
                        ratio(
                            saves["arrayckpt_writer"]["total"], saves["raw_write_fsync"]["total"]
                        ),
                    )
                )
                checks.append(
                    (
                        f"{label} eager load <= 1.2x np.fromfile",
                        1.2,
                        ratio(loads["arrayckpt_eager"]["load"], loads["np_fromfile"]["load"]),
                    )
                )
            else:
                checks.append(
                    (
                        f"{label} async stall <= 2x memcpy",
                        2.0,
                        ratio(saves["arrayckpt_async"]["stall"], saves["memcpy"]["stall"]),
                    )
                )
                checks.append(
                    (
                        f"{label} mapped load <= 1.0x safetensors load_file",
                        1.0,
                        ratio(loads["arrayckpt_mmap"]["load"], loads["st_load_file"]["load"]),
                    )
                )
            checks.append(
                (
                    f"{label} async total <= 1.0x safetensors save_file + fsync",
                    1.0,
                    ratio(total, saves["st_save_file_fsync"]["total"]),
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nTargets")
    for name, limit, value in checks:
        verdict = "not measured" if value is None else "met" if value <= limit else "NOT met"
        shown = "n/a" if value is None else f"{value:.2f}x"
        print(f"  {name:60s} {shown:>7s}  {verdict}")


if __name__ == "__main__":
    main()
