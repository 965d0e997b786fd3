"""Partial loading: `keys=` and `open_checkpoint` read only the tensors asked for."""

from __future__ import annotations

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt.format import SafetensorsReader


def _flip_a_byte_of(path, name):
    """Corrupt tensor ``name``'s data in place (the header stays valid)."""
    entry = SafetensorsReader(path).header.entries[name]
    with open(path, "r+b") as f:
        f.seek(entry.start)
        byte = f.read(1)
        f.seek(entry.start)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def ckpt(tmp_path):
    model = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(1000, np.int64)}
    opt = {"a.m": np.zeros((2, 3), np.float32)}
    ac.save_checkpoint(tmp_path, model, opt, ac.TrainingState(step=7))
    return tmp_path


def test_keys_loads_only_those_tensors_and_never_checks_the_others(ckpt):
    _flip_a_byte_of(ckpt / "model.safetensors", "b")
    m, o, s = ac.load_checkpoint(ckpt, keys=["a"], optimizer=False)
    assert list(m) == ["a"] and o is None and s.step == 7
    np.testing.assert_array_equal(m["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(ac.CorruptCheckpointError, match="'b'"):
        ac.load_checkpoint(ckpt, keys=["b"])


def test_unknown_keys_are_named(ckpt):
    with pytest.raises(ac.CheckpointNotFoundError, match="nope"):
        ac.load_checkpoint(ckpt, keys=["a", "nope"])
    with pytest.raises(ac.InvalidInputError, match="list of tensor names"):
        ac.load_checkpoint(ckpt, keys="a")


def test_keys_of_nested_state_are_dotted_names(tmp_path):
    state = {"enc": {"layers": [{"w": np.ones(2)}, {"w": np.zeros(2)}]}, "lr": 0.1}
    ac.save_checkpoint(tmp_path, state)
    m = ac.load_checkpoint(tmp_path, keys=["enc.layers.1.w"]).model
    np.testing.assert_array_equal(m["enc.layers.1.w"], np.zeros(2))


def test_open_checkpoint_reads_tensors_on_access(ckpt):
    _flip_a_byte_of(ckpt / "model.safetensors", "b")
    lazy = ac.open_checkpoint(ckpt)  # opening reads headers only: no checksum fails yet
    assert sorted(lazy.model) == ["a", "b"] and len(lazy.model) == 2
    assert lazy.model.info("b") == ("I64", (1000,), 8000)
    assert lazy.training_state.step == 7
    assert lazy.optimizer is not None and list(lazy.optimizer) == ["a.m"]
    np.testing.assert_array_equal(lazy.model["a"][1], [3, 4, 5])
    with pytest.raises(ac.CorruptCheckpointError, match="'b'"):
        lazy.model["b"]
    with pytest.raises(KeyError):
        lazy.model["missing"]


@pytest.mark.parametrize("mmap", [True, False])
def test_open_checkpoint_converts_to_the_requested_framework(ckpt, mmap):
    torch = pytest.importorskip("torch")
    lazy = ac.open_checkpoint(ckpt, xp=torch, mmap=mmap)
    assert torch.equal(lazy.model["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_open_checkpoint_exposes_non_array_leaves(tmp_path):
    ac.save_checkpoint(
        tmp_path,
        {"w": np.ones(1)},
        {"state": {0: {"m": np.ones(1)}}, "param_groups": [{"lr": 0.5}]},
    )
    lazy = ac.open_checkpoint(tmp_path)
    assert lazy.optimizer is not None and lazy.optimizer.nested and not lazy.model.nested
    assert lazy.optimizer.leaves == {"param_groups.0.lr": 0.5}
    assert lazy.model.leaves == {}


def test_open_checkpoint_of_a_missing_directory(tmp_path):
    with pytest.raises(ac.CheckpointNotFoundError):
        ac.open_checkpoint(tmp_path / "nothing")
