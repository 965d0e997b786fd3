"""Object-store benchmark: save and load of 1 GiB on a local SeaweedFS S3 server (started
here), side by side with plain transfers of the same bytes by obstore (arrayckpt's client)
and by s3fs, and with torch.distributed.checkpoint's fsspec writer and reader.

    python bench/storage.py [--gib 1] [--repeats 3] [--get-repeats 5] [--json out.json]

Cases run interleaved (one of each per round), so a busy machine slows all alike: the
puts for ``--repeats`` rounds, then the gets for ``--get-repeats`` rounds (each reading
one round's objects; gets are quick and vary more). The figures are medians. Prints a
table and the ratios against the 0.9x goals.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS launcher the tests use
sys.path.insert(0, str(ROOT))

import arrayckpt as ac  # noqa: E402
from arrayckpt.storage import objects, parse_url, transfer  # noqa: E402

GOAL = 0.9
KEY, SECRET, REGION = "arrayckpt-bench", "arrayckpt-bench-secret", "us-east-1"
TENSORS = 16  # a model's large layers: 16 float32 tensors of 1/16 of the size each


def _s3fs(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=KEY,
        secret=SECRET,
        endpoint_url=endpoint,
        client_kwargs={"region_name": REGION},
        max_concurrency=transfer.PARTS_IN_FLIGHT,
        skip_instance_cache=True,
    )


def _cases(server: Any, nbytes: int) -> tuple[dict[str, Callable[[int], Any]], list[str]]:
    """Each case saves or loads ``nbytes`` under a key of its own per round ``i``."""
    import obstore

    options = {
        "endpoint": server.endpoint,
        "access_key_id": KEY,
        "secret_access_key": SECRET,
        "region": REGION,
        "client_options": {"timeout": "600s"},
    }
    store = objects.open_store(parse_url(server.url("x")), options)
    blob = np.ones(nbytes, np.uint8)
    state = {f"layer{i}": np.ones(nbytes // TENSORS // 4, np.float32) for i in range(TENSORS)}
    url = server.url
    cases: dict[str, Callable[[int], Any]] = {}
    skipped: list[str] = []

    def plain_put(i: int) -> None:
        obstore.put(
            store,
            f"raw/{i}",
            iter([blob.data]),
            chunk_size=transfer.PART_BYTES,
            max_concurrency=transfer.PARTS_IN_FLIGHT,
        )

    def plain_get(i: int) -> list[Any]:
        def one(start: int) -> Any:
            end = min(start + transfer.RANGE_BYTES, nbytes)
            return obstore.get_range(store, f"raw/{i}", start=start, end=end)

        # every range kept until the end, as a load keeps every byte it read
        with ThreadPoolExecutor(transfer.RANGES_IN_FLIGHT) as pool:
            return list(pool.map(one, range(0, nbytes, transfer.RANGE_BYTES)))

    def plain_get_copy(i: int) -> np.ndarray:
        dest = np.empty(nbytes, np.uint8)

        def one(start: int) -> None:
            end = min(start + transfer.RANGE_BYTES, nbytes)
            dest[start:end] = np.frombuffer(
                obstore.get_range(store, f"raw/{i}", start=start, end=end), np.uint8
            )

        with ThreadPoolExecutor(transfer.RANGES_IN_FLIGHT) as pool:
            list(pool.map(one, range(0, nbytes, transfer.RANGE_BYTES)))
        return dest

    cases["put: plain obstore multipart"] = plain_put
    cases["put: arrayckpt save_checkpoint"] = lambda i: ac.save_checkpoint(
        url(f"ac/step_{i}"), state, storage_options=options
    )
    cases["get: plain obstore parallel ranged"] = plain_get
    # what any load into writable arrays adds: one copy into fresh memory
    cases["get: plain obstore ranged + copy into numpy"] = plain_get_copy
    cases["get: arrayckpt load_checkpoint"] = lambda i: ac.load_checkpoint(
        url(f"ac/step_{i}"), storage_options=options
    )
    if importlib.util.find_spec("s3fs") is None:
        skipped.append("s3fs and DCP's fsspec writer: s3fs is not installed")
        return cases, skipped
    fs = _s3fs(server.endpoint)
    bucket = server.bucket
    whole = blob.tobytes()  # s3fs takes bytes only
    cases["put: plain s3fs pipe_file"] = lambda i: fs.pipe_file(
        f"{bucket}/s3fs/{i}",
        whole,
        chunksize=transfer.PART_BYTES,
        max_concurrency=transfer.PARTS_IN_FLIGHT,
    )
    cases["get: plain s3fs cat_file"] = lambda i: fs.cat_file(
        f"{bucket}/s3fs/{i}", max_concurrency=transfer.RANGES_IN_FLIGHT
    )
    try:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    except ImportError as exc:
        skipped.append(f"DCP's fsspec writer: {exc}")
        return cases, skipped
    tstate = {k: torch.from_numpy(v) for k, v in state.items()}
    s3kw = {
        "key": KEY,
        "secret": SECRET,
        "endpoint_url": server.endpoint,
        "client_kwargs": {"region_name": REGION},
    }

    def dcp_save(i: int) -> None:
        writer = FsspecWriter(url(f"dcp/{i}"), thread_count=transfer.PARTS_IN_FLIGHT, **s3kw)
        dcp.save(tstate, storage_writer=writer, no_dist=True)

    def dcp_load(i: int) -> None:
        dest = {k: torch.empty_like(v) for k, v in tstate.items()}
        dcp.load(dest, storage_reader=FsspecReader(url(f"dcp/{i}"), **s3kw), no_dist=True)

    cases["put: DCP save, FsspecWriter (s3fs)"] = dcp_save
    cases["get: DCP load, FsspecReader (s3fs)"] = dcp_load
    return cases, skipped


def main() -> None:
    from s3server import start_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--get-repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30) // (4 * TENSORS) * (4 * TENSORS)
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp))
        try:
            cases, skipped = _cases(server, nbytes)
            puts = {n: run for n, run in cases.items() if n.startswith("put")}
            gets = {n: run for n, run in cases.items() if n.startswith("get")}
            for i in range(args.repeats):
                _round(puts, i, times, errors)
            for i in range(args.get_repeats):
                ready = {n: run for n, run in gets.items() if _ready(n, errors)}
                _round(ready, i % args.repeats, times, errors)
        finally:
            server.stop()
    gib = nbytes / 2**30
    rates = {name: gib / statistics.median(ts) for name, ts in times.items()}
    print(
        f"{gib:g} GiB; medians of {args.repeats} interleaved rounds of puts, "
        f"{args.get_repeats} of gets"
    )
    print("| what | median s | GiB/s | ratio |\n|---|---|---|---|")
    base = {"put": "put: plain obstore multipart", "get": "get: plain obstore parallel ranged"}
    checks = {}
    for name, ts in times.items():
        ref = base[name[:3]]
        ratio = rates[name] / rates[ref] if ref in rates else float("nan")
        mark = ""
        if name.startswith(("put: arrayckpt", "get: arrayckpt")):
            checks[name] = ratio >= GOAL
            mark = f" ({'pass' if checks[name] else 'FAIL'}: goal >= {GOAL}x)"
        print(f"| {name} | {statistics.median(ts):.3f} | {rates[name]:.3f} | {ratio:.2f}x{mark} |")
    for name, why in errors.items():
        print(f"| {name} | failed: {why} | | |")
    for why in skipped:
        print(f"not measured: {why}")
    if args.json:
        doc = {"GiB": gib, "times_s": times, "GiB/s": rates, "errors": errors, "goals": checks}
        args.json.write_text(json.dumps(doc, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


def _round(
    cases: dict[str, Callable[[int], Any]],
    i: int,
    times: dict[str, list[float]],
    errors: dict[str, str],
) -> None:
    for name, run in cases.items():
        if name in errors:
            continue
        started = time.perf_counter()
        try:
            run(i)
        except Exception as exc:  # a peer that fails here is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        times.setdefault(name, []).append(time.perf_counter() - started)


def _ready(get: str, errors: dict[str, str]) -> bool:
    """A get reads what its put wrote: not measured where that put failed."""
    put = {
        "get: plain obstore parallel ranged": "put: plain obstore multipart",
        "get: plain obstore ranged + copy into numpy": "put: plain obstore multipart",
        "get: arrayckpt load_checkpoint": "put: arrayckpt save_checkpoint",
        "get: plain s3fs cat_file": "put: plain s3fs pipe_file",
        "get: DCP load, FsspecReader (s3fs)": "put: DCP save, FsspecWriter (s3fs)",
    }[get]
    if put in errors:
        errors.setdefault(get, f"not measured: {put!r} failed")
        return False
    return True


if __name__ == "__main__":
    main()
