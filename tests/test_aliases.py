"""Tied tensors are stored once and come back tied; partial overlaps are refused."""

from __future__ import annotations

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import aliases
from arrayckpt.format import SafetensorsReader

torch = pytest.importorskip("torch")


class TiedLM(torch.nn.Module):
    """GPT-2's shape of tying: the output head is the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(11, 4)
        self.ln = torch.nn.LayerNorm(4)
        self.lm_head = torch.nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.wte.weight


def test_a_tied_module_is_stored_once_and_loads_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    ac.save_checkpoint(tmp_path, model.state_dict())
    reader = SafetensorsReader(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in reader.names and "wte.weight" in reader.names
    assert aliases.read(reader.header.metadata, reader.header.entries, source="t") == {
        "lm_head.weight": "wte.weight"
    }
    state = ac.load_checkpoint(tmp_path, xp=torch).model
    assert state["lm_head.weight"] is state["wte.weight"]
    fresh = TiedLM()
    fresh.load_state_dict(state, assign=True)
    assert fresh.lm_head.weight.data_ptr() == fresh.wte.weight.data_ptr()
    torch.testing.assert_close(fresh.wte.weight, model.wte.weight)


def test_into_keeps_the_model_tied(tmp_path):
    model = TiedLM()
    ac.save_checkpoint(tmp_path, model.state_dict())
    fresh = TiedLM()
    ac.load_checkpoint(tmp_path, into=fresh.state_dict())
    assert fresh.lm_head.weight is fresh.wte.weight
    torch.testing.assert_close(fresh.lm_head.weight, model.wte.weight)


def test_tied_tensors_in_nested_state_and_numpy(tmp_path):
    shared = np.arange(6.0).reshape(2, 3)
    state = {"enc": {"w": shared}, "dec": [shared], "other": shared.copy()}
    ac.save_checkpoint(tmp_path, state)
    back = ac.load_checkpoint(tmp_path).model
    assert back["dec"][0] is back["enc"]["w"] and back["other"] is not back["enc"]["w"]
    assert ac.load_checkpoint(tmp_path, keys=["dec.0"]).model["dec.0"].shape == (2, 3)


def test_partial_overlaps_are_refused_naming_both_keys(tmp_path):
    base = torch.arange(12.0)
    with pytest.raises(ac.InvalidInputError, match=r"'a'.*'b'.*partial overlap"):
        ac.save_checkpoint(tmp_path / "c", {"a": base[:8], "b": base[4:]})
    assert not (tmp_path / "c").exists()
    # disjoint views of one buffer are fine: each is stored on its own
    ac.save_checkpoint(tmp_path / "d", {"a": base[:6], "b": base[6:]})
    back = ac.load_checkpoint(tmp_path / "d", xp=torch).model
    torch.testing.assert_close(back["b"], base[6:])


def test_verify_accepts_a_tied_nested_checkpoint(tmp_path):
    from arrayckpt import inspection

    model = TiedLM()
    ac.save_checkpoint(tmp_path, {"model": model.state_dict(), "step": 3})
    assert inspection.verify(tmp_path)["ok"]
    back = ac.load_checkpoint(tmp_path, xp=torch).model["model"]
    assert back["lm_head.weight"] is back["wte.weight"]
