"""Suite 1: one save's file-system steps happen in the only durable order.

data written -> file fsync -> temporary-directory fsync -> rename -> parent-directory fsync.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from arrayckpt import fsops
from arrayckpt.layout import MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE

try:
    from . import faults
except ImportError:
    import faults


def record_save(tmp_path: Path, saver_name: str, *, previous: bool, exchange: bool = True):
    target = tmp_path / "ckpt"
    with faults.saver(saver_name) as s:
        if previous:
            s.save(target, 1)
        recorder = faults.RecordingFS(exchange=exchange)
        with fsops.use(recorder):
            s.save(target, 2)
    faults.assert_checkpoint(target, 2)
    assert faults.debris(tmp_path) == []
    return target, recorder.ops


def index(ops: list[faults.Op], kind: str, *names: str) -> int:
    """Position of the one step ``kind`` on paths with these final names."""
    hits = [
        i
        for i, op in enumerate(ops)
        if op.kind == kind and tuple(p.name for p in op.paths) == names
    ]
    assert len(hits) == 1, f"expected one {kind}{names} in {[str(o) for o in ops]}"
    return hits[0]


@pytest.mark.parametrize("saver_name", faults.SINGLE_SAVERS)
@pytest.mark.parametrize("case", ["first save", "replace (exchange)", "replace (two renames)"])
def test_durable_order(tmp_path: Path, saver_name: str, case: str) -> None:
    previous = case != "first save"
    exchange = case != "replace (two renames)"
    target, ops = record_save(tmp_path, saver_name, previous=previous, exchange=exchange)
    kinds = [op.kind for op in ops]
    assert "read_bytes" not in kinds

    mkdir = kinds.index("mkdir")
    tmp = ops[mkdir].paths[0]
    assert tmp.parent == target.parent and tmp.name.startswith(f".{target.name}.arrayckpt-tmp-")
    sync_tmp = index(ops, "fsync_dir", tmp.name)
    for name in (MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE):
        written = [
            i for i, op in enumerate(ops) if op.kind in faults.WRITES and op.paths == (tmp / name,)
        ]
        assert len(written) == 1, f"{name} written {len(written)} times"
        synced = index(ops, "fsync_file", name)
        assert ops[synced].paths == (tmp / name,)
        assert mkdir < written[0] < synced < sync_tmp, f"{name}: {[str(o) for o in ops]}"

    if not previous:
        swap = index(ops, "rename", tmp.name, target.name)
        moved_aside = None
    elif exchange:
        swap = index(ops, "exchange", tmp.name, target.name)
        moved_aside = None
    else:
        moved_aside = next(
            i for i, op in enumerate(ops) if op.kind == "rename" and op.paths[0] == target
        )
        assert ".arrayckpt-old-" in ops[moved_aside].paths[1].name
        swap = index(ops, "rename", tmp.name, target.name)
        assert sync_tmp < moved_aside < swap
    sync_parent = index(ops, "fsync_dir", target.parent.name)
    assert sync_tmp < swap < sync_parent

    # Nothing writes into the target itself, and after the commit only cleanup remains.
    assert not any(target in op.paths[0].parents for op in ops)
    after = [op for op in ops[sync_parent + 1 :]]
    assert all(op.kind == "remove_tree" for op in after), [str(o) for o in after]
    assert len(after) == (1 if previous else 0)


def test_every_mutating_call_goes_through_fsops() -> None:
    """A save step that bypassed `fsops` would escape every fault these suites inject."""
    import re

    package = Path(faults.ac.__file__).parent
    mutating = re.compile(
        r"\b(os\.(mkdir|makedirs|rename|replace|remove|unlink|rmdir|fsync|truncate|write)"
        r"|shutil\.\w+|open\([^)]*[\"'][wax+]b?[\"'])"
    )
    offenders = [
        f"{path.relative_to(package)}:{n}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "fsops.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if mutating.search(line)
    ]
    assert offenders == []
