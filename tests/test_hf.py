"""Hugging Face interop: transformers loads a model directory arrayckpt wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

import arrayckpt as ac


def test_from_pretrained_loads_an_arrayckpt_model_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # built from a config: nothing is downloaded
    torch = pytest.importorskip("torch", reason="torch is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ac.save_checkpoint(tmp_path, model.state_dict())
    config.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    # tied weights: one tensor, as transformers builds it
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    ids = torch.arange(10)[None]
    assert torch.equal(loaded(ids).logits, model(ids).logits)
