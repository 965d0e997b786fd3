"""The ``arrayckpt`` command line (also ``python -m arrayckpt``).

Exit status: 0 success, 1 a checkpoint is corrupt or an operation failed, 2 bad usage or
nothing to work on at the path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError, InvalidInputError
from .layout import MODEL_FILE, SHARDING_META_FILE
from .progress import Progress, human_bytes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))


def _table(rows: list[list[str]], header: list[str], right: frozenset[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    try:
        demo.run(args.dir, steps=args.steps)
    except AssertionError as exc:  # the resumed run diverged: a bug worth reporting
        print(f"arrayckpt: demo FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import describe

    doc = describe(args.path)
    if args.json:
        _print_json(doc)
    else:
        _print_description(doc)
    return EXIT_OK


def _print_description(doc: dict[str, Any], indent: str = "") -> None:
    print(f"{indent}{doc['path']} ({doc['kind']})")
    if "training_state" in doc:
        s = doc["training_state"]
        print(
            f"{indent}training state: step {s['step']}, epoch {s['epoch']}, "
            f"learning rate {s['learning_rate']:g}, version {s['version']}"
        )
        for k, v in s["metadata"].items():
            print(f"{indent}  {k} = {v}")
    if "sharding" in doc:
        _print_sharding(doc["sharding"], indent)
    for f in doc.get("files", []):
        extra = ", nested" if f["nested"] else ""
        extra += "" if f["checksums"] else ", no checksums"
        print(
            f"\n{indent}{Path(f['path']).name}: {_count(len(f['tensors']), 'tensor')}, "
            f"{human_bytes(f['nbytes'])}{extra}"
        )
        rows = [
            [
                t["name"],
                t["dtype"],
                "x".join(map(str, t["shape"])) or "scalar",
                human_bytes(t["nbytes"]),
            ]
            for t in f["tensors"]
        ]
        if rows:
            table = _table(rows, ["tensor", "dtype", "shape", "size"], right=frozenset({3}))
            print("\n".join(indent + "  " + line for line in table.splitlines()))
        if f["values"]:
            print(f"{indent}  other values:")
            for k, v in f["values"].items():
                print(f"{indent}    {k} = {v!r}")
    for rank in doc.get("ranks", []):
        print()
        _print_description(rank, indent + "  ")


def _print_sharding(meta: Any, indent: str) -> None:
    """One line per field, and per split tensor: a long split_dims map stays readable."""
    if not isinstance(meta, dict):
        print(f"{indent}sharding: {json.dumps(meta)}")
        return
    print(f"{indent}sharding:")
    for key, value in meta.items():
        if isinstance(value, dict) and value and key == "split_dims":
            print(f"{indent}  {key}:")
            for name, dim in value.items():
                print(f"{indent}    {name}: {json.dumps(dim)}")
        else:
            print(f"{indent}  {key}: {json.dumps(value)}")


def _verify(args: argparse.Namespace) -> int:
    from .inspection import total_tensor_bytes, verify

    with Progress("verify", total_tensor_bytes(args.path)) as bar:
        report = verify(args.path, bar.advance)
    if args.json:
        _print_json(report)
    else:
        for f in report["files"]:
            if f["errors"]:
                for err in f["errors"]:
                    print(f"CORRUPT  {err}")
            elif f["checksums"] is False:
                print(
                    f"ok       {f['path']}: {_count(f['tensors'], 'tensor')}, no checksums "
                    "recorded (another tool wrote it): header validated only"
                )
            elif f["checksums"]:
                print(
                    f"ok       {f['path']}: {_count(f['tensors'], 'tensor')}, "
                    f"{human_bytes(f['nbytes'])}, CRC32C verified"
                )
            else:
                print(f"ok       {f['path']}")
        files = report["files"]
        bad = sum(1 for f in files if f["errors"])
        print(
            f"verified: all good ({_count(len(files), 'file')})"
            if report["ok"]
            else f"verification FAILED: {bad} of {_count(len(files), 'file')} corrupt or unreadable"
        )
    return EXIT_OK if report["ok"] else EXIT_FAILED


def _ls_remote(location: str) -> list[dict[str, Any]]:
    """`_ls`'s entries for a root on an object store: each step prefix, committed or not,
    and for an uncommitted one whether its writer's lease is live."""
    from .manager import DEFAULT_LEASE_TTL_S
    from .storage.leases import read_lease
    from .storage.root import ObjectRoot
    from .storage.steps import CommitCache, list_steps

    root = ObjectRoot(location, None, DEFAULT_LEASE_TTL_S)
    commits = CommitCache()
    entries: list[dict[str, Any]] = []
    for step in list_steps(root.store, root.url):
        complete = step.has_commit and commits.complete(root.store, step)
        keys = step.lease_keys()
        holder = None if complete or not keys else read_lease(root.store, keys[-1])
        live = holder is not None and not holder.expired(DEFAULT_LEASE_TTL_S)
        modified = step.modified.astimezone() if step.modified else None
        entries.append(
            {
                "name": step.name,
                "path": str(step.url),
                "step": step.step,
                "status": "complete" if complete else "incomplete",
                "writer": None if complete else ("live" if live else "gone"),
                "nbytes": step.nbytes,
                "pid": (holder.doc or {}).get("pid") if holder else None,
                "modified": ""
                if modified is None
                else modified.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
    return entries


def _ls(args: argparse.Namespace) -> int:
    from . import storage
    from .layout import misnamed_step_dir, settled_scan, temporary_owner

    if storage.is_url(args.root):
        return _print_ls(args, args.root, _ls_remote(args.root))
    root = Path(storage.local_path(args.root))
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{root} is not a directory")
    if (root / MODEL_FILE).is_file() or (root / SHARDING_META_FILE).is_file():
        raise InvalidInputError(
            f"{root} is one checkpoint, not a CheckpointManager root: run "
            f"`arrayckpt inspect {root}`, or `arrayckpt ls {root.parent}` for its siblings"
        )
    entries: list[dict[str, Any]] = []
    for e in settled_scan(root):
        try:
            size = sum(f.stat().st_size for f in e.path.rglob("*") if f.is_file())
            modified = time.localtime(e.path.stat().st_mtime)
        except FileNotFoundError:  # deleted since the scan (retention, a finished save)
            continue
        entries.append(
            {
                "name": e.name,
                "path": str(e.path),
                "step": e.step,
                "status": e.status,
                "nbytes": size,
                "pid": temporary_owner(e.name),
                "modified": time.strftime("%Y-%m-%d %H:%M:%S", modified),
            }
        )
    for path in sorted(root.iterdir()):
        proper = misnamed_step_dir(path.name)
        if proper is not None and path.is_dir():  # the manager skips these: say so, not nothing
            entries.append(
                {
                    "name": path.name,
                    "path": str(path),
                    "step": None,
                    "status": f"ignored: not a step name (rename to {proper})",
                    "nbytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                    "pid": None,
                    "modified": time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)
                    ),
                }
            )
    return _print_ls(args, str(root), entries)


def _print_ls(args: argparse.Namespace, root: str, entries: list[dict[str, Any]]) -> int:
    if args.json:
        _print_json(entries)
        return EXIT_OK
    if not entries:
        print(f"{root}: no steps (a CheckpointManager root holds step_00000100/, ...)")
        return EXIT_OK
    rows = [
        [
            "-" if e["step"] is None else str(e["step"]),
            e["status"] + (f" (writer {e['writer']})" if e.get("writer") else ""),
            human_bytes(e["nbytes"]),
            e["modified"],
            e["name"],
        ]
        for e in entries
    ]
    print(_table(rows, ["step", "status", "size", "modified", "name"], right=frozenset({0, 2})))
    return EXIT_OK


def _consolidate(args: argparse.Namespace) -> int:
    import arrayckpt

    from .inspection import describe

    consolidate = getattr(arrayckpt, "consolidate_checkpoint", None)
    if consolidate is None:
        print(
            "arrayckpt: error: this installation has no distributed checkpoint support "
            "(arrayckpt.consolidate_checkpoint is missing)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with Progress(f"consolidate {args.src} -> {args.dst}") as bar:
        out = consolidate(args.src, args.dst, progress=bar.update)
    dst = Path(out) if isinstance(out, (str, Path)) else Path(args.dst)
    files = describe(dst)["files"]
    tensors = sum(len(f["tensors"]) for f in files)
    nbytes = sum(f["nbytes"] for f in files)
    if args.json:
        _print_json({"src": args.src, "dst": str(dst), "tensors": tensors, "nbytes": nbytes})
    else:
        print(
            f"consolidated {args.src} into {dst}: {_count(tensors, 'tensor')}, "
            f"{human_bytes(nbytes)} (`arrayckpt inspect {dst}` lists them)"
        )
    return EXIT_OK


def _export_hf(args: argparse.Namespace) -> int:
    from . import storage
    from .hf import export_hf

    if storage.is_url(args.ckpt):
        from .storage import objects

        with objects.local_copy(args.ckpt) as copy:
            out = export_hf(copy, args.out, max_shard_size=args.max_shard_size, config=args.config)
    else:
        out = export_hf(args.ckpt, args.out, max_shard_size=args.max_shard_size, config=args.config)
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {args.ckpt} to {out}: {', '.join(files)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrayckpt",
        description="Inspect, verify, list and consolidate arrayckpt checkpoints.",
        epilog="Exit status: 0 success; 1 corrupt checkpoint or failed operation; "
        "2 bad usage or nothing at the path.",
    )
    from . import __version__

    parser.add_argument("-V", "--version", action="version", version=f"arrayckpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    # Also after the command (`verify -v`); SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what is done"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=text)

    p = add("inspect", "tensors, dtypes, shapes, sizes and training state")
    p.add_argument("path", help="a checkpoint directory, sharded checkpoint or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_inspect)

    p = add("verify", "check every header and CRC32C; exit 1 if corrupt")
    p.add_argument("path", help="a checkpoint, sharded checkpoint, manager root or file")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_verify)

    p = add("ls", "the steps under a CheckpointManager root, complete or not")
    p.add_argument("root", help="the manager's root directory")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_ls)

    p = add("consolidate", "merge a sharded checkpoint into one checkpoint")
    p.add_argument("src", help="the sharded checkpoint (rank_*/ and sharding_meta.json)")
    p.add_argument("dst", help="where the consolidated checkpoint goes")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_consolidate)

    p = add("export-hf", "write the model as a Hugging Face directory from_pretrained loads")
    p.add_argument("ckpt", help="the checkpoint directory")
    p.add_argument("out", help="the new model directory (absent or empty)")
    from .hf import DEFAULT_MAX_SHARD_SIZE

    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest shard, e.g. 5GB, 500MB, 2GiB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    p.add_argument(
        "--config",
        help="config.json (or its directory) to copy beside the "
        "weights (default: the checkpoint's own, if any)",
    )
    p.set_defaults(run=_export_hf)

    p = add("demo", "train a small NumPy MLP, crash it, resume from a checkpoint")
    p.add_argument("--dir", help="where checkpoints go (default: a new temporary directory)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except BrokenPipeError:  # e.g. `arrayckpt inspect --json ... | head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (CheckpointNotFoundError, InvalidInputError) as exc:
        print(f"arrayckpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:
        print(f"arrayckpt: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
