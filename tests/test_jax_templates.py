"""JAX state through pytree templates: new arrays in the template's structure (optax
states with .mu/.nu), typed PRNG keys, and a Flax + optax run resumed bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arrayckpt as ac

jax = pytest.importorskip("jax", reason="JAX templates need jax (nox -s tests installs it)")
jnp = pytest.importorskip("jax.numpy", reason="needs jax.numpy")
optax = pytest.importorskip("optax", reason="optax states need optax (nox -s tests installs it)")
nn = pytest.importorskip("flax.linen", reason="the Flax MLP needs flax (nox -s tests installs it)")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(1)(x)


def _setup() -> tuple[Any, Any, Any, Any, Any]:
    model, tx = MLP(), optax.adamw(1e-2, weight_decay=0.1)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    return model, tx, params, tx.init(params), jax.random.key(1, impl="rbg")


def _train(model: Any, tx: Any, params: Any, opt: Any, key: Any, steps: int) -> tuple:
    def loss_fn(p: Any, x: Any) -> Any:
        return jnp.mean((model.apply(p, x) - jnp.sum(x, axis=1, keepdims=True)) ** 2)

    @jax.jit
    def step(p: Any, o: Any, k: Any) -> tuple:
        k, sub = jax.random.split(k)
        x = jax.random.normal(sub, (8, 4))
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, k, loss

    losses = []
    for _ in range(steps):
        params, opt, key, loss = step(params, opt, key)
        losses.append(np.asarray(loss))
    return params, opt, key, losses


def _bits(tree: Any) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(tree)]


def test_flax_adamw_resume_is_bit_identical(tmp_path: Path) -> None:
    model, tx, params, opt, key = _setup()
    whole = _train(model, tx, params, opt, key, 6)

    p3, o3, k3, first = _train(model, tx, params, opt, key, 3)
    ac.save_checkpoint(tmp_path / "ckpt", p3, o3, extra={"key": k3})
    del p3, o3
    _, tx2, params_t, opt_t, _ = _setup()  # a fresh process would build its templates so
    ckpt = ac.load_checkpoint(tmp_path / "ckpt", into=params_t, optimizer_into=opt_t)
    assert isinstance(ckpt.optimizer[0], optax.ScaleByAdamState)
    assert ckpt.optimizer[0].mu.keys() == params_t.keys() and ckpt.optimizer[0].nu is not None
    restored_key = ckpt.extra["key"]
    assert jax.random.key_impl(restored_key) == jax.random.key_impl(k3)
    assert isinstance(ckpt.model["params"]["Dense_0"]["kernel"], jax.Array)
    p6, o6, k6, second = _train(model, tx2, ckpt.model, ckpt.optimizer, restored_key, 3)

    assert [x.tobytes() for x in first + second] == [x.tobytes() for x in whole[3]]
    assert _bits(p6) == _bits(whole[0]) and _bits(o6) == _bits(whole[1])
    assert _bits(jax.random.key_data(k6)) == _bits(jax.random.key_data(whole[2]))


def test_typed_keys_round_trip_as_typed_keys(tmp_path: Path) -> None:
    keys = {
        "fry": jax.random.key(3),
        "rbg": jax.random.key(4, impl="rbg"),
        "many": jax.random.split(jax.random.key(5), 3),
    }
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(1)}, extra=keys)
    back = ac.load_checkpoint(tmp_path / "c").extra
    for name, k in keys.items():
        assert back[name].dtype == k.dtype and back[name].shape == k.shape
        assert jax.random.key_impl(back[name]) == jax.random.key_impl(k)
        assert np.array_equal(jax.random.key_data(back[name]), jax.random.key_data(k))


def test_shape_dtype_struct_template_and_sharding(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {"w": jnp.arange(4.0), "step": jnp.int32(7)})
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = {
        "w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    model = ac.load_checkpoint(tmp_path / "c", into=template).model
    assert model["w"].sharding == sharding and model["step"].dtype == jnp.int32
    assert np.array_equal(model["w"], np.arange(4.0, dtype=np.float32))


def test_flax_struct_saves_as_its_fields_and_restores_as_itself(tmp_path: Path) -> None:
    struct = pytest.importorskip("flax.struct", reason="needs flax")

    @struct.dataclass
    class TrainState:
        params: Any
        opt_state: Any
        key: Any
        step: int = struct.field(pytree_node=False, default=0)

    _, _, params, opt, _ = _setup()
    state = TrainState(params, opt, jax.random.key(2), step=5)
    ac.save_checkpoint(tmp_path / "c", {"state": state})
    plain = ac.load_checkpoint(tmp_path / "c").model["state"]
    assert set(plain) == {"params", "opt_state", "key"}  # fields by name, no pickle
    zeros = jax.tree_util.tree_map(jnp.zeros_like, (params, opt))
    template = {"state": TrainState(*zeros, jax.random.key(0), step=5)}
    restored = ac.load_checkpoint(tmp_path / "c", into=template).model["state"]
    assert isinstance(restored, TrainState) and restored.step == 5
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert _bits(restored.params) == _bits(params) and _bits(restored.opt_state) == _bits(opt)
    assert np.array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))


def test_restore_takes_optimizer_template(tmp_path: Path) -> None:
    _, _, params, opt, _ = _setup()
    with ac.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, params, opt)
        ckpt = mgr.restore(into=params, optimizer_into=opt)
    assert ckpt is not None and ckpt.optimizer[0].count.dtype == opt[0].count.dtype
    assert _bits(ckpt.optimizer) == _bits(opt)


@pytest.mark.parametrize(
    ("template", "where"),
    [
        ({"w": jax.ShapeDtypeStruct((5,), jnp.float32)}, "['w']: the checkpoint has shape [4]"),
        ({"w": jax.ShapeDtypeStruct((4,), jnp.int32)}, "['w']: the checkpoint has dtype float32"),
        ({"w": jnp.zeros(4), "v": jnp.zeros(1)}, "['v']: the checkpoint has no 'v' here"),
        ({"w": (jnp.zeros(4),)}, "['w']: the template has 1 children here"),
    ],
)
def test_mismatch_names_the_path(tmp_path: Path, template: Any, where: str) -> None:
    ac.save_checkpoint(tmp_path / "c", {"w": np.arange(4, dtype=np.float32)})
    with pytest.raises(ac.InvalidInputError, match=r"model\.safetensors") as info:
        ac.load_checkpoint(tmp_path / "c", into=template)
    assert where in str(info.value)


def test_flax_nnx_state_with_rngs_resumes_bit_identical(tmp_path: Path) -> None:
    nnx = pytest.importorskip("flax.nnx", reason="the NNX model needs flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.l1 = nnx.Linear(4, 16, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)  # draws from the Rngs: typed keys saved
            self.l2 = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.l2(self.drop(nnx.relu(self.l1(x))))

    def fresh() -> tuple[Any, Any]:
        net = Net(nnx.Rngs(0))
        return net, nnx.Optimizer(net, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(net: Any, opt: Any, x: Any) -> Any:
        def loss_fn(n: Any) -> Any:
            return jnp.mean((n(x) - jnp.sum(x, axis=1, keepdims=True)) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        opt.update(net, grads)
        return loss

    xs = jax.random.normal(jax.random.key(9), (6, 8, 4))

    def train(net: Any, opt: Any, start: int, stop: int) -> list[bytes]:
        return [np.asarray(step(net, opt, xs[i])).tobytes() for i in range(start, stop)]

    net, opt = fresh()
    whole = train(net, opt, 0, 6)
    _, whole_state = nnx.split((net, opt))

    net, opt = fresh()
    first = train(net, opt, 0, 3)
    _, state = nnx.split((net, opt))
    ac.save_checkpoint(tmp_path / "c", {"nnx": state})
    graph, abstract = nnx.split(nnx.eval_shape(fresh))
    restored = ac.load_checkpoint(tmp_path / "c", into={"nnx": abstract}).model["nnx"]
    net2, opt2 = nnx.merge(graph, restored)
    second = train(net2, opt2, 3, 6)
    _, end_state = nnx.split((net2, opt2))

    assert first + second == whole

    def raw(tree: Any) -> list[bytes]:
        out = []
        for leaf in jax.tree_util.tree_leaves(tree):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                out.append(b"key:" + np.asarray(jax.random.key_data(leaf)).tobytes())
            else:
                out.append(np.asarray(leaf).tobytes())
        return out

    assert any(b.startswith(b"key:") for b in raw(end_state)), "the Rngs' keys are state"
    assert raw(end_state) == raw(whole_state)
