"""Suite 9: concurrent processes on one checkpoint path.

Two processes saving the same path: both succeed, and what is visible at the end is one
complete checkpoint, the last save of one of them. A reader polling while a writer saves
over and over never sees a torn checkpoint, nor a step older than one it saw before.
"""

from __future__ import annotations

from pathlib import Path

try:
    from . import faults
except ImportError:
    import faults

SAVES = faults.scaled(20, 200)
READ_SECONDS = faults.scaled(2, 20)


def finish(child, timeout: float = 300) -> tuple[str, str]:
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return out, err


def test_two_processes_save_the_same_path(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    ranges = [(1000, 1000 + SAVES - 1), (2000, 2000 + SAVES - 1)]
    children = [
        faults.start_child("save-loop", target, "sync", 16, first, last) for first, last in ranges
    ]
    results = [finish(child) for child in children]
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert len(out.splitlines()) == SAVES
    step = faults.loaded_step(target, 16)
    assert step in {last for _, last in ranges}, f"visible step {step} is not a last save"
    assert faults.debris(tmp_path) == []
    faults.report("concurrency", writers=2, saves=2 * SAVES, failures=0)


def test_reader_never_sees_a_torn_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    writer = faults.start_child("save-loop", target, "sync", 16)
    try:
        assert writer.stdout.readline().startswith("committed")
        reader = faults.start_child("read-loop", target, READ_SECONDS, 16)
        out, err = finish(reader)
    finally:
        writer.kill()
        finish(writer)
    assert reader.returncode == 0, err[-3000:]
    seen = [int(line.split()[1]) for line in out.splitlines()]
    assert len(seen) > 10 and len(set(seen)) > 3, "the reader saw too few saves to matter"
    assert seen == sorted(seen), "the reader went back to an older checkpoint"
    faults.report("concurrency", reads=len(seen), distinct_steps=len(set(seen)), failures=0)
