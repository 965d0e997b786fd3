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
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
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


def test_load_checkpoint_on_a_hugging_face_directory(tmp_path: Path) -> None:
    import json

    import numpy as np
    from safetensors.numpy import save_file

    single = tmp_path / "single"
    single.mkdir()
    save_file(
        {"w": np.ones(3, np.float32)}, str(single / "model.safetensors"), metadata={"format": "pt"}
    )
    model, optimizer, state = ac.load_checkpoint(single)
    assert list(model) == ["w"] and optimizer is None and state.step == 0

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": np.zeros(2)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones(2)}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(ac.load_checkpoint(sharded).model) == ["a", "b"]
    # only the shard holding "b" is opened: the other may even be unreadable
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"not safetensors")
    np.testing.assert_array_equal(ac.load_checkpoint(sharded, keys=["b"]).model["b"], np.ones(2))
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load_checkpoint(sharded)
    with pytest.raises(ac.CheckpointNotFoundError, match="'zz'"):
        ac.load_checkpoint(sharded, keys=["zz"])
    index["weight_map"]["b"] = "../elsewhere.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ac.CorruptCheckpointError, match="not a file name"):
        ac.load_checkpoint(sharded, keys=["a"])


def test_an_arrayckpt_checkpoint_without_training_state_is_not_a_model_dir(
    tmp_path: Path,
) -> None:
    import numpy as np

    ac.save_checkpoint(tmp_path, {"w": np.ones(2)})
    (tmp_path / "training_state.json").unlink()
    with pytest.raises(ac.CheckpointNotFoundError, match="training_state"):
        ac.load_checkpoint(tmp_path)
