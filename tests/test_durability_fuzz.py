"""Suite 8: fuzzing the loader with mutated copies of valid files.

- Hypothesis mutates a valid ``model.safetensors`` (byte changes, insertions, deletions,
  truncation): each mutant raises `CheckpointError` or loads the exact original arrays.
  The one deliberate exception: a mutant that no longer carries any ``arrayckpt.``
  metadata key reads as another tool's file, which has no checksums to verify against;
  it must still load or fail cleanly.
- Mutated ``training_state.json`` files parse or raise `CheckpointError`, nothing else.
- A differential run against ``safetensors.numpy.load``: where both accept, the arrays
  are identical; where only we reject, the reason is on the list of places where we
  are deliberately stricter (`STRICTER`); we never accept what safetensors rejects.

An atheris target for the header validator lives in ``fuzz_header_atheris.py``.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arrayckpt as ac
from arrayckpt.format import SafetensorsReader

try:
    from . import faults
except ImportError:
    import faults

safetensors_numpy = pytest.importorskip("safetensors.numpy")

WORK = Path(tempfile.mkdtemp(prefix="arrayckpt-fuzz-"))
ac.save_checkpoint(WORK / "valid", faults.model_state(3), None, faults.training_state(3))
VALID = (WORK / "valid" / "model.safetensors").read_bytes()
VALID_STATE = (WORK / "valid" / "training_state.json").read_bytes()
HEADER_END = 8 + int.from_bytes(VALID[:8], "little")
ORIGINAL = SafetensorsReader(WORK / "valid" / "model.safetensors").arrays()

# Where we reject what safetensors accepts, on purpose (message fragment -> why).
STRICTER = {
    "fails its CRC32C checksum": "we verify per-tensor checksums; safetensors has none",
    "'arrayckpt.crc32c'": "our own metadata must be intact to be trusted",
    "duplicate key": "serde_json keeps the last of duplicate keys; we refuse to guess",
    "unknown fields": "serde ignores unknown entry fields; we reject them",
    "contain no NUL": "names with NUL cannot round-trip through C strings or paths",
    "non-empty": "an empty tensor name",
}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def ours(path: Path, data: bytes, mmap: bool = True):
    """(arrays, None, reader) or (None, message, None)."""
    path.write_bytes(data)
    try:
        reader = SafetensorsReader(path, mmap=mmap)
        return reader.arrays(), None, reader
    except ac.CheckpointError as exc:
        return None, str(exc), None


def ours_is_foreign(reader: SafetensorsReader) -> bool:
    return not any(key.startswith("arrayckpt.") for key in reader.header.metadata)


def apply(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)
    for op in ops:
        kind, pos = op[0], op[1] % (len(out) + 1)
        if kind == "set" and out:
            out[pos % len(out)] = op[2]
        elif kind == "insert":
            out[pos:pos] = op[2]
        elif kind == "delete":
            del out[pos : pos + op[2]]
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


positions = st.one_of(st.integers(0, HEADER_END + 16), st.integers(0, len(VALID)))
mutation = st.one_of(
    st.tuples(st.just("set"), positions, st.integers(0, 255)),
    st.tuples(st.just("set"), positions, st.sampled_from(list(b'0123456789[]{},:"-.eEFIU '))),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), positions, st.integers(1, 8)),
    st.tuples(st.just("truncate"), positions),
)
TRIED = {"safetensors mutants": 0, "training_state mutants": 0}


@pytest.fixture(autouse=True, scope="module")
def _report_tried(request: pytest.FixtureRequest):
    failed_before = request.session.testsfailed
    yield
    faults.report(
        "fuzz-hypothesis",
        **{k.replace(" ", "_"): v for k, v in TRIED.items()},
        failures=request.session.testsfailed - failed_before,
    )


FUZZ = settings(
    max_examples=faults.scaled(300, 20_000),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4), mmap=st.booleans())
def test_mutants_raise_or_load_the_original(ops: list[tuple], mmap: bool) -> None:
    TRIED["safetensors mutants"] += 1
    arrays, error, reader = ours(WORK / "mutant.safetensors", apply(VALID, ops), mmap)
    if arrays is not None and not ours_is_foreign(reader):
        assert same(arrays, ORIGINAL), "a damaged file loaded as different arrays"
    if error is not None:
        assert str(WORK / "mutant.safetensors") in error


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_training_state_parses_or_raises(ops: list[tuple]) -> None:
    TRIED["training_state mutants"] += 1
    data = apply(VALID_STATE, [(op[0], op[1] % (len(VALID_STATE) + 1), *op[2:]) for op in ops])
    try:
        state = ac.TrainingState.from_json(data, source="training_state.json")
    except ac.CheckpointError as exc:
        assert "training_state.json" in str(exc)
    else:
        state.to_json()  # whatever parsed is a valid state


def random_mutant(rng: random.Random) -> bytes:
    ops = []
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(8, HEADER_END) if rng.random() < 0.7 else rng.randrange(len(VALID))
        kind = rng.random()
        if kind < 0.4:
            ops.append(("set", pos, rng.randrange(256)))
        elif kind < 0.8:
            ops.append(("set", pos, rng.choice(b'0123456789[]{},:"-.eEFIU ')))
        elif kind < 0.9:
            ops.append(("insert", pos, bytes([rng.randrange(256)])))
        else:
            ops.append(("delete", pos, rng.randint(1, 4)))
    return apply(VALID, ops)


MUTANTS = faults.scaled(3000, 200_000)


def test_differential_against_safetensors() -> None:
    rng = random.Random(20240605)
    path = WORK / "differential.safetensors"
    tally = {"both reject": 0, "both accept": 0, "we are stricter": 0}
    for _ in range(MUTANTS):
        data = random_mutant(rng)
        arrays, error, reader = ours(path, data)
        try:
            theirs = safetensors_numpy.load(data)
        except Exception:
            theirs = None
        if arrays is None and theirs is None:
            tally["both reject"] += 1
        elif arrays is not None and theirs is not None:
            assert same(arrays, theirs), "both accepted but read different arrays"
            assert ours_is_foreign(reader) or same(arrays, ORIGINAL)
            tally["both accept"] += 1
        elif arrays is None:
            reason = [fragment for fragment in STRICTER if fragment in error]
            assert reason, f"we reject what safetensors accepts, not on purpose: {error}"
            tally["we are stricter"] += 1
        else:
            pytest.fail(f"we accept a file safetensors rejects: {data[: HEADER_END + 8]!r}")
    faults.report(
        "fuzz-differential",
        mutants=MUTANTS,
        failures=0,
        **{k.replace(" ", "_"): v for k, v in tally.items()},
    )
    assert tally["both reject"] and tally["we are stricter"]
