"""Training time lost to a checkpoint: the stall plus the slowdown of the steps that run
while the write is in flight, for arrayckpt and DCP side by side.

    python bench/training_under_write.py           # 1 GiB state, 1 and 2 training threads
    python bench/training_under_write.py --quick   # 256 MiB

Each (engine, threads) pair runs in a fresh process: a CPU training loop (an MLP whose
steps take tens of milliseconds) first runs alone to measure its median step time, then
a checkpoint of the state is started and the loop keeps going until the write is durable.
Lost time = stall + sum over the steps during the write of (step time - median alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ["arrayckpt", "arrayckpt_background", "dcp_async", "dcp_async_stager"]


def child(engine: str, threads: int, nbytes: int, root: Path) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 512)
    n = nbytes // 64 // 4
    state = {f"w{i}": torch.rand(n) for i in range(64)}

    def step() -> float:
        t = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    if engine.startswith("arrayckpt"):
        import arrayckpt as ac

        ckpt = ac.AsyncCheckpointer()

        def start(target: Path) -> Any:
            return ckpt.save(target, state, background_staging=engine.endswith("background"))

        def done(future: Any) -> bool:
            return bool(future.done())
    else:
        warnings.filterwarnings("ignore")
        import torch.distributed.checkpoint as dcp

        stager = None
        if engine == "dcp_async_stager":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=False,
                    use_shared_memory=False,
                    use_async_staging=True,
                    use_non_blocking_copy=False,
                )
            )

        def start(target: Path) -> Any:
            if stager is None:
                return dcp.async_save(state, checkpoint_id=str(target))
            return dcp.async_save(state, checkpoint_id=str(target), async_stager=stager)

        def done(future: Any) -> bool:
            upload = getattr(future, "upload_completion", future)
            return bool(upload.done())

    for _ in range(10):  # warm up the loop, then the checkpoint path (its first save)
        step()
    first = start(root / "warmup")
    while not done(first):
        step()
    alone = statistics.median(step() for _ in range(30))
    t = time.perf_counter()
    future = start(root / "step_1")
    stall = time.perf_counter() - t
    during = []
    while not done(future):
        during.append(step())
    window = time.perf_counter() - t
    return {
        "alone_step": alone,
        "stall": stall,
        "window": window,
        "steps_during": len(during),
        "lost": stall + sum(max(0.0, s - alone) for s in during),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "THREADS", "NBYTES", "DIR"))
    args = parser.parse_args()
    if args.child:
        engine, threads, nbytes, root = args.child
        print(json.dumps(child(engine, int(threads), int(nbytes), Path(root))))
        return
    nbytes = (256 << 20) if args.quick else (1 << 30)
    repeats = 3
    results: dict[tuple[str, int], dict[str, float]] = {}
    for threads in (1, 2):
        for engine in ENGINES:
            runs = []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory(dir=ROOT) as d:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", engine, str(threads), str(nbytes), d],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                runs.append(json.loads(done.stdout.splitlines()[-1]))
            results[(engine, threads)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"\ntraining under a background write: {nbytes >> 20} MiB state, "
        f"medians of {repeats} processes"
    )
    print(f"{'engine':<22}{'threads':>8}{'step alone':>12}{'stall':>9}{'window':>9}{'lost':>9}")
    for (engine, threads), r in results.items():
        print(
            f"{engine:<22}{threads:>8}{r['alone_step'] * 1e3:>10.1f}ms{r['stall']:>8.3f}s"
            f"{r['window']:>8.2f}s{r['lost']:>8.3f}s"
        )
    print()
    for threads in (1, 2):
        dcp_lost = min(results[(e, threads)]["lost"] for e in ENGINES if e.startswith("dcp"))
        for engine in ("arrayckpt", "arrayckpt_background"):
            ratio = results[(engine, threads)]["lost"] / dcp_lost
            verdict = "pass" if ratio <= 0.5 else "FAIL"
            print(
                f"  {engine} lost / DCP's best, {threads} thread(s) <= 0.5"
                f"   {ratio:5.2f}x  {verdict}"
            )


if __name__ == "__main__":
    main()
