"""ac.load_file: any safetensors file from any tool; arrayckpt's files carry HF's format tag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

import arrayckpt as ac


def test_reads_a_file_written_by_safetensors(tmp_path: Path) -> None:
    f = tmp_path / "pytorch_model-00001.safetensors"
    save_file(
        {"a": np.arange(4, dtype=np.float16), "b": np.ones((2, 2))},
        str(f),
        metadata={"format": "pt"},
    )
    out = ac.load_file(f)
    assert sorted(out) == ["a", "b"]
    np.testing.assert_array_equal(out["a"], np.arange(4, dtype=np.float16))
    assert list(ac.load_file(f, keys=["b"])) == ["b"]


def test_to_torch_and_nested(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    ac.save_checkpoint(tmp_path / "c", {"layer": {"w": np.ones(2, np.float32)}, "n": 3})
    out = ac.load_file(tmp_path / "c" / "model.safetensors", xp=torch)
    assert out["n"] == 3 and torch.equal(out["layer"]["w"], torch.ones(2))


def test_missing_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ac.CheckpointNotFoundError, match="no such file"):
        ac.load_file(tmp_path / "nope.safetensors")
    save_file({"a": np.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ac.CheckpointNotFoundError, match="'zz'"):
        ac.load_file(tmp_path / "x.safetensors", keys=["zz"])


def test_written_files_say_format_pt(tmp_path: Path) -> None:
    # transformers refuses safetensors files whose metadata lacks a known framework tag
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(1)}, {"m": np.ones(1)})
    for name in ("model.safetensors", "optimizer.safetensors"):
        with safetensors.safe_open(str(tmp_path / "c" / name), "np") as f:
            assert f.metadata()["format"] == "pt"
