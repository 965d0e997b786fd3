"""Experiment: which way of writing a snapshot is fastest on this machine.

Variants of `arrayckpt.save.write_files`, run round-robin (so drifts of the virtual
disk hit them alike), median of the rounds:

- ``crc_first``: CRC32C of every tensor, then safetensors' serializer, then fsync; files
  one after the other (what arrayckpt did first);
- ``crc_threads``: the CRC32Cs split across threads, then safetensors' serializer (what
  arrayckpt did before its own streaming writer);
- ``two_files``: arrayckpt's streaming writer (`format.write_file`: placeholder CRCs in
  the header, each chunk checksummed as it is written, CRCs patched in last), model and
  optimizer files written by two threads at once;
- ``library``: `arrayckpt.save.write_files` as it is now (``two_files``).

Run: ``python bench/writer_variants.py [--runs 7] [--mib 512]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arrayckpt import format as fmt
from arrayckpt.save import write_files
from arrayckpt.snapshot import take_snapshot
from arrayckpt.staging import StagingPool

POOL = ThreadPoolExecutor(os.cpu_count() or 2)


def crc_all(tensors, threads: bool) -> dict[str, int]:
    if not threads:
        return {n: fmt.checksum(t.bytes()) for n, t in tensors.items()}
    return dict(
        zip(tensors, POOL.map(lambda t: fmt.checksum(t.bytes()), tensors.values()), strict=True)
    )


def write_with(path: Path, tensors, crcs_fn) -> None:
    import safetensors

    crcs = crcs_fn()
    meta = {
        fmt.FORMAT_KEY: fmt.FORMAT_VERSION,
        fmt.CHECKSUMS_KEY: json.dumps(
            {n: f"{c:08x}" for n, c in crcs.items()}, separators=(",", ":")
        ),
    }
    specs = {
        n: safetensors.TensorSpec(
            dtype=t.dtype.name, shape=list(t.shape), data_ptr=t.data.ctypes.data, data_len=t.nbytes
        )
        for n, t in tensors.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=meta)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def variant(name: str, d: Path, snap) -> None:
    parts = [("model.safetensors", snap.model), ("optimizer.safetensors", snap.optimizer)]
    parts = [(f, t) for f, t in parts if t]
    if name == "library":
        write_files(d, snap)  # whatever arrayckpt does now
        return
    if name == "crc_first":
        for f, t in parts:
            write_with(d / f, t, lambda t=t: crc_all(t, False))
    elif name == "crc_threads":
        for f, t in parts:
            write_with(d / f, t, lambda t=t: crc_all(t, True))
    elif name == "two_files":
        list(POOL.map(lambda p: fmt.write_file(d / p[0], p[1]), parts))
    (d / "training_state.json").write_text(snap.training_state.to_json())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--variants", default="crc_first,crc_threads,two_files")
    args = ap.parse_args()
    n = args.mib << 20
    # A W3-like split: a quarter model, three quarters optimizer moments, 16 MiB-ish tensors.
    model = {f"m{i}": np.full(n // 4 // 8 // 4, i, np.float32) for i in range(8)}
    optim = {f"o{i}": np.full(n * 3 // 4 // 24 // 4, i, np.float32) for i in range(24)}
    snap = take_snapshot(model, optim, None, staging=StagingPool())
    root = Path(tempfile.mkdtemp(prefix="arrayckpt-variants-", dir=os.environ.get("BENCH_DIR")))
    names = args.variants.split(",")
    times: dict[str, list[float]] = {v: [] for v in names}
    try:
        for r in range(args.runs + 1):
            for v in names:
                d = root / f"{v}-{r}"
                d.mkdir()
                t = time.perf_counter()
                variant(v, d, snap)
                if r:  # round 0 warms up
                    times[v].append(time.perf_counter() - t)
                shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for v in names:
        print(
            f"{v:12s} median {statistics.median(times[v]):.3f} s  min {min(times[v]):.3f} s  "
            f"runs {[round(x, 3) for x in times[v]]}"
        )


if __name__ == "__main__":
    main()
