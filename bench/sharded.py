"""arrayckpt and torch.distributed.checkpoint (DCP) side by side on the same FSDP2 state.

    python bench/sharded.py             # MLP 6 x 2048^2 + AdamW (~288 MiB), 7 repeats
    python bench/sharded.py --quick     # 4 x 1024^2 (~48 MiB), 3 repeats: a smoke run
    python bench/sharded.py --warm      # loads from the page cache instead of cold files

A real FSDP2 (``fully_shard``) MLP and its AdamW state are saved on 2 gloo ranks
(127.0.0.1) by both engines, synchronously and asynchronously, and loaded at world size 2,
3 and 4 into FSDP2 targets, and in one process without a process group as whole tensors:
into the same plain tensors for both, and allocated by the load (arrayckpt without
targets; DCP, which needs targets, into tensors allocated inside the timed region). Per
load and rank it records the seconds, the tensor bytes arrayckpt's `ReadStats` counts,
and two engine-independent counters of /proc/self/io: ``rchar`` (bytes the process's
read calls returned: data, headers, metadata and coordination sockets alike) and
``read_bytes`` (bytes fetched from the block device; with cold files, the default, every
checkpoint file is dropped from the page cache before each load). The ideal is the
target's own bytes: its local shards, whole tensors at world size 1.

Each world size runs in fresh processes with hard timeouts. Prints a table with ratios
(of the medians, which decide "no slower than DCP"; and paired: the median of each
repeat's ratio) and pass/fail columns ("no slower than DCP", "reads no unneeded byte":
arrayckpt read exactly the target's tensor bytes, and nothing else beyond the
checkpoint's headers and JSON); writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import shutil
import signal
import socket
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
#: A rank still running after this is killed (its faulthandler dumps its stack first).
RANK_LIMIT_S = 600
#: (world size, how): into the target's tensors, or (one process) allocating whole tensors.
LOADS = ((2, "load"), (1, "load"), (1, "alloc"), (3, "load"), (4, "load"))
#: "reads no unneeded byte": rchar may exceed the ideal by the checkpoint's non-tensor bytes
#: (headers, JSON) and this much more (the reads of /proc/self/io themselves).
SLACK_BYTES = 4096


# --------------------------------------------------------------------------- worker side


def _io() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"rchar": int(fields["rchar"]), "read_bytes": int(fields["read_bytes"])}


def _drop_cache(*roots: Path) -> None:
    """Drop every file under ``roots`` from the page cache (clean pages; no root needed)."""
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _build(args: argparse.Namespace, sharded: bool) -> tuple[Any, Any]:
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers: list[Any] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    if sharded:
        for m in [*model[::2], model]:
            fully_shard(m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _train_step(model: Any, opt: Any, seed: int) -> None:
    """One AdamW step with seeded gradients: every moment holds data worth checking."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = torch.randn(_local(p).shape, generator=gen)
        p.grad = _like(p, g) if hasattr(p, "to_local") else g
    opt.step()
    opt.zero_grad()


def _like(dtensor: Any, local: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        dtensor.device_mesh,
        dtensor.placements,
        run_check=False,
        shape=dtensor.shape,  # FSDP2 splits unevenly: the global shape is not local x world
        stride=dtensor.stride(),
    )


def _state(model: Any, opt: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree] if hasattr(tree, "shape") else []


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(*trees: Any) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for tr in trees for t in _leaves(tr))


def _empty_like(tree: Any) -> Any:
    """``tree`` with every tensor replaced by a new, uninitialised one like it."""
    import torch

    if isinstance(tree, dict):
        return {k: _empty_like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_empty_like(v) for v in tree]
    return torch.empty_like(tree) if isinstance(tree, torch.Tensor) else tree


def _zero(*trees: Any) -> None:
    import torch

    with torch.no_grad():
        for tr in trees:
            for t in _leaves(tr):
                _local(t).zero_()


def _flat(*trees: Any) -> dict[str, Any]:
    """Copies of the local tensors of ``trees``, by their path of keys."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}", x)
        elif isinstance(v, (list, tuple)):
            for k, x in enumerate(v):
                walk(f"{prefix}/{k}", x)
        elif hasattr(v, "shape"):
            out[prefix] = _local(v).clone()

    for i, tree in enumerate(trees):
        walk(str(i), tree)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder:
    """Per-rank samples of one run, written as JSON for the launcher."""

    def __init__(self) -> None:
        self.samples: dict[str, list[dict[str, float]]] = {}
        self.facts: dict[str, Any] = {}

    def add(self, key: str, sample: dict[str, float]) -> None:
        self.samples.setdefault(key, []).append(sample)


def _timed_load(
    rec: Recorder,
    key: str,
    load: Any,
    roots: tuple[Path, ...],
    cold: bool,
    barrier: Any,
) -> Any:
    import arrayckpt as ac

    if cold:
        _drop_cache(*roots)
    barrier()
    stats = ac.ReadStats()
    before, t = _io(), time.perf_counter()
    trees = load(stats)
    elapsed = time.perf_counter() - t
    after = _io()
    barrier()
    rec.add(
        key,
        {
            "s": elapsed,
            "rchar": after["rchar"] - before["rchar"],
            "read_bytes": after["read_bytes"] - before["read_bytes"],
            "readstats": stats.bytes_read,
        },
    )
    return trees


def _saves(
    args: argparse.Namespace,
    rec: Recorder,
    rank: int,
    world: int,
    msd: dict[str, Any],
    osd: dict[str, Any],
    barrier: Any,
) -> None:
    """Both engines save the same state dicts, in turn; the last sync saves are kept."""
    import torch.distributed.checkpoint as dcp

    import arrayckpt as ac

    root = Path(args.dir)
    kinds = ("save", "async") if args.async_saves else ("save",)
    with ac.AsyncCheckpointer() as ckpt:
        for kind in kinds:
            for i in range(args.repeats + 1):  # the first of each is a warm-up
                for engine in ("arrayckpt", "dcp"):
                    target = root / f"{engine}-{kind}-{i}"
                    barrier()
                    t = time.perf_counter()
                    if kind == "save" and engine == "arrayckpt":
                        ac.save_distributed_checkpoint(
                            target, rank, world, msd, osd, ac.TrainingState(1)
                        )
                    elif kind == "save":
                        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(target))
                    else:
                        fut = (
                            ckpt.save_distributed(
                                target, rank, world, msd, osd, ac.TrainingState(1)
                            )
                            if engine == "arrayckpt"
                            else dcp.async_save(
                                {"model": msd, "optim": osd}, checkpoint_id=str(target)
                            )
                        )
                        stall = time.perf_counter() - t
                        fut.result()
                    elapsed = time.perf_counter() - t
                    barrier()
                    if i:
                        sample = {"s": elapsed}
                        if kind == "async":
                            sample["stall"] = stall
                        rec.add(f"{kind}/{engine}", sample)
                    if rank == 0 and not (kind == "save" and i == args.repeats):
                        shutil.rmtree(target)
    if rank == 0:
        for engine in ("arrayckpt", "dcp"):
            (root / f"{engine}-save-{args.repeats}").rename(root / engine)
    barrier()


def worker(args: argparse.Namespace) -> None:
    faulthandler.dump_traceback_later(RANK_LIMIT_S - 30, exit=True)
    warnings.filterwarnings("ignore")  # DCP warns about running without a process group
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import arrayckpt as ac

    torch.set_num_threads(1)
    rec = Recorder()
    world = args.world
    root = Path(args.dir)
    ac_dir, dcp_dir = root / "arrayckpt", root / "dcp"
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        rank = dist.get_rank()
        barrier = dist.barrier
    else:
        rank, barrier = 0, lambda: None
    model, opt = _build(args, sharded=world > 1)
    _train_step(model, opt, seed=1 + rank)
    msd, osd = _state(model, opt)
    rec.facts["state_bytes_local"] = _nbytes(msd, osd)
    original = _flat(msd, osd) if args.phase == "save" else None
    if args.phase == "save":
        _saves(args, rec, rank, world, msd, osd, barrier)
    # Loads: into this world's targets (DTensors on 2..4 ranks, plain tensors on one).
    rec.facts["ideal"] = _nbytes(msd, osd)

    def ac_load(stats: Any) -> tuple[Any, ...]:
        ac.load_distributed_checkpoint(
            ac_dir, rank, world_size=world, into=msd, optimizer_into=osd, stats=stats
        )
        return msd, osd

    def dcp_load(stats: Any) -> tuple[Any, ...]:
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(dcp_dir))
        return msd, osd

    def ac_alloc(stats: Any) -> tuple[Any, ...]:  # no targets: the load allocates
        got = ac.load_distributed_checkpoint(ac_dir, 0, world_size=1, xp="torch", stats=stats)
        return got.model, got.optimizer

    def dcp_alloc(stats: Any) -> tuple[Any, ...]:  # DCP needs targets: allocated here
        trees = _empty_like(msd), _empty_like(osd)
        dcp.load({"model": trees[0], "optim": trees[1]}, checkpoint_id=str(dcp_dir))
        return trees

    # Into this world's targets (DTensors on 2..4 ranks, plain tensors on one); on one
    # process also with the load allocating the whole tensors.
    pairs = [("load", ac_load, dcp_load)]
    if world == 1:
        pairs.append(("alloc", ac_alloc, dcp_alloc))
    agree = []
    for i in range(args.repeats + 1):  # the first is a warm-up (imports, first touches)
        for kind, *loads in pairs:
            got = []
            for engine, load in zip(("arrayckpt", "dcp"), loads, strict=True):
                _zero(msd, osd)
                key = f"{kind}/{engine}"
                if i == 0:
                    trees = load(ac.ReadStats())
                    barrier()
                else:
                    trees = _timed_load(rec, key, load, (ac_dir, dcp_dir), args.cold, barrier)
                got.append(_flat(*trees))
            agree.append(_same(*got))
            if original is not None:
                agree.append(_same(got[1], original))
    rec.facts["loads_agree"] = all(agree)
    out = Path(args.out) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "samples": rec.samples, "facts": rec.facts}))
    if world > 1:
        dist.destroy_process_group()
    os._exit(0)  # gloo threads freeing tensors at interpreter exit can abort


# --------------------------------------------------------------------------- launcher side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(phase: str, world: int, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    out = tmp / f"out-{phase}-{world}"
    out.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        phase,
        "--world",
        str(world),
        "--dir",
        str(tmp / "ckpt"),
        "--out",
        str(out),
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--repeats",
        str(args.repeats),
    ]
    cmd += ["--warm"] if not args.cold else []
    cmd += ["--no-async"] if not args.async_saves else []
    procs, logs = [], []
    for r in range(world):
        log = out / f"log{r}.txt"
        logs.append(log)
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**env, "RANK": str(r)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + RANK_LIMIT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # each rank leads its own session
                p.wait()
    found = [out / f"rank{r}.json" for r in range(world)]
    if not all(f.exists() for f in found):
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
        raise SystemExit(f"{phase} on {world} ranks failed:\n{tails}")
    return [json.loads(f.read_text()) for f in found]


def checkpoint_bytes(root: Path) -> dict[str, int]:
    """Each checkpoint's size, and for arrayckpt's the bytes that are not tensor data."""
    from arrayckpt import format

    out: dict[str, int] = {}
    for engine in ("arrayckpt", "dcp"):
        files = [p for p in (root / engine).rglob("*") if p.is_file()]
        out[f"{engine}_total"] = sum(p.stat().st_size for p in files)
    out["arrayckpt_non_tensor"] = sum(
        format.read_header(p).data_start if p.suffix == ".safetensors" else p.stat().st_size
        for p in (root / "arrayckpt").rglob("*")
        if p.is_file()
    )
    return out


def _slowest(ranks: list[dict[str, Any]], key: str, field: str) -> list[float]:
    """Per repeat, the slowest rank's figure: a save or load is done when every rank is."""
    per_repeat = zip(*[[s[field] for s in r["samples"][key]] for r in ranks], strict=True)
    return [max(values) for values in per_repeat]


def _median_over_repeats(ranks: list[dict[str, Any]], key: str, field: str) -> float:
    return statistics.median(_slowest(ranks, key, field))


def _paired_ratio(ranks: list[dict[str, Any]], kind: str) -> float:
    """The median of arrayckpt / DCP within each repeat: the two ran back to back, so a
    shared machine's load, which drifts over minutes, weighs on both alike."""
    ours, theirs = _slowest(ranks, f"{kind}/arrayckpt", "s"), _slowest(ranks, f"{kind}/dcp", "s")
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def _per_rank(ranks: list[dict[str, Any]], key: str, field: str) -> list[float]:
    return [statistics.median(s[field] for s in r["samples"][key]) for r in ranks]


def summarize(
    results: dict[int, list[dict[str, Any]]], sizes: dict[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    saves = results[2]
    for kind in ("save", "async") if args.async_saves else ("save",):
        ours = _median_over_repeats(saves, f"{kind}/arrayckpt", "s")
        theirs = _median_over_repeats(saves, f"{kind}/dcp", "s")
        row = {"what": f"{kind} on 2 ranks", "arrayckpt_s": ours, "dcp_s": theirs}
        row["paired"] = _paired_ratio(saves, kind)
        if kind == "async":
            row["arrayckpt_stall_s"] = _median_over_repeats(saves, "async/arrayckpt", "stall")
            row["dcp_stall_s"] = _median_over_repeats(saves, "async/dcp", "stall")
        rows.append(row)
    for world, kind in LOADS:
        ranks = results[world]
        row = {
            "what": f"load on {world} rank{'s' if world > 1 else ''}"
            + (", allocating" if kind == "alloc" else ""),
            "arrayckpt_s": _median_over_repeats(ranks, f"{kind}/arrayckpt", "s"),
            "dcp_s": _median_over_repeats(ranks, f"{kind}/dcp", "s"),
            "paired": _paired_ratio(ranks, kind),
            "ideal": [r["facts"]["ideal"] for r in ranks],
            "agree": all(r["facts"]["loads_agree"] for r in ranks),
        }
        for engine in ("arrayckpt", "dcp"):
            for field in ("rchar", "read_bytes", "readstats"):
                row[f"{engine}_{field}"] = _per_rank(ranks, f"{kind}/{engine}", field)
        rows.append(row)
    for row in rows:
        row["ratio"] = row["arrayckpt_s"] / row["dcp_s"]
        row["no_slower"] = row["ratio"] <= 1.0
        if "ideal" in row:
            exact = row["arrayckpt_readstats"] == row["ideal"]
            bound = sizes["arrayckpt_non_tensor"] + SLACK_BYTES
            lean = all(
                c - i <= bound for c, i in zip(row["arrayckpt_rchar"], row["ideal"], strict=True)
            )
            row["no_unneeded_byte"] = exact and lean
    return {"rows": rows, "sizes": sizes}


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def report(summary: dict[str, Any], header: str) -> list[str]:
    lines = [header, ""]
    lines.append(
        f"{'':28s} {'arrayckpt s':>11s} {'DCP s':>8s} {'ratio':>6s} {'paired':>6s}  no slower  "
        "no unneeded byte  agree"
    )
    for row in summary["rows"]:
        lean = row.get("no_unneeded_byte")
        lines.append(
            f"{row['what']:28s} {row['arrayckpt_s']:11.3f} {row['dcp_s']:8.3f} "
            f"{row['ratio']:6.2f} {row['paired']:6.2f}  "
            f"{'pass' if row['no_slower'] else 'FAIL':9s}  "
            f"{'' if lean is None else 'pass' if lean else 'FAIL':16s}  "
            f"{'' if 'agree' not in row else 'yes' if row['agree'] else 'NO'}"
        )
        if "arrayckpt_stall_s" in row:
            lines.append(
                f"{'  stall':28s} {row['arrayckpt_stall_s']:11.3f} {row['dcp_stall_s']:8.3f} "
                f"{row['arrayckpt_stall_s'] / row['dcp_stall_s']:6.2f}"
            )
    sizes = summary["sizes"]
    lines += [
        "",
        f"checkpoints: arrayckpt {_mib(sizes['arrayckpt_total'])} MiB "
        f"({sizes['arrayckpt_non_tensor'] / 2**10:.0f} KiB of it headers and JSON), "
        f"DCP {_mib(sizes['dcp_total'])} MiB",
        "bytes read per rank, MiB (median over repeats): ideal = the target's own bytes; "
        "disk = read_bytes (ranks share the page cache: compare sums)",
    ]
    lines.append(
        f"{'':28s} {'rank':>4s} {'ideal':>8s} {'ac ReadStats':>12s} {'ac rchar':>9s} "
        f"{'DCP rchar':>9s} {'ac disk':>8s} {'DCP disk':>8s}"
    )
    for row in summary["rows"]:
        if "ideal" not in row:
            continue
        for r, ideal in enumerate(row["ideal"]):
            lines.append(
                f"{row['what'] if r == 0 else '':28s} {r:4d} {_mib(ideal):>8s} "
                f"{_mib(row['arrayckpt_readstats'][r]):>12s} {_mib(row['arrayckpt_rchar'][r]):>9s} "
                f"{_mib(row['dcp_rchar'][r]):>9s} {_mib(row['arrayckpt_read_bytes'][r]):>8s} "
                f"{_mib(row['dcp_read_bytes'][r]):>8s}"
            )
        if len(row["ideal"]) > 1:
            lines.append(
                f"{'':28s} {'sum':>4s} {_mib(sum(row['ideal'])):>8s} "
                + " ".join(
                    f"{_mib(sum(row[k])):>{w}s}"
                    for k, w in (
                        ("arrayckpt_readstats", 12),
                        ("arrayckpt_rchar", 9),
                        ("dcp_rchar", 9),
                        ("arrayckpt_read_bytes", 8),
                        ("dcp_read_bytes", 8),
                    )
                )
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 x 1024^2 MLP, 3 repeats")
    ap.add_argument("--hidden", type=int, help="MLP width (default 2048; quick 1024)")
    ap.add_argument("--layers", type=int, help="Linear layers (default 6; quick 4)")
    ap.add_argument("--repeats", type=int, help="timed repeats (default 7; quick 3)")
    ap.add_argument("--warm", dest="cold", action="store_false", help="loads from page cache")
    ap.add_argument("--no-async", dest="async_saves", action="store_false", help="skip async")
    ap.add_argument("--tmp", type=Path, help="where checkpoints go (default: $TMPDIR)")
    ap.add_argument("--worker", choices=["save", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.hidden = args.hidden or (1024 if args.quick else 2048)
    args.layers = args.layers or (4 if args.quick else 6)
    # 7: this virtual disk's fsync latency is bimodal, medians of 5 flip between modes.
    args.repeats = args.repeats or (3 if args.quick else 7)
    if args.worker:
        args.phase = args.worker
        worker(args)
        return
    load_before = os.getloadavg()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="arrayckpt-sharded-", dir=args.tmp))
    results: dict[int, list[dict[str, Any]]] = {}
    try:
        results[2] = launch("save", 2, args, tmp)
        sizes = checkpoint_bytes(tmp / "ckpt")
        print("  saved and loaded on 2 ranks", file=sys.stderr)
        for world in (1, 3, 4):
            results[world] = launch("load", world, args, tmp)
            print(f"  loaded on {world} rank(s)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(results, sizes, args)
    state = sum(r["facts"]["state_bytes_local"] for r in results[2])
    header = (
        f"FSDP2 MLP {args.layers} x {args.hidden}^2 + AdamW, {state / 2**20:.0f} MiB of state, "
        f"saved on 2 gloo ranks; {os.cpu_count()} CPUs; median of {args.repeats}; "
        f"{'cold' if args.cold else 'warm'} page cache for loads; load average "
        f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    lines = report(summary, header)
    print("\n".join(lines))
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = (
        out_dir
        / f"sharded-{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.write_text(
        json.dumps(
            {
                "args": {
                    k: v
                    for k, v in vars(args).items()
                    if k in ("hidden", "layers", "repeats", "cold")
                },
                "load_average": [load_before, os.getloadavg()],
                "summary": summary,
                "raw": {str(w): r for w, r in results.items()},
                "report": lines,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    failed = [r["what"] for r in summary["rows"] if not r.get("agree", True)]
    if failed:
        raise SystemExit(f"the two engines loaded different values: {failed}")


if __name__ == "__main__":
    main()
