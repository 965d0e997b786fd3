"""`load_checkpoint(..., into=...)` fills existing arrays in place."""

from __future__ import annotations

import numpy as np
import pytest

import arrayckpt as ac


def test_numpy_arrays_are_filled_in_place(tmp_path):
    saved = {"w": np.arange(4, dtype=np.float32), "cfg": {"n": np.int64(3), "lr": 0.5}}
    ac.save_checkpoint(tmp_path, saved)
    target = {"w": np.zeros(4, np.float32), "cfg": {"n": np.zeros((), np.int64), "lr": 0.0}}
    w = target["w"]
    out = ac.load_checkpoint(tmp_path, into=target).model
    assert out is target and target["w"] is w
    np.testing.assert_array_equal(w, np.arange(4, dtype=np.float32))
    assert target["cfg"]["n"] == 3 and target["cfg"]["lr"] == 0.5


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ({"w": np.zeros(5, np.float32)}, r"F32\[4\] in the checkpoint but F32\[5\]"),
        ({"w": np.zeros(4, np.float64)}, r"F32\[4\] in the checkpoint but F64\[4\]"),
        ({"v": np.zeros(4, np.float32)}, "keys differ"),
        ({"w": [0.0] * 4}, "not an array"),
        ({"w": {"x": np.zeros(4, np.float32)}}, "goes into a dict"),
    ],
)
def test_mismatches_are_refused_naming_the_tensor(tmp_path, target, match):
    ac.save_checkpoint(tmp_path, {"w": np.arange(4, dtype=np.float32)})
    with pytest.raises(ac.InvalidInputError, match=match):
        ac.load_checkpoint(tmp_path, into=target)


def test_read_only_targets_are_refused(tmp_path):
    ac.save_checkpoint(tmp_path, {"w": np.arange(4, dtype=np.float32)})
    w = np.zeros(4, np.float32)
    w.flags.writeable = False
    with pytest.raises(ac.InvalidInputError, match="read-only"):
        ac.load_checkpoint(tmp_path, into={"w": w})


def test_into_and_keys_do_not_combine(tmp_path):
    ac.save_checkpoint(tmp_path, {"w": np.ones(1)})
    with pytest.raises(ac.InvalidInputError, match="cannot be combined"):
        ac.load_checkpoint(tmp_path, into={"w": np.ones(1)}, keys=["w"])


def test_torch_model_state_dict_is_filled_without_new_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    trained(torch.randn(5, 3))  # moves BatchNorm's running statistics
    ac.save_checkpoint(tmp_path, trained.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ptr = fresh[0].weight.data_ptr()
    ac.load_checkpoint(tmp_path, into=fresh.state_dict())
    assert fresh[0].weight.data_ptr() == ptr
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_bfloat16_torch_tensors_are_filled(tmp_path):
    torch = pytest.importorskip("torch")
    src = {"w": torch.randn(3, 3).to(torch.bfloat16)}
    ac.save_checkpoint(tmp_path, src)
    dst = {"w": torch.zeros(3, 3, dtype=torch.bfloat16)}
    ac.load_checkpoint(tmp_path, into=dst)
    assert torch.equal(src["w"], dst["w"])


def test_jax_arrays_are_a_template_not_filled_in_place(tmp_path):
    jnp = pytest.importorskip("jax.numpy", reason="needs jax")
    ac.save_checkpoint(tmp_path, {"w": np.ones(2, np.float32)})
    template = {"w": jnp.zeros(2, jnp.float32)}
    model = ac.load_checkpoint(tmp_path, into=template).model
    assert model is not template and np.array_equal(model["w"], np.ones(2, np.float32))
    assert np.array_equal(template["w"], np.zeros(2, np.float32))  # immutable: untouched


@pytest.mark.gpu
def test_cuda_tensors_are_filled_on_their_device(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    src = {"w": torch.randn(64, 64), "step": torch.tensor(3)}
    ac.save_checkpoint(tmp_path, src)
    dst = {
        "w": torch.zeros(64, 64, device="cuda"),
        "step": torch.zeros((), dtype=torch.int64, device="cuda"),
    }
    ptr = dst["w"].data_ptr()
    ac.load_checkpoint(tmp_path, into=dst)
    assert dst["w"].is_cuda and dst["w"].data_ptr() == ptr
    assert torch.equal(dst["w"].cpu(), src["w"]) and int(dst["step"]) == 3
