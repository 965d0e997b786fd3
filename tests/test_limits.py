"""The one table of limits: whatever a save accepts, a load accepts (issue 10, defect 3)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from strategies import states

import arrayckpt as ac
from arrayckpt import format as fmt
from arrayckpt import limits
from arrayckpt.layout import MODEL_FILE


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return int(struct.unpack("<Q", f.read(8))[0])


def test_training_state_over_the_reader_limit_is_refused_at_save(tmp_path: Path) -> None:
    """Before: committed, then `training_state.json: larger than 16777216 bytes` on load."""
    big = ac.TrainingState(step=1, metadata={"notes": "x" * limits.MAX_TRAINING_STATE_BYTES})
    with pytest.raises(ac.InvalidInputError, match=r"training_state.*over the 16777216-byte"):
        ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)}, training_state=big)
    assert not (tmp_path / "c").exists()
    with ac.AsyncCheckpointer() as ckpt, pytest.raises(ac.InvalidInputError):
        ckpt.save(tmp_path / "d", {"w": np.ones(2)}, training_state=big)  # in the caller's thread
    assert not (tmp_path / "d").exists()


def test_training_state_just_under_the_limit_round_trips(tmp_path: Path) -> None:
    fill = limits.MAX_TRAINING_STATE_BYTES - 200
    state = ac.TrainingState(step=1, metadata={"notes": "x" * fill})
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(2)}, training_state=state)
    assert ac.load_checkpoint(tmp_path / "c").training_state == state


@pytest.mark.parametrize("cap", [limits.MAX_TENSORS, 4])
def test_more_tensors_than_a_reader_accepts_are_refused_at_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> None:
    """At the real cap (2^20 + 1 zero-size tensors) and at a small one, for both states."""
    monkeypatch.setattr(limits, "MAX_TENSORS", cap)
    empty = np.empty(0, np.uint8)
    state = {f"{i}": empty for i in range(cap + 1)}
    with pytest.raises(ac.InvalidInputError, match=f"more than the {cap}"):
        ac.save_checkpoint(tmp_path / "c", state)
    with pytest.raises(ac.InvalidInputError, match="optimizer_state"):
        ac.save_checkpoint(tmp_path / "c", {"w": empty}, state)
    assert not (tmp_path / "c").exists()
    if cap == 4:  # exactly at the cap: saved and loaded
        del state["0"]
        ac.save_checkpoint(tmp_path / "c", state)
        assert len(ac.load_checkpoint(tmp_path / "c").model) == cap


def test_header_over_the_cap_is_refused_at_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nested state's non-array leaves go into the header: a big one must not commit."""
    monkeypatch.setattr(limits, "MAX_HEADER_BYTES", 64 * 1024)
    state = {"w": np.ones(2), "notes": {"text": "y" * 70_000}}
    with pytest.raises(ac.InvalidInputError, match=r"header would be .* over the 65536-byte"):
        ac.save_checkpoint(tmp_path / "c", state)
    assert not (tmp_path / "c").exists()
    state["notes"]["text"] = "y" * 60_000
    ac.save_checkpoint(tmp_path / "c", state)
    assert ac.load_checkpoint(tmp_path / "c").model["notes"]["text"] == "y" * 60_000


@pytest.mark.slow
def test_header_over_the_real_cap_is_refused_at_save(tmp_path: Path) -> None:
    state = {"w": np.ones(2), "notes": {"text": "y" * limits.MAX_HEADER_BYTES}}
    with pytest.raises(ac.InvalidInputError, match="header would be"):
        ac.save_checkpoint(tmp_path / "c", state)


def test_too_many_dimensions_are_refused_at_save(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    x = torch.ones([1] * (limits.MAX_NDIM + 1))
    with pytest.raises(ac.InvalidInputError, match="65 dimensions, more than the 64"):
        ac.save_checkpoint(tmp_path / "c", {"x": x})


@given(state=states())
def test_header_estimate_is_never_below_the_written_header(
    tmp_path_factory: pytest.TempPathFactory, state: dict[str, np.ndarray]
) -> None:
    """`check_writable` relies on `_header_bytes` being an upper bound of what is written."""
    path = ac.save_checkpoint(tmp_path_factory.mktemp("c") / "c", state) / MODEL_FILE
    header = fmt.read_header(path)
    layout = [(e.name, e.dtype, e.shape) for e in header.entries.values()]
    # what the writer adds itself; the rest (tree, other files' checksums) the caller passed
    added = {fmt.FORMAT_KEY, fmt.CHECKSUMS_KEY, fmt.HF_FORMAT_KEY}
    own = {k: v for k, v in header.metadata.items() if k not in added}
    estimate = fmt._header_bytes(layout, own)
    written = _header_length(path)
    assert written <= estimate <= written + 64 * len(layout) + 256, (written, estimate)


def test_every_reader_limit_is_in_the_table() -> None:
    """The readers use the table's values, not copies of their own."""
    from arrayckpt.distributed import types
    from arrayckpt.training_state import MAX_STATE_BYTES

    assert MAX_STATE_BYTES == limits.MAX_TRAINING_STATE_BYTES
    assert types.MAX_SHARDING_META_BYTES is limits.MAX_SHARDING_META_BYTES
    assert not hasattr(fmt, "MAX_HEADER_BYTES") and not hasattr(fmt, "MAX_TENSORS")
    json.dumps({k: v for k, v in vars(limits).items() if k.isupper()})  # plain numbers
