"""TrainingState and training_state.json: boostr's serde format, read strictly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import training_states

import arrayckpt as ac
from arrayckpt.layout import TRAINING_STATE_FILE
from arrayckpt.training_state import MAX_STATE_BYTES, TrainingState, serde_f64


@given(ts=training_states())
def test_json_round_trip(ts: TrainingState) -> None:
    text = ts.to_json()
    back = TrainingState.from_json(text)
    assert back == ts
    assert math.copysign(1.0, back.learning_rate) == math.copysign(1.0, ts.learning_rate)
    assert back.version == ac.CHECKPOINT_VERSION
    assert TrainingState.from_json(text.encode()) == ts


@given(ts=training_states())
def test_round_trip_through_a_checkpoint(tmp_path: Path, ts: TrainingState) -> None:
    path = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
    ac.save_checkpoint(path, {"w": np.zeros(1)}, training_state=ts)
    assert ac.load_checkpoint(path).training_state == ts


def test_exact_json_text_in_serde_order() -> None:
    ts = TrainingState(step=1000, epoch=2, learning_rate=3e-4, metadata={"run": "a", "k": "v"})
    assert ts.to_json() == (
        "{\n"
        '  "version": 2,\n'
        '  "step": 1000,\n'
        '  "epoch": 2,\n'
        '  "learning_rate": 0.0003,\n'
        '  "metadata": {\n'
        '    "run": "a",\n'
        '    "k": "v"\n'
        "  }\n"
        "}"
    )
    assert TrainingState(step=0).to_json() == (
        '{\n  "version": 2,\n  "step": 0,\n  "epoch": 0,\n  "learning_rate": 0.0,\n'
        '  "metadata": {}\n}'
    )


def test_json_written_into_checkpoint_is_the_serde_text(tmp_path: Path) -> None:
    ts = TrainingState(step=7, epoch=1, learning_rate=1e-5, metadata={"é": '\n\t"\\\x01'})
    ac.save_checkpoint(tmp_path / "c", {}, training_state=ts)
    text = (tmp_path / "c" / TRAINING_STATE_FILE).read_text("utf-8")
    assert text == ts.to_json()
    assert '"learning_rate": 0.00001,' in text
    # serde_json escapes: short forms for \n \t \" \\, lowercase \u00XX otherwise, no \u for é
    assert r'"é": "\n\t\"\\\u0001"' in text


@pytest.mark.parametrize(
    ("value", "serde"),
    [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.0, "1.0"),
        (100.0, "100.0"),
        (0.1, "0.1"),
        (3e-4, "0.0003"),
        (1e-5, "0.00001"),
        (-2.5e-5, "-0.000025"),
        (1e-6, "1e-6"),
        (1.5e-7, "1.5e-7"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e16"),
        (1.2345678901234568e17, "1.2345678901234568e17"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e308"),
        (123456.789, "123456.789"),
    ],
)
def test_learning_rate_spelled_as_serde_json(value: float, serde: str) -> None:
    assert serde_f64(value) == serde


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_serde_f64_round_trips(x: float) -> None:
    text = serde_f64(x)
    assert float(text) == x and math.copysign(1, float(text)) == math.copysign(1, x)
    assert "+" not in text and "e0" not in text and "e-0" not in text


# ------------------------------------------------------------------------- boostr vectors


def test_v1_file_without_version() -> None:
    ts = TrainingState.from_json(
        '{"step": 1000, "epoch": 2, "learning_rate": 0.0003, "metadata": {"k": "v"}}'
    )
    assert ts == TrainingState(1000, 2, 3e-4, {"k": "v"}, version=1)


def test_serde_defaults_for_missing_fields() -> None:
    assert TrainingState.from_json('{"step": 5}') == TrainingState(5, 0, 0.0, {}, version=1)
    ts = TrainingState.from_json('{"version": 2, "step": 5, "epoch": 1}')
    assert ts == TrainingState(5, 1, 0.0, {}, version=2)
    assert isinstance(ts.learning_rate, float)


def test_boostr_v2_pretty_file_and_unknown_fields() -> None:
    text = (
        '{\n  "version": 2,\n  "step": 42,\n  "epoch": 3,\n  "learning_rate": 1e-6,\n'
        '  "metadata": {\n    "model": "gpt"\n  },\n  "future_field": [1, {"x": null}]\n}'
    )
    assert TrainingState.from_json(text) == TrainingState(42, 3, 1e-6, {"model": "gpt"})


def test_integer_learning_rate_is_a_float() -> None:
    ts = TrainingState.from_json('{"step": 1, "learning_rate": 1}')
    assert ts.learning_rate == 1.0 and isinstance(ts.learning_rate, float)


def test_full_u64_range() -> None:
    top = 2**64 - 1
    ts = TrainingState.from_json(f'{{"step": {top}, "epoch": {top}}}')
    assert ts.step == top and ts.epoch == top


# ------------------------------------------------------------------------ strict parsing

_BAD = [
    ("bool-step", '{"step": true}', "step"),
    ("float-step", '{"step": 1.0}', "step"),
    ("exp-step", '{"step": 1e3}', "step"),
    ("negative-step", '{"step": -1}', "step"),
    ("negative-zero-step", '{"step": -0}', "step"),  # serde_json reads -0 as a float
    ("negative-zero-epoch", '{"step": 1, "epoch": -0}', "epoch"),
    ("bom", '\ufeff{"step": 1}', "BOM"),
    ("huge-step", '{"step": 18446744073709551616}', "step"),
    ("string-step", '{"step": "1"}', "step"),
    ("null-step", '{"step": null}', "step"),
    ("missing-step", '{"epoch": 1}', "missing required field 'step'"),
    ("bool-epoch", '{"step": 1, "epoch": false}', "epoch"),
    ("float-epoch", '{"step": 1, "epoch": 0.5}', "epoch"),
    ("negative-epoch", '{"step": 1, "epoch": -3}', "epoch"),
    ("null-epoch", '{"step": 1, "epoch": null}', "epoch"),
    ("nan-lr", '{"step": 1, "learning_rate": NaN}', "NaN"),
    ("inf-lr", '{"step": 1, "learning_rate": Infinity}', "Infinity"),
    ("neg-inf-lr", '{"step": 1, "learning_rate": -Infinity}', "Infinity"),
    ("overflow-lr", '{"step": 1, "learning_rate": 1e999}', "learning_rate"),
    ("huge-int-lr", '{"step": 1, "learning_rate": 1' + "0" * 400 + "}", "learning_rate"),
    ("string-lr", '{"step": 1, "learning_rate": "0.1"}', "learning_rate"),
    ("bool-lr", '{"step": 1, "learning_rate": true}', "learning_rate"),
    ("metadata-int", '{"step": 1, "metadata": {"a": 1}}', "metadata"),
    ("metadata-list", '{"step": 1, "metadata": ["a"]}', "metadata"),
    ("metadata-null", '{"step": 1, "metadata": null}', "metadata"),
    ("metadata-nested", '{"step": 1, "metadata": {"a": {"b": "c"}}}', "metadata"),
    ("metadata-surrogate", '{"step": 1, "metadata": {"a": "\\udc00"}}', "metadata"),
    ("version-negative", '{"step": 1, "version": -1}', "version"),
    ("version-float", '{"step": 1, "version": 2.0}', "version"),
    ("version-huge", '{"step": 1, "version": 4294967296}', "version"),
    ("duplicate-step", '{"step": 1, "step": 2}', "duplicate key 'step'"),
    ("duplicate-nested", '{"step": 1, "metadata": {"a": "x", "a": "y"}}', "duplicate key 'a'"),
    ("not-object", "[1]", "JSON object"),
    ("string-doc", '"step"', "JSON object"),
    ("empty", "", "not valid JSON"),
    ("truncated", '{"step": 1', "not valid JSON"),
    ("trailing-garbage", '{"step": 1} x', "not valid JSON"),
    ("digits-beyond-int-limit", '{"step": ' + "9" * 5000 + "}", "not valid JSON|step"),
    ("deep-nesting", "[" * 100_000 + "]" * 100_000, "nested too deeply|not valid JSON"),
    (
        "deep-nesting-in-field",
        '{"step": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "nested too deeply|not valid JSON",
    ),
    ("deep-objects", '{"a":' * 50_000 + "1" + "}" * 50_000, "nested too deeply|not valid JSON"),
]


@pytest.mark.parametrize(("text", "problem"), [c[1:] for c in _BAD], ids=[c[0] for c in _BAD])
def test_strict_parse_errors_name_the_file(text: str, problem: str) -> None:
    with pytest.raises(ac.CorruptCheckpointError, match=problem) as info:
        TrainingState.from_json(text)
    assert str(info.value).startswith("training_state.json: ")


@pytest.mark.parametrize(
    "data",
    [
        b'{"step": 1, "metadata": {"a": "\xff"}}',
        b'\xef\xbb\xbf{"step": 1}',
        '{"step": 1}'.encode("utf-16"),
        '{"step": 1}'.encode("utf-32-le"),
    ],
    ids=["invalid-utf8", "utf8-bom", "utf16", "utf32"],
)
def test_bytes_must_be_utf8_without_bom(data: bytes) -> None:
    with pytest.raises(ac.CorruptCheckpointError, match=r"training_state\.json"):
        TrainingState.from_json(data)


def test_negative_zero_learning_rate_is_a_float() -> None:
    ts = TrainingState.from_json('{"step": 1, "learning_rate": -0}')
    assert ts.learning_rate == 0.0 and math.copysign(1.0, ts.learning_rate) == -1.0


def test_errors_in_a_checkpoint_name_the_path(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {})
    path = tmp_path / "c" / TRAINING_STATE_FILE
    path.write_text('{"step": true}')
    with pytest.raises(ac.CorruptCheckpointError, match=str(path)):
        ac.load_checkpoint(tmp_path / "c")


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    ac.save_checkpoint(tmp_path / "c", {})
    path = tmp_path / "c" / TRAINING_STATE_FILE
    with open(path, "r+b") as f:
        f.truncate(MAX_STATE_BYTES + 10)  # sparse: cheap to create
    with pytest.raises(ac.CorruptCheckpointError, match=f"{TRAINING_STATE_FILE}.*larger than"):
        ac.load_checkpoint(tmp_path / "c")


# ------------------------------------------------------------------------------- saving


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": math.nan},
        {"learning_rate": math.inf},
        {"learning_rate": -math.inf},
        {"learning_rate": 10**400},
        {"learning_rate": "0.1"},
        {"learning_rate": True},
        {"step": -1},
        {"step": 1.0},
        {"step": True},
        {"step": 2**64},
        {"epoch": -1},
        {"epoch": None},
        {"metadata": {"a": 1}},
        {"metadata": {1: "a"}},
        {"metadata": None},
        {"metadata": {"a": "\ud800"}},
        {"version": -1},
    ],
    ids=repr,
)
def test_saving_invalid_state_is_an_error_before_writing(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    fields: dict[str, Any] = {"step": 1, **kwargs}
    ts = TrainingState(**fields)
    with pytest.raises(ac.InvalidInputError, match="training_state"):
        ts.to_json()
    with pytest.raises(ac.InvalidInputError, match="training_state"):
        ac.save_checkpoint(tmp_path / "c", {"w": np.zeros(1)}, training_state=ts)
    assert not (tmp_path / "c").exists()


def test_saved_version_is_always_current(tmp_path: Path) -> None:
    ts = TrainingState(step=1, version=1)
    assert json.loads(ts.to_json())["version"] == ac.CHECKPOINT_VERSION
