"""Object-store benchmark: save and load of 1 GiB to a local SeaweedFS S3 server, beside a
plain multipart upload and a plain parallel download of the same bytes by obstore.

    python bench/storage.py [--gib 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import arrayckpt as ac
from arrayckpt.storage import objects, parse_url


def _best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    import obstore
    from s3server import start_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp))
        try:
            opts = {
                "endpoint": server.endpoint,
                "access_key_id": "k",
                "secret_access_key": "s",
                "region": "us-east-1",
                "client_options": {"timeout": "300s"},
            }
            store = objects.open_store(parse_url(server.url("x")), opts)
            # 16 tensors of 64 MiB, as a model's large layers
            state = {f"layer{i}": np.ones(nbytes // 16 // 4, np.float32) for i in range(16)}
            blob = np.ones(nbytes, np.uint8)
            raw_put = _best(
                lambda i: obstore.put(
                    store,
                    f"raw/{i}",
                    iter([blob.data]),
                    chunk_size=objects.PART_BYTES,
                    max_concurrency=objects.PARTS_IN_FLIGHT,
                ),
                args.repeats,
            )
            save = _best(
                lambda i: ac.save_checkpoint(
                    server.url(f"run/step_{i}"), state, storage_options=opts
                ),
                args.repeats,
            )

            def raw_get(i: int) -> None:
                starts = range(0, nbytes, objects.RANGE_BYTES)
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(objects.RANGES_IN_FLIGHT) as pool:
                    list(
                        pool.map(
                            lambda s: obstore.get_range(
                                store, f"raw/{i}", start=s, end=min(s + objects.RANGE_BYTES, nbytes)
                            ),
                            starts,
                        )
                    )

            get = _best(raw_get, args.repeats)
            load = _best(
                lambda i: ac.load_checkpoint(server.url(f"run/step_{i}"), storage_options=opts),
                args.repeats,
            )
        finally:
            server.stop()
    gib = nbytes / 2**30
    result = {
        "GiB": gib,
        "plain multipart put GiB/s": gib / raw_put,
        "save_checkpoint GiB/s": gib / save,
        "save / plain put": raw_put / save,
        "plain parallel ranged get GiB/s": gib / get,
        "load_checkpoint GiB/s": gib / load,
        "load / plain get": get / load,
    }
    print(json.dumps({k: round(v, 3) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
