"""Saving the same JAX state again reuses what the first save found (the host views it
shares, the checks), and never a stale result: a replaced, deleted or dead array, a new
key, a big-endian dtype or a PRNG key is seen by the next save."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import backends, statecache, templates
from arrayckpt.backends.generic import GenericBackend

jax = pytest.importorskip("jax", reason="JAX state needs jax (nox -s tests installs it)")
jnp = pytest.importorskip("jax.numpy", reason="needs jax.numpy")


def _state(n: int = 4) -> dict[str, Any]:
    return {f"p{i}": jnp.arange(8, dtype=jnp.float32) + i for i in range(n)}


def _saved(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in ac.load_checkpoint(path).model.items()}


@pytest.fixture
def ckpt():
    with ac.AsyncCheckpointer() as c:
        yield c


def _entry(state: dict[str, Any]) -> statecache.Entry:
    found = [e for e in statecache._entries if e.keys == list(state)]
    assert found, "the state has no entry"
    return found[0]


def test_a_second_save_of_the_same_jax_arrays_reads_none_of_them_again(tmp_path, ckpt, monkeypatch):
    state = _state()
    ckpt.save(tmp_path / "a", state).result()
    calls = []
    real = GenericBackend.immutable_host_view
    monkeypatch.setattr(
        GenericBackend,
        "immutable_host_view",
        lambda self, x, dtype: calls.append(1) or real(self, x, dtype),
    )
    ckpt.save(tmp_path / "b", state).result()
    assert calls == []
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_a_replaced_jax_array_is_saved_with_its_new_values(tmp_path, ckpt):
    state = _state()
    ckpt.save(tmp_path / "a", state).result()
    state["p1"] = jnp.full(8, 7.0, jnp.float32)  # same shape and dtype, a new array
    ckpt.save(tmp_path / "b", state).result()
    np.testing.assert_array_equal(_saved(tmp_path / "b")["p1"], np.full(8, 7.0, np.float32))


def test_an_added_or_removed_jax_array_is_seen(tmp_path, ckpt):
    state = _state()
    ckpt.save(tmp_path / "a", state).result()
    state["new"] = jnp.ones(2)
    del state["p0"]
    ckpt.save(tmp_path / "b", state).result()
    assert sorted(_saved(tmp_path / "b")) == ["new", "p1", "p2", "p3"]


def test_a_jax_array_deleted_since_the_last_save_is_refused_as_on_a_first_save(tmp_path, ckpt):
    state = _state()
    ckpt.save(tmp_path / "a", state).result()
    state["p2"].delete()  # as donating it to a jitted step does
    # the same objects as the cached entry's, but no longer readable: refused, naming it
    with pytest.raises(ac.UnsupportedArrayError, match=r"'p2'.*deleted"):
        ckpt.save(tmp_path / "b", state)
    assert not (tmp_path / "b").exists()


def test_the_cache_keeps_no_jax_array_alive(tmp_path, ckpt):
    # a NumPy view of a JAX buffer keeps its jax.Array alive: the entry must hold none
    state = _state()
    ckpt.save(tmp_path / "a", state).result()
    ckpt.save(tmp_path / "b", state).result()  # the entry is used, not only made
    assert _entry(state).shares_all
    array = weakref.ref(state["p0"])
    del state
    gc.collect()
    assert array() is None


def test_a_state_with_a_deleted_array_is_not_cached():
    state = _state()
    state["p0"].delete()
    assert statecache.entry_for(state) is None


def test_jax_states_with_prng_keys_or_other_values_are_not_cached():
    assert statecache.entry_for({"a": jnp.zeros(2)}) is not None
    assert statecache.entry_for({"a": jax.random.key(0)}) is None
    assert statecache.entry_for({"a": jnp.zeros(2), "b": np.zeros(2)}) is None
    assert statecache.entry_for({1: jnp.zeros(2)}) is None  # type: ignore[dict-item]


def test_a_key_still_saves_as_a_key_after_plain_arrays_of_its_kind(tmp_path):
    # `templates.is_array_leaf` remembers array types and dtypes: a key's must not be
    # mistaken for a plain array's
    assert templates.is_array_leaf(jnp.zeros(2, jnp.uint32))
    key = jax.random.key(5)
    assert not templates.is_array_leaf(key)
    ac.save_checkpoint(tmp_path / "k", {"w": jnp.zeros(2), "key": key})
    back = ac.load_checkpoint(tmp_path / "k", into={"w": jnp.zeros(2), "key": key}).model
    assert jax.random.key_impl(back["key"]) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(back["key"]), jax.random.key_data(key))


def test_the_dtype_cache_tells_byte_orders_apart():
    backend = backends.for_array(jnp.zeros(1), "x")
    little = SimpleNamespace(dtype=np.dtype("<f4"))
    assert backend.dtype(little, "x").code == "F32"
    with pytest.raises(ac.UnsupportedArrayError, match="'big'"):
        backend.dtype(SimpleNamespace(dtype=np.dtype(">f4")), "big")


def test_an_array_over_two_devices_is_not_shared_after_one_device_arrays():
    # `GenericBackend` remembers per sharding whether it is one CPU buffer
    backend = backends.for_array(jnp.zeros(1), "x")
    one = jnp.zeros(4)
    dtype = backend.dtype(one, "x")
    assert backend.immutable_host_view(one, dtype) is not None

    class TwoCpus:  # hashable, as JAX's shardings are
        device_set = frozenset([SimpleNamespace(platform="cpu").__class__, object])

    class Spread:  # a JAX-like array laid over two devices
        __module__ = "jax.fake"
        sharding = TwoCpus()

        def is_deleted(self) -> bool:
            return False

    assert backend.immutable_host_view(Spread(), dtype) is None


def test_a_bad_leaf_deep_in_a_tree_is_named_by_its_path(tmp_path):
    state = {"params": {"dense": [jnp.zeros(2), {"scale": object()}]}}
    with pytest.raises(ac.CheckpointError, match=r"\['params'\]\['dense'\]\[1\]\['scale'\]"):
        ac.save_checkpoint(tmp_path / "x", state)
