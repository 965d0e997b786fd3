"""The command line, run as users run it: `python -m arrayckpt ...` in a subprocess."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt.format import SafetensorsReader

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "arrayckpt", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


@pytest.fixture
def ckpt(tmp_path):
    model = {"embed.weight": np.ones((4, 8), np.float32), "head.bias": np.zeros(3, np.float16)}
    opt = {
        "state": {0: {"m": np.zeros((4, 8), np.float32)}},
        "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99)}],
    }
    path = tmp_path / "ckpt"
    ac.save_checkpoint(
        path,
        model,
        opt,
        ac.TrainingState(step=42, epoch=3, learning_rate=0.01, metadata={"a": "b"}),
    )
    return path


def corrupt(path: Path, tensor: str) -> None:
    entry = SafetensorsReader(path).header.entries[tensor]
    data = bytearray(path.read_bytes())
    data[entry.start] ^= 0x01
    path.write_bytes(bytes(data))


def test_inspect_prints_a_table_with_the_training_state(ckpt):
    out = cli("inspect", ckpt)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "training state: step 42, epoch 3, learning rate 0.01, version 2" in lines
    assert any(line.split() == ["embed.weight", "F32", "4x8", "128", "B"] for line in lines)
    assert any(line.split() == ["head.bias", "F16", "3", "6", "B"] for line in lines)
    assert any(line.split() == ["state.0.m", "F32", "4x8", "128", "B"] for line in lines)
    assert "param_groups.0.lr = 0.01" in out.stdout


def test_inspect_json(ckpt):
    doc = json.loads(cli("inspect", ckpt, "--json").stdout)
    assert doc["training_state"]["step"] == 42 and doc["training_state"]["metadata"] == {"a": "b"}
    model, opt = doc["files"]
    assert {t["name"]: t["shape"] for t in model["tensors"]} == {
        "embed.weight": [4, 8],
        "head.bias": [3],
    }
    assert opt["nested"] and opt["values"]["param_groups.0.betas.1"] == 0.99


def test_inspect_a_single_safetensors_file(ckpt):
    doc = json.loads(cli("inspect", ckpt / "model.safetensors", "--json").stdout)
    assert doc["kind"] == "file" and doc["files"][0]["nbytes"] == 134


def test_verify_passes_and_fails_by_exit_status(ckpt):
    ok = cli("verify", ckpt)
    assert ok.returncode == 0 and "verified: all good" in ok.stdout
    assert ok.stderr == ""  # piped: no progress bar
    corrupt(ckpt / "optimizer.safetensors", "state.0.m")
    bad = cli("verify", ckpt)
    assert bad.returncode == 1
    assert "'state.0.m' fails its CRC32C" in bad.stdout
    assert "verification FAILED: 1 of 3 files corrupt" in bad.stdout
    report = json.loads(cli("verify", ckpt, "--json").stdout)
    assert not report["ok"] and [len(f["errors"]) for f in report["files"]] == [0, 1, 0]


def test_verify_reports_a_malformed_header(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    out = cli("verify", ckpt)
    assert out.returncode == 1 and "model.safetensors: tensor data ends at" in out.stdout


def test_missing_paths_exit_2_with_a_message(tmp_path):
    for command in ("inspect", "verify", "ls"):
        out = cli(command, tmp_path / "nothing")
        assert out.returncode == 2, command
        assert "arrayckpt: error:" in out.stderr and "nothing" in out.stderr
    assert cli("no-such-command").returncode == 2


def test_ls_lists_complete_incomplete_and_temporary_steps(tmp_path):
    with ac.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(100, {"w": np.ones(2)})
        mgr.save(200, {"w": np.ones(2)})
    (tmp_path / "step_00000200" / "training_state.json").unlink()
    (tmp_path / f".step_00000300.arrayckpt-tmp-{os.getpid()}-abcd").mkdir()
    out = cli("ls", tmp_path)
    assert out.returncode == 0
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("100", "complete"),
        ("200", "incomplete"),
        ("-", "temporary"),
    ]
    doc = json.loads(cli("ls", tmp_path, "--json").stdout)
    assert [(e["step"], e["status"], e["pid"]) for e in doc] == [
        (100, "complete", None),
        (200, "incomplete", None),
        (None, "temporary", os.getpid()),
    ]
    assert cli("verify", tmp_path).returncode == 0  # a root: every complete step


def on_a_terminal(*args: object) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; its exit status and what stderr showed."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "arrayckpt", *map(str, args)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=120,
        )
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    return proc.returncode, b"".join(chunks).decode()


def test_progress_bar_shows_on_a_terminal(ckpt):
    status, shown = on_a_terminal("verify", ckpt)
    assert status == 0
    assert "verify  [" in shown and "100%" in shown


def tensor_parallel(src: Path, names: int = 1) -> np.ndarray:
    full = np.arange(8, dtype=np.float32)
    split = {f"layers.{i}.attention.query_key_value.weight": 0 for i in range(names)}
    for rank in range(2):
        model = {name: full[rank * 4 : (rank + 1) * 4] for name in split}
        ac.save_distributed_checkpoint(
            src,
            rank,
            2,
            {"w": full[rank * 4 : (rank + 1) * 4], **model, "b": np.ones(2, np.float32)},
            None,
            ac.TrainingState(step=5),
            ac.ShardingConfig(ac.TensorParallel(), {"w": 0, **split}),
        )
    return full


def test_consolidate_draws_a_progress_bar_on_a_terminal(tmp_path):
    tensor_parallel(tmp_path / "sharded")
    status, shown = on_a_terminal("consolidate", tmp_path / "sharded", tmp_path / "merged")
    assert status == 0, shown
    assert "[" in shown and "100%" in shown and " B / " in shown


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"arrayckpt {ac.__version__}"


@pytest.mark.parametrize("order", ["before", "after"])
def test_verbose_before_or_after_the_command(ckpt, order):
    args = ["-v", "verify", ckpt] if order == "before" else ["verify", "-v", ckpt]
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert "verified: all good" in out.stdout


def test_inspect_a_json_file_says_it_is_one(ckpt):
    out = cli("inspect", ckpt / "training_state.json")
    assert out.returncode == 2
    assert "is a JSON file" in out.stderr and f"arrayckpt inspect {ckpt}" in out.stderr
    assert "header length" not in out.stderr


def test_ls_shows_hand_named_step_folders_and_how_to_rename_them(tmp_path):
    ac.save_checkpoint(tmp_path / "step_1", {"w": np.zeros(1, np.float32)})
    out = cli("verify", tmp_path)
    assert out.returncode == 2 and f"arrayckpt ls {tmp_path}" in out.stderr
    out = cli("ls", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "step_1" in out.stdout and "rename to step_00000001" in out.stdout


def test_inspect_wraps_the_sharding_of_a_distributed_checkpoint(tmp_path):
    tensor_parallel(tmp_path / "sharded", names=12)
    out = cli("inspect", tmp_path / "sharded")
    assert out.returncode == 0, out.stderr
    assert "layers.11.attention.query_key_value.weight: 0" in out.stdout
    assert max(map(len, out.stdout.splitlines())) <= 100


def test_consolidate_without_distributed_support_says_so(tmp_path):
    if hasattr(ac, "consolidate_checkpoint"):
        pytest.skip("this build has consolidate_checkpoint; the test below covers it")
    out = cli("consolidate", tmp_path / "a", tmp_path / "b")
    assert out.returncode == 2 and "consolidate_checkpoint is missing" in out.stderr


def test_consolidate_merges_a_sharded_checkpoint(tmp_path):
    if not hasattr(ac, "consolidate_checkpoint"):
        pytest.skip("arrayckpt.consolidate_checkpoint is not in this build")
    src, dst = tmp_path / "sharded", tmp_path / "merged"
    full = np.arange(8, dtype=np.float32)
    for rank in range(2):
        ac.save_distributed_checkpoint(
            src,
            rank,
            2,
            {"w": full[rank * 4 : (rank + 1) * 4], "b": np.ones(2, np.float32)},
            None,
            ac.TrainingState(step=5),
            ac.ShardingConfig(ac.TensorParallel(), {"w": 0}),
        )
    out = cli("consolidate", src, dst)
    assert out.returncode == 0, out.stderr
    assert f"consolidated {src} into {dst}: 2 tensors, 40 B" in out.stdout
    np.testing.assert_array_equal(ac.load_checkpoint(dst).model["w"], full)


def test_demo_without_dir_leaves_nothing_behind(tmp_path):
    env = {**ENV, "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "arrayckpt", "demo", "--steps", "200"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "resumed from step_00000150" in out.stdout and "--dir" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_demo_runs_and_leaves_a_manager_root(tmp_path):
    out = cli("demo", "--dir", tmp_path, "--steps", 200)
    assert out.returncode == 0, out.stderr
    assert "resumed from step_00000150" in out.stdout
    assert "step  151  loss" in out.stdout and "(bit-identical to before the crash)" in out.stdout
    listed = json.loads(cli("ls", tmp_path, "--json").stdout)
    assert [(e["step"], e["status"]) for e in listed] == [
        (100, "complete"),
        (150, "complete"),
        (200, "complete"),
    ]
    assert cli("verify", tmp_path).returncode == 0


def test_ls_and_inspect_point_at_each_other(ckpt, tmp_path):
    out = cli("ls", ckpt)
    assert out.returncode == 2 and f"arrayckpt inspect {ckpt}" in out.stderr
    root = tmp_path / "root"
    ac.CheckpointManager(root, async_save=False).save(100, {"w": np.zeros(1)})
    out = cli("inspect", root)
    assert out.returncode == 2 and f"arrayckpt ls {root}" in out.stderr


def test_console_script_if_installed(ckpt):
    exe = shutil.which("arrayckpt")
    if exe is None:
        pytest.skip("the arrayckpt console script is not installed (pip install . provides it)")
    out = subprocess.run([exe, "verify", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_inspect_and_verify_a_sharded_checkpoint(tmp_path):
    """A sharded layout built by hand (rank_N/ + sharding_meta.json), as boostr writes it."""
    root = tmp_path / "sharded"
    for rank in range(2):
        ac.save_checkpoint(
            root / f"rank_{rank}",
            {"w": np.full(2, rank, np.float32)},
            training_state=ac.TrainingState(step=9),
        )
    meta = {"version": 2, "world_size": 2, "strategy": "TensorParallel", "split_dims": {"w": 0}}
    (root / "sharding_meta.json").write_text(json.dumps(meta))
    doc = json.loads(cli("inspect", root, "--json").stdout)
    assert doc["kind"] == "distributed" and doc["sharding"] == meta
    assert [r["training_state"]["step"] for r in doc["ranks"]] == [9, 9]
    assert cli("verify", root).returncode == 0
    corrupt(root / "rank_1" / "model.safetensors", "w")
    out = cli("verify", root)
    assert out.returncode == 1 and "rank_1/model.safetensors: tensor 'w'" in out.stdout


def test_verify_a_root_without_complete_steps_exits_2(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    out = cli("verify", tmp_path)
    assert out.returncode == 2 and "no complete step" in out.stderr
