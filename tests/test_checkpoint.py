"""save_checkpoint / load_checkpoint: exact round trips across every backend, and input errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    XP_NAMES,
    arrays,
    assert_same_array,
    available_backends,
    backend_arrays,
    backend_dtypes,
    dtypes,
    layouts,
    shapes,
    states,
    tensor_names,
    to_backend,
    training_states,
    with_layout,
)

import arrayckpt as ac
from arrayckpt import dtypes as ac_dtypes
from arrayckpt import fsops
from arrayckpt.layout import MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE


def _fresh(tmp_path: Path) -> Path:
    """A new checkpoint path per Hypothesis example (tmp_path is shared by all of them)."""
    n = len(list(tmp_path.iterdir()))
    return tmp_path / f"ckpt_{n}"


def _check_loads(path: Path, expected: dict[str, np.ndarray], **kwargs: Any) -> None:
    """Load ``path`` into every backend: exact where it holds the dtype, else a clear error."""
    for backend in available_backends():
        if all(_code(a) in backend_dtypes(backend) for a in expected.values()):
            model, _, _ = ac.load_checkpoint(path, xp=XP_NAMES[backend], **kwargs)
            assert set(model) == set(expected)
            for name, a in expected.items():
                assert_same_array(model[name], a, f"{backend}: {name!r}")
        else:
            with pytest.raises(ac.UnsupportedArrayError, match="tensor"):
                ac.load_checkpoint(path, xp=XP_NAMES[backend], **kwargs)


def _code(a: np.ndarray) -> str:
    return ac_dtypes.from_numpy(a.dtype, tensor="?").code


# 64-bit JAX: puts float64/int64/uint64 arrays through JAX (32-bit by default).
@pytest.mark.usefixtures("jax_x64")
@given(data=st.data())
def test_round_trip_every_backend_dtype_shape_layout(tmp_path: Path, data: st.DataObject) -> None:
    expected, x, _, _ = data.draw(backend_arrays())
    name = data.draw(tensor_names())
    path = ac.save_checkpoint(_fresh(tmp_path), {name: x})
    _check_loads(path, {name: expected})


# 64-bit JAX: puts float64/int64/uint64 arrays through JAX (32-bit by default).
@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("code", sorted(d.code for d in ac_dtypes.BY_NAME.values()))
def test_every_dtype_every_backend_saves_and_loads(tmp_path: Path, code: str) -> None:
    """A deterministic sweep, so every (dtype, backend) pair runs on every test run."""
    a = np.frombuffer(bytes(range(256)) * 2, np.uint8)[: 6 * ac_dtypes.BY_CODE[code].itemsize]
    a = a.copy()
    a = (a % 2).astype(bool) if code == "BOOL" else a.view(ac_dtypes.BY_CODE[code].numpy)
    a = a.reshape(2, 3)
    for i, backend in enumerate(available_backends()):
        if code not in backend_dtypes(backend):
            continue
        for layout in ("c", "fortran", "strided", "reversed", "big_endian"):
            path = ac.save_checkpoint(
                tmp_path / f"{backend}_{layout}_{i}", {"t": to_backend(a, backend, layout)}
            )
            _check_loads(path, {"t": a})


# 64-bit JAX: puts float64/int64/uint64 arrays through JAX (32-bit by default).
@pytest.mark.usefixtures("jax_x64")
@given(state=states(min_size=1), opt=states(), layout=layouts(), data=st.data())
def test_mixed_frameworks_in_one_mapping(
    tmp_path: Path,
    state: dict[str, np.ndarray],
    opt: dict[str, np.ndarray],
    layout: str,
    data: st.DataObject,
) -> None:
    def mixed(s: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {}
        for name, a in s.items():
            holders = [b for b in available_backends() if _code(a) in backend_dtypes(b)]
            out[name] = to_backend(a, data.draw(st.sampled_from(holders)), layout)
        return out

    ts = data.draw(training_states())
    path = ac.save_checkpoint(_fresh(tmp_path), mixed(state), mixed(opt), ts)
    model, optimizer, loaded_ts = ac.load_checkpoint(path)
    for name, a in state.items():
        assert_same_array(model[name], a, name)
    if opt:
        assert optimizer is not None and set(optimizer) == set(opt)
        for name, a in opt.items():
            assert_same_array(optimizer[name], a, name)
    else:
        assert optimizer is None
        assert not (path / OPTIMIZER_FILE).exists()
    assert loaded_ts == ts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_requires_grad_tensors(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    t = torch.linspace(-2, 2, 12, dtype=getattr(torch, dtype)).reshape(3, 4).requires_grad_()
    y = (t * 3)[:, ::2]  # a non-leaf, strided view that is part of a graph
    ac.save_checkpoint(tmp_path / "c", {"leaf": t, "view": y})
    model, _, _ = ac.load_checkpoint(tmp_path / "c", xp=torch)
    assert torch.equal(model["leaf"], t.detach()) and not model["leaf"].requires_grad
    assert torch.equal(model["view"], y.detach())
    assert model["view"].dtype == y.dtype


def test_odd_strides_that_torch_calls_contiguous(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    base = torch.arange(10, dtype=torch.float32)
    one = base[3:4:2]  # shape (1,), stride (2,): contiguous by torch's rule
    empty = base[5:5:3]
    ac.save_checkpoint(tmp_path / "c", {"one": one, "empty": empty, "scalar": base[7]})
    model, _, _ = ac.load_checkpoint(tmp_path / "c", xp=torch)
    assert model["one"].tolist() == [3.0]
    assert model["empty"].shape == (0,)
    assert model["scalar"].shape == () and model["scalar"].item() == 7.0


@given(a=arrays(shape=shapes()), verify=st.booleans(), mmap=st.booleans())
def test_load_options_mmap_and_verify(
    tmp_path: Path, a: np.ndarray, verify: bool, mmap: bool
) -> None:
    path = ac.save_checkpoint(_fresh(tmp_path), {"a": a})
    model, _, _ = ac.load_checkpoint(path, verify=verify, mmap=mmap)
    assert_same_array(model["a"], a)
    model["a"][...] = model["a"]  # loaded arrays are writable; writes never reach the file
    if model["a"].size:
        model["a"].reshape(-1).view(np.uint8)[0] ^= 0xFF
    again, _, _ = ac.load_checkpoint(path)
    assert_same_array(again["a"], a)


def test_xp_as_module_or_name(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    path = ac.save_checkpoint(tmp_path / "c", {"a": a})
    for xp in (None, np, "numpy", "np"):
        m, _, _ = ac.load_checkpoint(path, xp=xp)
        assert isinstance(m["a"], np.ndarray)
        assert_same_array(m["a"], a)
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    for xp in (torch, "torch"):
        m, _, _ = ac.load_checkpoint(path, xp=xp)
        assert isinstance(m["a"], torch.Tensor)
        assert_same_array(m["a"], a)


def test_xp_strict_namespace_and_device(tmp_path: Path) -> None:
    xs = pytest.importorskip("array_api_strict", reason="array_api_strict is not installed")
    a = np.arange(6, dtype=np.float32)
    path = ac.save_checkpoint(tmp_path / "c", {"a": a})
    m, _, _ = ac.load_checkpoint(path, xp=xs, device=xs.Device("CPU_DEVICE"))
    assert m["a"].device == xs.Device("CPU_DEVICE")
    assert_same_array(m["a"], a)
    with pytest.raises(ac.UnsupportedArrayError, match=r"tensor 'h'.*float16"):
        ac.load_checkpoint(ac.save_checkpoint(tmp_path / "h", {"h": a.astype(np.float16)}), xp=xs)


def test_jax_without_x64_refuses_instead_of_truncating(tmp_path: Path) -> None:
    pytest.importorskip("jax", reason="JAX is not installed (pip install jax)")
    import jax

    path = ac.save_checkpoint(tmp_path / "c", {"w": np.arange(3.0), "i": np.arange(3)})
    with jax.enable_x64(False), pytest.raises(ac.UnsupportedArrayError, match=r"float64|int64"):
        ac.load_checkpoint(path, xp="jax.numpy")
    with jax.enable_x64(True):
        m, _, _ = ac.load_checkpoint(path, xp="jax", device=jax.devices("cpu")[0])
        assert str(m["w"].dtype) == "float64" and str(m["i"].dtype) == "int64"
        assert m["w"].devices() == {jax.devices("cpu")[0]}


@pytest.mark.parametrize(
    ("xp", "device"),
    [
        (None, "cuda"),
        (None, "tpu:0"),
        ("torch", "not-a-device"),
        ("torch", 3.5),
        ("array_api_strict", "not-a-device"),
        ("jax", "not-a-device"),
    ],
)
def test_bad_device_is_invalid_input(tmp_path: Path, xp: str | None, device: Any) -> None:
    if xp is not None:
        pytest.importorskip(xp, reason=f"{xp} is not installed")
    path = ac.save_checkpoint(tmp_path / "c", {"a": np.zeros(2)})
    with pytest.raises(ac.InvalidInputError):
        ac.load_checkpoint(path, xp=xp, device=device)


def test_cuda_device_without_a_gpu_is_invalid_input(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: 'cuda' is a valid device here")
    path = ac.save_checkpoint(tmp_path / "c", {"a": np.zeros(2)})
    with pytest.raises(ac.InvalidInputError, match="cuda"):
        ac.load_checkpoint(path, xp=torch, device="cuda")


@pytest.mark.parametrize("xp", ["no_such_module_xyz", 3, object()])
def test_bad_xp_is_invalid_input(tmp_path: Path, xp: Any) -> None:
    path = ac.save_checkpoint(tmp_path / "c", {"a": np.zeros(2)})
    with pytest.raises(ac.InvalidInputError, match="xp"):
        ac.load_checkpoint(path, xp=xp)


# --------------------------------------------------------------------------- bad input


class NotAnArray:
    pass


# Lists, scalars, None, str and nested dicts are valid nested state (see test_nested.py);
# values that are neither arrays nor JSON leaves are refused.
@pytest.mark.parametrize("value", [b"bytes", NotAnArray(), {1.5j}], ids=lambda v: type(v).__name__)
def test_non_array_value_named_before_anything_is_written(ckpt_dir: Path, value: Any) -> None:
    state = {"good": np.zeros(3), "layer.bad": value}
    with pytest.raises(ac.UnsupportedArrayError) as info:
        ac.save_checkpoint(ckpt_dir, state)
    assert "'layer.bad'" in str(info.value)
    assert type(value).__name__ in str(info.value)
    assert not ckpt_dir.exists()
    assert list(ckpt_dir.parent.iterdir()) == []


def _unsupported_values() -> list[tuple[Any, str]]:
    """(value, what the message must name besides the tensor)."""
    values: list[tuple[Any, str]] = [
        (np.zeros(2, np.complex128), "complex128"),
        (np.array([object()]), "object"),
        (np.array(["a"]), "str"),
        (np.zeros(2, "M8[s]"), "datetime64"),
        (np.zeros(2, [("a", "f4")]), "void"),
        (np.zeros(2, np.longdouble), "float"),
        (np.ma.masked_array([1.0, 2.0], mask=[0, 1]), "mask"),
    ]
    try:
        import torch
    except ImportError:
        return values
    return [
        *values,
        (torch.zeros(2, dtype=torch.complex128), "torch.complex128"),
        (torch.zeros(2).to_sparse(), "sparse"),
        (torch.zeros(2, device="meta"), "meta"),
    ]


@pytest.mark.parametrize(
    ("value", "named"),
    _unsupported_values(),
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_unsupported_dtype_names_tensor_and_dtype(ckpt_dir: Path, value: Any, named: str) -> None:
    with pytest.raises(ac.UnsupportedArrayError) as info:
        ac.save_checkpoint(ckpt_dir, {"good": np.zeros(1)}, {"opt.state": value})
    assert "'opt.state'" in str(info.value)
    assert named in str(info.value)
    assert not ckpt_dir.exists()


@pytest.mark.parametrize("key", ["", "a\x00b", "__metadata__", "\ud800"], ids=repr)
def test_bad_keys_are_invalid_input(ckpt_dir: Path, key: Any) -> None:
    with pytest.raises(ac.InvalidInputError, match="key"):
        ac.save_checkpoint(ckpt_dir, {key: np.zeros(1)})
    assert not ckpt_dir.exists()


@pytest.mark.parametrize("state", [np.zeros(2), "abc"], ids=repr)
def test_state_that_is_not_a_mapping(ckpt_dir: Path, state: Any) -> None:
    with pytest.raises(ac.InvalidInputError, match="mapping"):
        ac.save_checkpoint(ckpt_dir, state)
    assert not ckpt_dir.exists()


def test_training_state_of_wrong_type(ckpt_dir: Path) -> None:
    with pytest.raises(ac.InvalidInputError, match="TrainingState"):
        ac.save_checkpoint(ckpt_dir, {}, training_state={"step": 1})  # type: ignore[arg-type]
    assert not ckpt_dir.exists()


@pytest.mark.parametrize("opt", [None, {}])
def test_optimizer_file_absent_when_empty(ckpt_dir: Path, opt: dict[str, Any] | None) -> None:
    ac.save_checkpoint(ckpt_dir, {"w": np.ones(2)}, opt)
    assert sorted(os.listdir(ckpt_dir)) == [MODEL_FILE, TRAINING_STATE_FILE]
    assert ac.load_checkpoint(ckpt_dir).optimizer is None


def test_empty_model_and_default_training_state(ckpt_dir: Path) -> None:
    ac.save_checkpoint(ckpt_dir, {})
    model, optimizer, ts = ac.load_checkpoint(ckpt_dir)
    assert model == {} and optimizer is None
    assert ts == ac.TrainingState(step=0)


def test_checkpoint_unpacks_as_named_tuple(ckpt_dir: Path) -> None:
    ac.save_checkpoint(ckpt_dir, {"w": np.ones(1)}, {"m": np.zeros(1)}, ac.TrainingState(5))
    ckpt = ac.load_checkpoint(ckpt_dir)
    m, o, s = ckpt
    assert ckpt.model is m and ckpt.optimizer is o and ckpt.training_state is s
    assert s.step == 5 and o is not None and set(o) == {"m"}


# ---------------------------------------------------------------------------- not found


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ac.CheckpointNotFoundError, match="nope"):
        ac.load_checkpoint(tmp_path / "nope")


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ac.CheckpointNotFoundError):
        ac.load_checkpoint(tmp_path / "f")


@pytest.mark.parametrize("missing", [MODEL_FILE, TRAINING_STATE_FILE])
def test_missing_file(ckpt_dir: Path, missing: str) -> None:
    ac.save_checkpoint(ckpt_dir, {"w": np.ones(2)}, {"m": np.ones(1)})
    (ckpt_dir / missing).unlink()
    with pytest.raises(ac.CheckpointNotFoundError, match=missing.replace(".", r"\.")):
        ac.load_checkpoint(ckpt_dir)
    assert issubclass(ac.CheckpointNotFoundError, FileNotFoundError)


def test_missing_optimizer_file_means_no_optimizer(ckpt_dir: Path) -> None:
    ac.save_checkpoint(ckpt_dir, {"w": np.ones(2)}, {"m": np.ones(1)})
    (ckpt_dir / OPTIMIZER_FILE).unlink()
    assert ac.load_checkpoint(ckpt_dir).optimizer is None


@settings(max_examples=10)
@given(state=states(dtype=dtypes(frozenset({"F32", "BF16", "I64"})), min_size=1))
def test_caller_may_mutate_arrays_after_save(tmp_path: Path, state: dict[str, np.ndarray]) -> None:
    held = {k: v.copy() for k, v in state.items()}
    path = ac.save_checkpoint(_fresh(tmp_path), held)
    for v in held.values():
        v.reshape(-1).view(np.uint8)[:] = 0x5A
    model, _, _ = ac.load_checkpoint(path)
    for k, v in state.items():
        assert_same_array(model[k], v, k)


@pytest.mark.parametrize("mmap", [True, False])
def test_resave_loaded_arrays_into_the_same_directory(ckpt_dir: Path, mmap: bool) -> None:
    """Arrays mapped from the old files stay valid while the new ones replace them."""
    w = np.arange(1000, dtype=np.float32)
    ac.save_checkpoint(ckpt_dir, {"w": w}, {"m": np.ones(3)}, ac.TrainingState(1))
    model, opt, _ = ac.load_checkpoint(ckpt_dir, mmap=mmap)
    ac.save_checkpoint(ckpt_dir, model, opt, ac.TrainingState(2))
    assert_same_array(model["w"], w)  # still readable after its file was replaced
    again, _, ts = ac.load_checkpoint(ckpt_dir)
    assert ts.step == 2
    assert_same_array(again["w"], w)


def test_each_backend_saves_and_loads_its_own_arrays(tmp_path: Path, backend_name: str) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = ac.save_checkpoint(tmp_path / "c", {"a": to_backend(a, backend_name, "fortran")})
    device = "cuda:0" if backend_name == "torch-cuda" else None
    model, _, _ = ac.load_checkpoint(path, xp=XP_NAMES[backend_name], device=device)
    assert_same_array(model["a"], a, backend_name)


def test_parameters_state_dict_and_memmap(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    layer = torch.nn.Linear(3, 2)
    mm = np.memmap(tmp_path / "mm.bin", dtype=np.float32, mode="w+", shape=(4,))
    mm[:] = 5
    state = {
        "weight": layer.weight,
        **{f"sd.{k}": v for k, v in layer.state_dict().items()},
        "mm": mm,
    }
    ac.save_checkpoint(tmp_path / "c", state)
    model, _, _ = ac.load_checkpoint(tmp_path / "c", xp=torch)
    assert torch.equal(model["weight"], layer.weight.detach())
    assert torch.equal(model["sd.bias"], layer.bias.detach())
    assert model["mm"].tolist() == [5.0] * 4


class RangeLog(fsops.FileSystem):
    """Records every byte range read through fsops."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, fd: int, path: Path, ranges: Any, out: memoryview) -> None:
        ranges = list(ranges)
        self.reads += [(Path(path).name, offset, length) for offset, length in ranges]
        super().read_into(fd, path, ranges, out)


def test_eager_partial_load_reads_only_the_header_and_the_requested_tensors(tmp_path):
    big, small = np.arange(1 << 16, dtype=np.float32), np.arange(3, dtype=np.int64)
    ac.save_checkpoint(tmp_path, {"big": big, "small": small, "other": np.ones(5)})
    header = ac.format.SafetensorsReader(tmp_path / MODEL_FILE).header
    entry = header.entries["small"]
    log = RangeLog()
    with fsops.use(log):
        got = ac.load_checkpoint(tmp_path, keys=["small"], mmap=False, optimizer=False).model
    np.testing.assert_array_equal(got["small"], small)
    model_reads = [(o, n) for f, o, n in log.reads if f == MODEL_FILE]
    tensor = (entry.start, entry.end - entry.start)
    assert model_reads == [(0, 8), (8, header.data_start - 8), tensor]


def test_eager_partial_load_still_verifies_checksums(tmp_path):
    ac.save_checkpoint(tmp_path, {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)})
    entry = ac.format.SafetensorsReader(tmp_path / MODEL_FILE).header.entries["b"]
    with open(tmp_path / MODEL_FILE, "r+b") as f:
        f.seek(entry.start)
        f.write(b"\x07")
    a = ac.load_checkpoint(tmp_path, keys=["a"], mmap=False).model["a"]
    np.testing.assert_array_equal(a, 0)  # the corrupt tensor is not read
    with pytest.raises(ac.CorruptCheckpointError, match="'b' fails its CRC32C"):
        ac.load_checkpoint(tmp_path, keys=["b"], mmap=False)
    assert ac.load_checkpoint(tmp_path, keys=["b"], mmap=False, verify=False).model["b"][0] != 1


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(dtypes(), shapes(max_dims=3, max_side=4), layouts()), min_size=2, max_size=12
    ).flatmap(
        lambda specs: st.tuples(
            *(
                arrays(code, shape).map(lambda a, lay=lay: with_layout(a, lay))
                for code, shape, lay in specs
            )
        )
    )
)
def test_small_arrays_share_one_slab_and_keep_their_bytes(arrays_: tuple[np.ndarray, ...]) -> None:
    from arrayckpt.snapshot import take_snapshot
    from arrayckpt.staging import StagingPool

    state = {f"t{i}": a for i, a in enumerate(arrays_)}
    expected = {k: a.copy() for k, a in state.items()}
    pool = StagingPool()
    for _ in range(2):  # the second snapshot reuses the first one's slab
        snap = take_snapshot(state, state, None, staging=pool)
        for part in (snap.model, snap.optimizer):
            for key, t in part.items():
                assert_same_array(t.data, expected[key], key)
                assert t.data.flags.c_contiguous and t.data.dtype.byteorder in "=|<"
                if t.address is not None and t.nbytes:  # an empty view has no address
                    assert t.address == t.data.__array_interface__["data"][0], key
                # The snapshot owns its bytes: none is a view of the caller's array.
                assert not np.shares_memory(t.data, state[key]), key
    for a in state.values():
        if a.size and a.flags.writeable:
            a.reshape(-1)[...] = 0 if a.dtype != bool else False
    for key, t in snap.model.items():
        assert_same_array(t.data, expected[key], key)


def test_small_arrays_are_copied_into_one_reused_slab() -> None:
    from arrayckpt.snapshot import take_snapshot
    from arrayckpt.staging import StagingPool

    state = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.ones(3, np.float32),
        "m": np.array([True, False]),
        "s": np.array(2.5),
        "big_endian": np.arange(3, dtype=">i4"),
        "strided": np.arange(8)[::2],
    }
    pool = StagingPool()
    first = take_snapshot(state, None, None, staging=pool).model
    second = take_snapshot(state, None, None, staging=pool).model
    in_slab = {k for k, t in first.items() if t.address is not None}
    assert in_slab == {"a", "b", "m", "s"}  # the others need a conversion: buffers of their own
    for key in in_slab:
        assert second[key].address == first[key].address  # the warm slab, reused
        np.testing.assert_array_equal(second[key].data, state[key])
    np.testing.assert_array_equal(second["big_endian"].data, [0, 1, 2])
    assert second["big_endian"].data.dtype.byteorder in "=<"


def test_keys_from_a_generator_are_read_once_and_all_loaded(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path, {"w": np.ones(2, np.float32), "b": np.zeros(1, np.float32)})
    loaded = ac.load_checkpoint(tmp_path, keys=(k for k in ["w", "b"])).model
    assert sorted(loaded) == ["b", "w"]


SIGINT_CHILD = """
import os, sys
import numpy as np
import arrayckpt as ac

root = sys.argv[1]
model = {"w": np.ones(4 << 20, np.float32)}
optimizer = {"m": np.ones(4 << 20, np.float32)}  # a second file: a second writer thread
interrupted = 0
print("ready", flush=True)
while interrupted < int(sys.argv[2]):
    try:
        ac.save_checkpoint(root + "/c", model, optimizer)
    except KeyboardInterrupt:
        interrupted += 1
        left = [n for n in os.listdir(root) if ".arrayckpt-" in n]
        print("left" if left else "clean", *left, flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="sends a real SIGINT")
def test_ctrl_c_during_a_synchronous_save_leaves_no_temporary_directory(tmp_path: Path) -> None:
    import random
    import select
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "root").mkdir()
    trials = 40
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_CHILD, str(tmp_path / "root"), str(trials)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert child.stdout is not None
    answers = []
    try:
        assert child.stdout.readline().strip() == "ready"
        rng = random.Random(0)
        for _ in range(trials):
            # Spread over a save's duration: mid-write, mid-join, mid-commit, mid-cleanup.
            threading.Event().wait(rng.uniform(0.005, 0.15))
            child.send_signal(signal.SIGINT)
            # A lost Ctrl-C (the child saves on, answering nothing) fails, not hangs.
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, f"the child ignored Ctrl-C number {len(answers) + 1}"
            answers.append(child.stdout.readline().split())
        assert child.wait(timeout=120) == 0
    finally:
        child.kill()
    assert [a for a in answers if a[:1] != ["clean"]] == []
    ac.load_checkpoint(tmp_path / "root" / "c")
