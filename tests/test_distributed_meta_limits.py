"""Issue 10 regressions for sharding_meta.json and the distributed settings: sizes and counts
bounded by what is on disk, strict parsing everywhere it is read, env vars read when used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt.cli import main as cli_main
from arrayckpt.distributed.coordinator import default_timeout
from arrayckpt.distributed.types import ShardingMeta
from arrayckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidInputError
from arrayckpt.inspection import verify
from arrayckpt.limits import MAX_SHARDING_META_BYTES

ROOT = Path(__file__).resolve().parent.parent


def save_two_ranks(directory: Path) -> Path:
    for r in range(2):
        ac.save_distributed_checkpoint(
            directory,
            r,
            2,
            {"w": np.full(3, r, np.float32)},
            None,
            ac.TrainingState(4),
            ac.ShardingConfig(ac.Replicated()),
            coordinator=None,
        )
    return directory


def set_meta(directory: Path, **fields: object) -> None:
    path = directory / "sharding_meta.json"
    doc = json.loads(path.read_text())
    doc.update(fields)
    # as a file boostr or a hand wrote it: no checksum, so the parser's own bounds must hold
    doc.get("arrayckpt", {}).pop("crc32c", None)
    path.write_text(json.dumps(doc))


def test_a_trillion_ranks_is_refused_by_what_is_on_disk(tmp_path: Path) -> None:
    # The old loop over range(world_size) never ended; the child's time limit turns a
    # hang into a failure instead of stalling the suite.
    ckpt = save_two_ranks(tmp_path / "ckpt")
    set_meta(ckpt, world_size=10**12)
    code = (
        "import sys, arrayckpt as ac\n"
        "from arrayckpt.errors import CheckpointNotFoundError\n"
        "for call in (lambda: ac.load_distributed_checkpoint(sys.argv[1], 0),\n"
        "             lambda: ac.load_distributed_checkpoint(sys.argv[1], 0, world_size=1),\n"
        "             lambda: ac.consolidate_checkpoint(sys.argv[1], sys.argv[1] + '.m')):\n"
        "    try:\n"
        "        call()\n"
        "    except CheckpointNotFoundError as exc:\n"
        "        print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(ckpt)],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 3, out
    for line in out:
        assert "saved by 1000000000000 ranks is incomplete" in line
        assert "rank_2/, rank_3/" in line and "rank_21/ and 999999999978 more." in line


def test_missing_rank_dirs_are_listed_in_order(tmp_path: Path) -> None:
    ckpt = save_two_ranks(tmp_path / "ckpt")
    set_meta(ckpt, world_size=5)
    with pytest.raises(CheckpointNotFoundError, match=r"missing rank_2/, rank_3/, rank_4/\."):
        ac.load_distributed_checkpoint(ckpt, 0)


def test_meta_over_the_cap_is_refused_without_parsing(tmp_path: Path) -> None:
    ckpt = save_two_ranks(tmp_path / "ckpt")
    doc = json.loads((ckpt / "sharding_meta.json").read_text())
    doc["padding"] = "x" * (MAX_SHARDING_META_BYTES + 1)
    (ckpt / "sharding_meta.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match=r"larger than .*limit for sharding_meta"):
        ac.load_distributed_checkpoint(ckpt, 0)
    with pytest.raises(CorruptCheckpointError, match="limit for sharding_meta"):
        ac.consolidate_checkpoint(ckpt, tmp_path / "merged")


def test_manager_steps_does_not_read_a_huge_sparse_meta(tmp_path: Path) -> None:
    step = save_two_ranks(tmp_path / "step_00000001")
    with open(step / "sharding_meta.json", "r+b") as f:
        f.truncate(512 * 2**20)  # sparse: costs no disk, but the old reader took it whole
    tracemalloc.start()
    try:
        steps = ac.CheckpointManager(tmp_path).steps()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert steps == []  # an unreadable meta is not a complete step
    assert peak < 64 * 2**20


def test_deep_meta_is_corrupt_not_a_recursion_error(tmp_path: Path) -> None:
    step = save_two_ranks(tmp_path / "step_00000001")
    (step / "sharding_meta.json").write_text(
        '{"world_size": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    assert ac.CheckpointManager(tmp_path).steps() == []
    with pytest.raises(CorruptCheckpointError, match="nested too deeply"):
        ac.load_distributed_checkpoint(step, 0)
    assert cli_main(["verify", str(step)]) != 0


def test_a_meta_too_large_to_load_is_never_written() -> None:
    entry = {"dtype": "F32", "shape": [4, 4], "crc32c": "00000000"}
    tensors = {f"layer.{i}.weight": entry for i in range(60_000)}
    meta = ShardingMeta(
        2,
        ac.ShardingConfig(ac.ZeroPartitioned(1)),
        ranks=[{"rank": r, "model": tensors} for r in range(2)],
    )
    with pytest.raises(InvalidInputError, match=r"over the .* a load accepts"):
        meta.to_json()


@pytest.mark.parametrize("problem", ["rank_1 deleted", "world_size two"])
def test_verify_fails_where_the_loader_refuses(tmp_path: Path, problem: str) -> None:
    ckpt = save_two_ranks(tmp_path / "ckpt")
    if problem == "rank_1 deleted":
        for f in (ckpt / "rank_1").iterdir():
            f.unlink()
        (ckpt / "rank_1").rmdir()
        expected = "rank_1/"
    else:
        set_meta(ckpt, world_size="two")
        expected = "world_size must be a non-negative integer"
    with pytest.raises(ac.CheckpointError):
        ac.load_distributed_checkpoint(ckpt, 0)
    report = verify(ckpt)
    assert not report["ok"]
    assert any(expected in err for f in report["files"] for err in f["errors"])
    assert cli_main(["verify", str(ckpt)]) != 0


def test_bad_dist_timeout_fails_the_save_not_the_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARRAYCKPT_DIST_TIMEOUT": "five minutes"}
    subprocess.run([sys.executable, "-c", "import arrayckpt"], env=env, timeout=120, check=True)
    for bad in ("five minutes", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("ARRAYCKPT_DIST_TIMEOUT", bad)
        with pytest.raises(InvalidInputError, match=r"ARRAYCKPT_DIST_TIMEOUT=.*e\.g\. 600"):
            default_timeout()
    monkeypatch.setenv("ARRAYCKPT_DIST_TIMEOUT", "12.5")
    assert default_timeout() == 12.5
    monkeypatch.delenv("ARRAYCKPT_DIST_TIMEOUT")
    assert default_timeout() == 300.0


def test_a_changed_sharding_meta_fails_its_checksum() -> None:
    """A coordinated save's sharding_meta.json records the CRC32C of its content at commit
    (under the "arrayckpt" key boostr ignores); a changed digit fails every read."""
    from arrayckpt.distributed.types import CHECKSUM_FIELD, EXTRA_KEY

    tp = ac.ShardingConfig(ac.TensorParallel(), {"w": 0})
    manifests = [{"rank": r, "model": {"w": {"dtype": "F32", "shape": [2]}}} for r in range(2)]
    text = ShardingMeta(2, tp, ranks=manifests).to_json()
    doc = json.loads(text)
    assert len(doc[EXTRA_KEY][CHECKSUM_FIELD]) == 8
    assert ShardingMeta.from_json(text).sharding.split_dims == {"w": 0}
    doc["split_dims"]["w"] = 1  # a flipped digit
    with pytest.raises(CorruptCheckpointError, match="CRC32C recorded at commit"):
        ShardingMeta.from_json(json.dumps(doc, indent=2))
    del doc[EXTRA_KEY][CHECKSUM_FIELD]  # older files carry none and are parsed as before
    assert ShardingMeta.from_json(json.dumps(doc)).sharding.split_dims == {"w": 1}


def test_a_caller_coordinated_meta_stays_byte_compatible_with_boostr() -> None:
    text = ShardingMeta(2, ac.ShardingConfig(ac.Replicated())).to_json()
    assert "crc32c" not in text and "arrayckpt" not in text
