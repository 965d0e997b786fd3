"""The directory grammar (`arrayckpt.layout`): names, completeness, and every caller using it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import cli, layout


def _distributed(path):
    zero = ac.ShardingConfig(ac.ZeroPartitioned(3))
    for rank in range(2):
        ac.save_distributed_checkpoint(path, rank, 2, {f"w{rank}": np.ones(2)}, None, None, zero)
    return path


def test_step_names_beyond_u64_are_not_steps(tmp_path):
    assert layout.parse_step_dir_name("step_00000100") == 100
    assert layout.parse_step_dir_name(layout.step_dir_name(2**64 - 1)) == 2**64 - 1
    assert layout.parse_step_dir_name("step_99999999999999999999") is None
    mgr = ac.CheckpointManager(tmp_path, async_save=False)
    mgr.save(5, {"w": np.ones(1)})
    stray = tmp_path / "step_99999999999999999999"
    shutil.copytree(tmp_path / layout.step_dir_name(5), stray)
    assert mgr.latest_step() == 5


def test_temporary_with_an_out_of_range_pid_is_stale_not_an_overflow(tmp_path):
    name = layout.temporary_name("step_00000001", layout.TEMP_MARKER, 10**30, "0" * 12)
    (tmp_path / name).mkdir()
    assert layout.temporary_owner(name) is None
    removed = ac.CheckpointManager(tmp_path, async_save=False).cleanup()
    assert not (tmp_path / name).exists() and removed == []  # removed by the constructor


def test_temporary_names_round_trip():
    name = layout.temporary_name("step_00000001", layout.OLD_MARKER, 1234, "abcdef012345")
    assert layout.temporary_owner(name) == 1234
    assert layout.temporary_target(name) == "step_00000001"
    assert layout.is_temporary_name(name)
    assert layout.temporary_target("step_00000001") is None


def test_a_deleted_rank_makes_a_distributed_checkpoint_incomplete(tmp_path, capsys):
    path = _distributed(tmp_path / "d")
    assert layout.is_complete(path)
    shutil.rmtree(path / "rank_1")
    assert not layout.is_complete(path)
    assert cli.main(["verify", str(path)]) == cli.EXIT_FAILED
    assert "rank_1/" in capsys.readouterr().out
    assert cli.main(["inspect", str(path)]) != cli.EXIT_OK
    assert "rank_1/" in capsys.readouterr().err


def test_a_malformed_world_size_fails_verify_and_inspect(tmp_path, capsys):
    path = _distributed(tmp_path / "d")
    meta = path / layout.SHARDING_META_FILE
    doc = json.loads(meta.read_text())
    doc["world_size"] = "two"
    doc.get("arrayckpt", {}).pop("crc32c", None)  # as written by hand: no checksum to fail first
    meta.write_text(json.dumps(doc))
    assert not layout.is_complete(path)
    assert cli.main(["verify", str(path)]) == cli.EXIT_FAILED
    assert "world_size must be a non-negative integer" in capsys.readouterr().out
    assert cli.main(["inspect", str(path)]) == cli.EXIT_FAILED
    assert "world_size" in capsys.readouterr().err


def test_commit_leaves_a_live_processes_temporary_alone(tmp_path):
    target = tmp_path / "c"
    mine = tmp_path / layout.temporary_name("c", layout.TEMP_MARKER, os.getppid(), "0" * 12)
    dead = tmp_path / layout.temporary_name("c", layout.TEMP_MARKER, 2**31 - 1, "1" * 12)
    mine.mkdir()
    dead.mkdir()
    ac.save_checkpoint(target, {"w": np.ones(1)})
    assert mine.exists() and not dead.exists()


@pytest.mark.parametrize("name", ["rank_0", "rank_12"])
def test_rank_names(name):
    assert layout.rank_dir_name(int(name[5:])) == name and layout.is_rank_dir_name(name)
    assert not layout.is_rank_dir_name("rank_01")
