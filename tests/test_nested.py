"""Nested state: PyTorch state dicts and pytrees round-trip; flat mappings keep boostr's layout."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayckpt as ac
from arrayckpt import nested
from arrayckpt.format import SafetensorsReader


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal structure, container types, key types, scalar types and array values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path  # dict equality ignores order
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{path}[{k!r}] key type"
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif nested.is_array(a):
        x = a.numpy() if hasattr(a, "numpy") else np.asarray(a)
        y = b.numpy() if hasattr(b, "numpy") else np.asarray(b)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=path)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def test_flat_mapping_keeps_the_boostr_layout(tmp_path):
    state = {"layers.0.weight": np.ones((2, 2), np.float32)}
    ac.save_checkpoint(tmp_path, state)
    reader = SafetensorsReader(tmp_path / "model.safetensors")
    assert nested.TREE_KEY not in reader.header.metadata
    assert reader.names == ["layers.0.weight"]


def test_nested_state_round_trips_with_int_keys_tuples_and_scalars(tmp_path):
    opt = {
        "state": {0: {"step": np.float32(3), "m": np.arange(4.0)}, 1: {"m": np.zeros((2, 1))}},
        "param_groups": [
            {
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "amsgrad": False,
                "foreach": None,
                "name": "group0",
                "params": [0, 1],
                "weight_decay": 0,
                "clip": float("inf"),
                "bad": float("nan"),
                "low": float("-inf"),
            },
        ],
        "0": "string key that looks like an int",
    }
    ac.save_checkpoint(tmp_path, {"w": np.ones(1)}, opt)
    assert_same(opt, ac.load_checkpoint(tmp_path).optimizer)
    names = SafetensorsReader(tmp_path / "optimizer.safetensors").names
    assert sorted(names) == ["state.0.m", "state.1.m"]  # NumPy scalars live in the tree


def test_optimizer_without_tensors_is_still_written(tmp_path):
    opt = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ac.save_checkpoint(tmp_path, {"w": np.ones(1)}, opt)
    assert ac.load_checkpoint(tmp_path).optimizer == opt


def test_top_level_list_pytree_round_trips(tmp_path):
    tree = [{"w": np.ones(3, np.float32)}, (np.zeros(2, np.int64), None)]
    ac.save_checkpoint(tmp_path, tree)
    assert_same(tree, ac.load_checkpoint(tmp_path).model)


def test_colliding_paths_are_refused_naming_both():
    with pytest.raises(ac.InvalidInputError, match=r"'a\.b'"):
        nested.flatten({"a.b": np.ones(1), "a": {"b": np.ones(1)}}, what="model_state")


@pytest.mark.parametrize("bad", [object(), 1 + 2j, b"bytes", {1.5: 2}])
def test_leaves_that_are_not_json_scalars_are_refused(tmp_path, bad):
    state = {"w": np.ones(1), "extra": {"x": bad}}
    with pytest.raises(ac.InvalidInputError):
        ac.save_checkpoint(tmp_path / "c", state)
    assert not (tmp_path / "c").exists()


def test_malformed_tree_is_reported_as_corrupt(tmp_path):
    flat, tree = nested.flatten({"a": [np.ones(1)]}, what="x")
    assert tree is not None
    doc = json.loads(tree)
    doc["root"]["dict"][0][1] = {"list": [{"tensor": "missing"}]}
    with pytest.raises(ac.CorruptCheckpointError, match="missing"):
        nested.unflatten(json.dumps(doc), lambda n: None, set(flat), source="f")
    with pytest.raises(ac.CorruptCheckpointError, match="does not list"):
        nested.unflatten(
            json.dumps({"version": 1, "root": {"dict": []}}), lambda n: None, {"a.0"}, source="f"
        )
    with pytest.raises(ac.CorruptCheckpointError):
        nested.unflatten('{"version": 1, "root": {"int": 1.5}}', lambda n: None, set(), source="f")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
)
arrays = st.integers(0, 3).map(lambda n: np.arange(n, dtype=np.float32))
keys = st.one_of(st.text(min_size=1, max_size=4).filter(lambda s: "." not in s), st.integers(0, 5))
trees = st.recursive(
    st.one_of(scalars, arrays),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=4).filter(lambda s: "." not in s), trees, max_size=3
    )
)
def test_any_pytree_round_trips_through_flatten(state):
    try:
        flat, tree = nested.flatten(state, what="model_state")
    except ac.InvalidInputError as exc:  # only name collisions (e.g. keys 1 and "1") may fail
        assert "both flatten" in str(exc) or "not valid" in str(exc)
        return
    if tree is None:
        assert_same(state, flat)
        return
    back = nested.unflatten(tree, flat.__getitem__, set(flat), source="t")
    assert_same(state, back)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=4).filter(lambda s: "." not in s), trees, max_size=3
    )
)
def test_map_arrays_names_leaves_as_flatten_does(state):
    """A rank's pruned state (distributed/global_shards.py) keeps flatten's tensor names."""
    try:
        flat, _ = nested.flatten(state, what="model_state")
    except ac.InvalidInputError:
        return  # names that collide are refused by flatten itself
    seen: list[str] = []
    same = nested.map_arrays(state, lambda n, x: seen.append(n) or x)
    assert seen == list(flat)
    assert_same(state, same)
    # Dropping every other leaf leaves the rest under their own names.
    kept = set(seen[::2])
    pruned = nested.map_arrays(state, lambda n, x: x if n in kept else nested.DROP)
    assert set(nested.flatten(pruned, what="model_state")[0]) == kept


def test_pytorch_state_dicts_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.8, 0.95))
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    ac.save_checkpoint(tmp_path, model.state_dict(), opt.state_dict(), ac.TrainingState(1))
    m, o, _ = ac.load_checkpoint(tmp_path, xp=torch)
    assert_same(dict(model.state_dict()), m)
    assert_same(opt.state_dict(), o)
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(o)  # PyTorch itself accepts what was loaded
    assert_same(opt.state_dict(), fresh.state_dict())


def test_jax_pytree_round_trips(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    params = {"dense": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "scale": (jnp.float32(2),)}
    ac.save_checkpoint(tmp_path, params)
    back = ac.load_checkpoint(tmp_path, xp=jnp).model
    assert type(back["scale"]) is tuple
    pairs = [(params["dense"]["w"], back["dense"]["w"]), (params["scale"][0], back["scale"][0])]
    for a, b in pairs:
        assert type(b).__module__.startswith("jax")
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rewrite_metadata(path, key, change):
    """Rewrite (or, where ``change`` returns None, remove) one ``__metadata__`` value of a
    safetensors file, keeping the tensors' bytes."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    value = change(header["__metadata__"][key])
    if value is None:
        del header["__metadata__"][key]
    else:
        header["__metadata__"][key] = value
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.fixture
def nested_ckpt(tmp_path):
    opt = {"state": {0: {"m": np.zeros(2, np.float32)}}, "param_groups": [{"lr": 0.001}]}
    path = tmp_path / "c"
    ac.save_checkpoint(path, {"w": np.ones(2)}, opt, ac.TrainingState(step=7, learning_rate=0.001))
    return path


def test_a_flipped_digit_in_the_tree_fails_its_checksum(nested_ckpt, capsys):
    from arrayckpt import cli

    opt = nested_ckpt / "optimizer.safetensors"
    _rewrite_metadata(opt, nested.TREE_KEY, lambda t: t.replace("0.001", "0.009"))
    with pytest.raises(ac.CorruptCheckpointError, match="fails its CRC32C"):
        ac.load_checkpoint(nested_ckpt)
    assert cli.main(["verify", str(nested_ckpt)]) == cli.EXIT_FAILED
    assert "fails its CRC32C" in capsys.readouterr().out


def test_a_malformed_tree_fails_verify_and_inspect_without_a_traceback(nested_ckpt, capsys):
    from arrayckpt import cli

    opt = nested_ckpt / "optimizer.safetensors"
    bad = '{"version":1,"root":{"dict":[["x",{"what":1}]]}}'
    _rewrite_metadata(opt, nested.TREE_KEY, lambda t: bad)
    _rewrite_metadata(opt, nested.TREE_CHECKSUM_KEY, lambda c: nested.checksum_of(bad))
    assert cli.main(["verify", str(nested_ckpt)]) == cli.EXIT_FAILED
    assert "malformed" in capsys.readouterr().out
    assert cli.main(["inspect", str(nested_ckpt)]) == cli.EXIT_FAILED
    assert "malformed" in capsys.readouterr().err
    with pytest.raises(ac.CorruptCheckpointError, match="malformed"):
        ac.load_checkpoint(nested_ckpt)


def test_a_tree_naming_tensors_the_file_lacks_fails_verify(nested_ckpt):
    from arrayckpt import inspection

    opt = nested_ckpt / "optimizer.safetensors"
    bad = '{"version":1,"root":{"dict":[["x",{"tensor":"nope"}]]}}'
    _rewrite_metadata(opt, nested.TREE_KEY, lambda t: bad)
    _rewrite_metadata(opt, nested.TREE_CHECKSUM_KEY, lambda c: nested.checksum_of(bad))
    report = inspection.verify(nested_ckpt)
    assert not report["ok"]
    assert any("'nope'" in e for f in report["files"] for e in f["errors"])


def test_a_flipped_digit_in_training_state_json_fails_its_checksum(nested_ckpt, capsys):
    from arrayckpt import cli

    state = nested_ckpt / "training_state.json"
    state.write_text(state.read_text().replace("0.001", "0.009"))
    with pytest.raises(ac.CorruptCheckpointError, match=r"training_state\.json fails the CRC32C"):
        ac.load_checkpoint(nested_ckpt)
    assert cli.main(["verify", str(nested_ckpt)]) == cli.EXIT_FAILED
    capsys.readouterr()


def test_checkpoints_without_tree_or_state_checksums_still_load(nested_ckpt):
    from arrayckpt.training_state import STATE_CHECKSUM_KEY

    for name, key in (
        ("optimizer.safetensors", nested.TREE_CHECKSUM_KEY),
        ("model.safetensors", STATE_CHECKSUM_KEY),
    ):
        _rewrite_metadata(nested_ckpt / name, key, lambda v: None)
    ckpt = ac.load_checkpoint(nested_ckpt)
    assert ckpt.optimizer["param_groups"] == [{"lr": 0.001}]
    assert ckpt.training_state.learning_rate == 0.001


def _deep(levels):
    state: Any = {"w": np.ones(1)}
    for _ in range(levels):
        state = {"a": state}
    return state


def test_state_nested_too_deeply_is_refused_at_save_naming_the_path(tmp_path):
    from arrayckpt.limits import MAX_TREE_DEPTH

    ac.save_checkpoint(tmp_path / "ok", _deep(MAX_TREE_DEPTH - 1))
    with pytest.raises(ac.InvalidInputError, match=r"model_state\['a'\].*deeper than"):
        ac.save_checkpoint(tmp_path / "deep", _deep(400))
    cyclic: list[Any] = [np.ones(1)]
    cyclic.append(cyclic)
    with pytest.raises(ac.InvalidInputError, match="deeper than"):
        ac.save_checkpoint(tmp_path / "cyclic", {"x": cyclic})
    assert not (tmp_path / "deep").exists() and not (tmp_path / "cyclic").exists()


def test_a_tree_nested_too_deeply_on_disk_is_corrupt_not_a_recursion_error():
    for levels in (150, 5000):
        root = '{"none":null}'
        for _ in range(levels):
            root = '{"list":[' + root + "]}"
        with pytest.raises(ac.CorruptCheckpointError, match="deeper than"):
            nested.unflatten('{"version":1,"root":' + root + "}", lambda n: None, set(), source="f")


@pytest.mark.parametrize("leaf", [__import__("pathlib").Path("/tmp"), {1, 2}, b"raw", object()])
def test_non_array_leaves_are_named_neither_array_nor_json_value(tmp_path, leaf):
    for state in ({"w": np.ones(1), "x": leaf}, {"nested": {"x": leaf}}):
        with pytest.raises(ac.UnsupportedArrayError, match="neither an array nor a JSON value"):
            ac.save_checkpoint(tmp_path / "c", state)
    assert not (tmp_path / "c").exists()


def test_json_values_and_numpy_scalars_come_back_as_saved_with_xp_torch(tmp_path):
    torch = pytest.importorskip("torch")
    opt = {
        "param_groups": [
            {
                "lr": 0.1,
                "betas": (0.9, 0.99),
                "name": "g",
                "fused": None,
                "step": np.int64(3),
                "scale": np.float32(0.5),
            }
        ],
        "state": {0: {"m": np.ones(2, np.float32)}},
    }
    ac.save_checkpoint(tmp_path, {"w": np.ones(1)}, opt)
    back = ac.load_checkpoint(tmp_path, xp=torch).optimizer
    group = back["param_groups"][0]
    assert type(group["lr"]) is float and group["betas"] == (0.9, 0.99) and group["fused"] is None
    assert type(group["step"]) is np.int64 and group["step"] == 3
    assert type(group["scale"]) is np.float32 and group["scale"] == np.float32(0.5)
    assert isinstance(back["state"][0]["m"], torch.Tensor)


def test_a_tree_text_is_reused_only_for_an_equal_tree():
    # `flatten` reuses the text of an equal root; anything that changes the text must miss
    state = {"w": np.zeros(2), "lr": 0.1, "betas": (0.9, 0.999), "step": 3}
    _, first = nested.flatten(state, what="x")
    for changed in (
        {**state, "lr": 0.2},
        {**state, "step": 3.0},  # 3 == 3.0, but an int is not a float
        {"lr": 0.1, "w": np.zeros(2), "betas": (0.9, 0.999), "step": 3},  # another order
        {**state, "betas": [0.9, 0.999]},  # a list is not a tuple
    ):
        _, text = nested.flatten(changed, what="x")
        assert text != first
        assert text == nested.to_text(nested.parse(text, source="x"))
    assert nested.flatten(dict(state), what="x")[1] == first


def test_signed_zeros_keep_their_sign_in_the_tree_text():
    # 0.0 == -0.0, so equal roots do not mean equal texts here
    _, plus = nested.flatten({"w": np.zeros(2), "lr": 0.0}, what="x")
    _, minus = nested.flatten({"w": np.zeros(2), "lr": -0.0}, what="x")
    assert '"float":-0.0' in minus and '"float":0.0' in plus
    _, minus32 = nested.flatten({"w": np.zeros(2), "g": [np.float32(-0.0)]}, what="x")
    assert '"float":-0.0' in minus32
