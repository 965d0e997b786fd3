"""Power-loss simulation: the directory trees a power cut could leave, from an operation log.

The model is the one POSIX promises and no more:

- a file's data survives only if the file was fsynced after it was written; otherwise
  the file may come back empty, cut short, or whole;
- a directory entry change (create, rename, exchange, remove) survives only if its
  directory was fsynced afterwards; otherwise it may or may not have happened, each
  independently of the others (a harsher model than any journal's in-order commit).

`crash_states` replays a `RecordingFS(keep_data=True)` log on an inode model and
enumerates, for every crash point, every combination of those outcomes, deduplicated
by the tree they produce.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    from . import faults
except ImportError:
    import faults


@dataclass
class Node:
    children: dict[str, int] | None = None  # a directory
    content: bytes = b""  # a file


@dataclass(frozen=True)
class Action:
    kind: str  # link, move, swap, unlink, sync_file, sync_dir, mark
    args: tuple = ()
    dirs: tuple[int, ...] = ()  # directories whose entries this action changes


@dataclass
class Log:
    """A recorded run translated to inode actions, ready to be cut at any point."""

    initial: dict[int, Node]
    root: int
    actions: list[Action] = field(default_factory=list)
    created: dict[int, Node] = field(default_factory=dict)  # what each link made, as made


def _snapshot(path: Path, nodes: dict[int, Node]) -> int:
    ino = len(nodes)
    if path.is_dir():
        nodes[ino] = Node(children={})
        for child in sorted(path.iterdir()):
            nodes[ino].children[child.name] = _snapshot(child, nodes)  # type: ignore[index]
    else:
        nodes[ino] = Node(content=path.read_bytes())
    return ino


def begin(root: Path) -> Log:
    """Capture ``root`` before the recorded run; all of it counts as durable."""
    nodes: dict[int, Node] = {}
    top = _snapshot(root, nodes)
    return Log(nodes, top)


def translate(log: Log, root: Path, ops: list[faults.Op]) -> Log:
    """Append ``ops`` (run under ``root``, whose earlier state ``log`` holds) as actions."""
    assert not log.actions, "translate one run per log"
    nodes = {i: _copy(n) for i, n in log.initial.items()}
    top = log.root

    def lookup(path: Path) -> tuple[int, str]:
        parts = path.relative_to(root).parts
        d = top
        for name in parts[:-1]:
            d = nodes[d].children[name]  # type: ignore[index]
        return d, parts[-1]

    def ino_of(path: Path) -> int:
        if path == root:
            return top
        d, name = lookup(path)
        return nodes[d].children[name]  # type: ignore[index]

    def new(node: Node) -> int:
        ino = max(nodes) + 1
        nodes[ino] = _copy(node)
        log.created[ino] = _copy(node)
        return ino

    for op in ops:
        if op.kind == "mark":
            log.actions.append(Action("mark", (op.marker,)))
            continue
        # reads change nothing
        if op.kind in ("read_bytes", "size", "read_ranges", "open_regular", "read_into"):
            continue
        if op.kind == "makedirs":
            missing = [
                p
                for p in [op.paths[0], *op.paths[0].parents]
                if root in p.parents and not _exists(nodes, top, root, p)
            ]
            for p in reversed(missing):
                d, name = lookup(p)
                ino = new(Node(children={}))
                action = Action("link", (d, name, ino), (d,))
                _apply(nodes, action)
                log.actions.append(action)
            continue
        if op.kind in ("mkdir", *faults.WRITES):
            d, name = lookup(op.paths[0])
            node = Node(children={}) if op.kind == "mkdir" else Node(content=op.data or b"")
            assert op.kind == "mkdir" or op.data is not None, "record with keep_data=True"
            action = Action("link", (d, name, new(node)), (d,))
        elif op.kind == "fsync_file":
            action = Action("sync_file", (ino_of(op.paths[0]),))
        elif op.kind == "fsync_dir":
            action = Action("sync_dir", (ino_of(op.paths[0]),))
        elif op.kind in ("rename", "exchange"):
            (sd, sn), (dd, dn) = lookup(op.paths[0]), lookup(op.paths[1])
            action = Action(
                "move" if op.kind == "rename" else "swap", (sd, sn, dd, dn), tuple(sorted({sd, dd}))
            )
        elif op.kind in ("remove_tree", "remove_file"):
            d, name = lookup(op.paths[0])
            action = Action("unlink", (d, name), (d,))
        else:
            raise AssertionError(f"unknown op {op}")
        _apply(nodes, action)
        log.actions.append(action)
    return log


def _copy(node: Node) -> Node:
    return Node(None if node.children is None else dict(node.children), node.content)


def _exists(nodes: dict[int, Node], top: int, root: Path, path: Path) -> bool:
    d = top
    for name in path.relative_to(root).parts:
        children = nodes[d].children
        if children is None or name not in children:
            return False
        d = children[name]
    return True


def _apply(nodes: dict[int, Node], a: Action) -> bool:
    """Apply one entry change if the tree allows it; False when it could not happen."""
    if a.kind == "link":
        d, name, ino = a.args
        if name in nodes[d].children:  # type: ignore[operator]
            return False
        nodes[d].children[name] = ino  # type: ignore[index]
    elif a.kind == "move":
        sd, sn, dd, dn = a.args
        src = nodes[sd].children.get(sn)  # type: ignore[union-attr]
        if src is None:
            return False
        dst = nodes[dd].children.get(dn)  # type: ignore[union-attr]
        if dst is not None:
            src_dir, dst_node = nodes[src].children is not None, nodes[dst]
            if src_dir != (dst_node.children is not None) or (src_dir and dst_node.children):
                return False  # rename(2): EISDIR / ENOTDIR / ENOTEMPTY
        del nodes[sd].children[sn]  # type: ignore[union-attr]
        nodes[dd].children[dn] = src  # type: ignore[index]
    elif a.kind == "swap":
        sd, sn, dd, dn = a.args
        if sn not in nodes[sd].children or dn not in nodes[dd].children:  # type: ignore[operator]
            return False
        s, d = nodes[sd].children, nodes[dd].children
        s[sn], d[dn] = d[dn], s[sn]  # type: ignore[index]
    elif a.kind == "unlink":
        d, name = a.args
        if name not in nodes[d].children:  # type: ignore[operator]
            return False
        del nodes[d].children[name]  # type: ignore[union-attr]
    return True


@dataclass(frozen=True)
class CrashState:
    """One tree a power cut at action ``at`` could leave; ``last_marks`` tell what had
    returned to the caller by then."""

    at: int
    marks: tuple[object, ...]
    tree: tuple[tuple[str, bytes | None], ...]  # (relative path, content or None for a dir)

    def materialize(self, where: Path) -> Path:
        where.mkdir(parents=True)
        for rel, content in self.tree:
            if content is None:
                (where / rel).mkdir()
            else:
                (where / rel).write_bytes(content)
        return where


def _tree(nodes: dict[int, Node], top: int, contents: dict[int, bytes]) -> tuple:
    out: list[tuple[str, bytes | None]] = []

    def walk(ino: int, prefix: str) -> None:
        for name, child in sorted(nodes[ino].children.items()):  # type: ignore[union-attr]
            rel = f"{prefix}{name}"
            if nodes[child].children is not None:
                out.append((rel, None))
                walk(child, rel + "/")
            else:
                out.append((rel, contents.get(child, nodes[child].content)))

    walk(top, "")
    return tuple(out)


def crash_states(log: Log, limit: int, seed: int = 0) -> tuple[list[CrashState], int]:
    """Every distinct tree a power cut could leave, at most ``limit`` of them (sampled).

    Returns the states and how many distinct ones there were before sampling.
    """
    seen: dict[tuple, CrashState] = {}
    for at in range(len(log.actions) + 1):
        for state in _states_at(log, at):
            seen.setdefault((state.marks, state.tree), state)
    states = list(seen.values())
    total = len(states)
    if total > limit:
        states = random.Random(seed).sample(states, limit)
    return states, total


def _states_at(log: Log, at: int) -> Iterator[CrashState]:
    done = log.actions[:at]
    marks = tuple(a.args[0] for a in done if a.kind == "mark")
    synced_dirs_after = [set() for _ in done]  # dirs fsynced after action i
    synced_files: set[int] = set()
    later: set[int] = set()
    for i in range(len(done) - 1, -1, -1):
        synced_dirs_after[i] = set(later)
        if done[i].kind == "sync_dir":
            later.add(done[i].args[0])
        if done[i].kind == "sync_file":
            synced_files.add(done[i].args[0])
    changes = [i for i, a in enumerate(done) if a.dirs]
    optional = [i for i in changes if not set(done[i].dirs) <= synced_dirs_after[i]]
    created = [a.args[2] for a in done if a.kind == "link"]
    for kept in itertools.product((False, True), repeat=len(optional)):
        chosen = {i for i, keep in zip(optional, kept, strict=True) if keep}
        nodes = {i: _copy(n) for i, n in log.initial.items()}
        nodes.update((ino, _copy(log.created[ino])) for ino in created)
        for i in changes:
            if i in chosen or i not in optional:
                _apply(nodes, done[i])
        unsynced = [
            ino for ino in created if nodes[ino].children is None and ino not in synced_files
        ]
        for cut in itertools.product(range(3), repeat=len(unsynced)):
            contents = {}
            for ino, how in zip(unsynced, cut, strict=True):
                data = nodes[ino].content
                contents[ino] = (b"", data[: len(data) // 2], data)[how]
            yield CrashState(at, marks, _tree(nodes, log.root, contents))
