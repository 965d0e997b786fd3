"""`export_hf` / `arrayckpt export-hf`: a checkpoint becomes a model directory that
transformers' ``from_pretrained`` loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import cli, hf


def _gpt2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Any, Path]:
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
    ckpt = tmp_path / "ckpt"
    ac.save_checkpoint(ckpt, model.state_dict())
    config.save_pretrained(ckpt)  # copied beside the weights by the export
    return torch, transformers, model, ckpt


def _check_loads(torch: Any, transformers: Any, model: Any, out: Path) -> None:
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    ids = torch.arange(10)[None]
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_sharded_export_loads_in_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch, transformers, model, ckpt = _gpt2(tmp_path, monkeypatch)
    out = ac.export_hf(ckpt, tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((out / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == [hf.shard_name(i + 1, len(shards)) for i in range(len(shards))]
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, hf.INDEX_FILE, "config.json"])
    # the tied lm_head is stored once, as save_pretrained does
    assert "lm_head.weight" not in index["weight_map"]
    assert "transformer.wte.weight" in index["weight_map"]
    sizes = {n: v.numel() * v.element_size() for n, v in model.state_dict().items()}
    assert index["metadata"]["total_size"] == sum(sizes[n] for n in index["weight_map"])
    _check_loads(torch, transformers, model, out)
    # arrayckpt reads its export back too (only the shards holding the asked-for key)
    m, _, _ = ac.load_checkpoint(out, keys=["transformer.h.1.mlp.c_fc.weight"])
    assert torch.equal(
        torch.from_numpy(np.asarray(m["transformer.h.1.mlp.c_fc.weight"])),
        model.state_dict()["transformer.h.1.mlp.c_fc.weight"],
    )
    for shard in shards:  # the shards keep their CRC32Cs
        assert cli.main(["verify", str(out / shard)]) == cli.EXIT_OK
    # a sharded model directory is a source too: back into one file
    single = ac.export_hf(out, tmp_path / "single")
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    _check_loads(torch, transformers, model, single)


def test_cli_export_single_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    torch, transformers, model, ckpt = _gpt2(tmp_path, monkeypatch)
    out = tmp_path / "hf"
    assert cli.main(["export-hf", str(ckpt), str(out)]) == cli.EXIT_OK
    assert "exported" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _check_loads(torch, transformers, model, out)
    m, o, _ = ac.load_checkpoint(out)  # a model directory, not a damaged checkpoint
    assert o is None and "lm_head.weight" not in m

    shards = tmp_path / "hf2"
    assert cli.main(["export-hf", str(ckpt), str(shards), "--max-shard-size", "0.1MB"]) == 0
    assert (shards / hf.INDEX_FILE).is_file()
    _check_loads(torch, transformers, model, shards)


def test_shard_plan_and_sizes(tmp_path: Path) -> None:
    state = {
        "a": np.ones(10, np.float32),
        "big": np.zeros(100, np.float32),
        "c": np.full(5, 2.0, np.float64),
    }
    ac.save_checkpoint(tmp_path / "c", state)
    out = ac.export_hf(tmp_path / "c", tmp_path / "o", max_shard_size=60)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    groups: dict[str, list[str]] = {}
    for name, file in index["weight_map"].items():
        groups.setdefault(file, []).append(name)
    # the 400-byte tensor is alone in its shard; no shard of several exceeds the limit
    assert any(names == ["big"] for names in groups.values())
    sizes = {k: v.nbytes for k, v in state.items()}
    assert all(len(ns) == 1 or sum(sizes[n] for n in ns) <= 60 for ns in groups.values())
    m, _, _ = ac.load_checkpoint(out)
    assert all(np.array_equal(m[k], v) for k, v in state.items())
    assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ac.InvalidInputError, match="not a size"):
        hf.parse_size("5 parsecs")
    with pytest.raises(ac.InvalidInputError, match="positive"):
        hf.parse_size(0)


def test_export_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(3), "step": {"n": 3}})
    with pytest.raises(ac.InvalidInputError, match="extra="):
        ac.export_hf(tmp_path / "c", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ac.CheckpointNotFoundError):
        ac.export_hf(tmp_path / "missing", tmp_path / "o")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    ac.save_checkpoint(tmp_path / "d", {"w": np.ones(3)})
    with pytest.raises(ac.InvalidInputError, match="refusing"):
        ac.export_hf(tmp_path / "d", busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # a checkpoint (even the source) is never replaced by its export
    for out in (tmp_path / "d", tmp_path / "c"):
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(ac.InvalidInputError, match="not empty"):
            ac.export_hf(tmp_path / "d", out)
        assert sorted(p.name for p in out.iterdir()) == before
    assert ac.load_checkpoint(tmp_path / "d").training_state.step == 0


def test_export_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    import tracemalloc

    one = 2**18 * 4  # bytes per tensor; NumPy reports its buffers to tracemalloc
    ac.save_checkpoint(tmp_path / "c", {f"t{i}": np.full(2**18, i, np.float32) for i in range(16)})
    tracemalloc.start()
    try:
        ac.export_hf(tmp_path / "c", tmp_path / "o", max_shard_size=4 * one)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * one, peak  # not the 16 tensors, not a 4-tensor shard
    assert len(json.loads((tmp_path / "o" / hf.INDEX_FILE).read_text())["weight_map"]) == 16
