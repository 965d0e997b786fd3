"""The examples in docs/distributed.md and docs/examples/distributed_torchrun.py run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _dist_launch import ROOT, base_env, free_port, wait_all


def test_first_example_in_docs_runs() -> None:
    text = (ROOT / "docs" / "distributed.md").read_text()
    section = text.split("## A first example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    exec(compile(code.group(1), "docs/distributed.md", "exec"), {})


@pytest.mark.distributed
def test_torchrun_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch is not installed")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / "docs" / "examples" / "distributed_torchrun.py"),
        str(tmp_path / "ckpt"),
    ]
    log = tmp_path / "torchrun.txt"
    with open(log, "wb") as f:  # its own session: a timeout kills torchrun and its workers
        proc = subprocess.Popen(
            cmd, env=base_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_all([proc], [log])
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "resharded for 1 rank: {'attn.wq': (8, 8), 'norm.weight': (8,)}" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "merged",
        "step_1",
        "step_2",
        "step_3",
    ]
