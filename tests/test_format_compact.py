"""The compact-header fast path of `parse_header` accepts exactly what the general JSON
parser does, with the same result, and its layout cache never hands one file's checksums
to another."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import states

import arrayckpt as ac
from arrayckpt import format as fmt
from arrayckpt.errors import CheckpointError
from arrayckpt.layout import MODEL_FILE

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors not installed")


def _write(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _compact(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()


def _prefix(path: Path) -> bytes:
    blob = path.read_bytes()
    if len(blob) < 8:
        return blob
    return blob[: 8 + min(struct.unpack("<Q", blob[:8])[0], len(blob))]


def _outcome(path: Path) -> tuple[Any, ...]:
    """What `parse_header` makes of ``path``: the header's parts, or the error."""
    try:
        h = fmt.parse_header(path, _prefix(path), path.stat().st_size)
    except CheckpointError as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("ok", h.entries, h.metadata, h.checksums, h.data_start, h.checksum_problem)


def _general(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    with monkeypatch.context() as m:
        m.setattr(fmt, "_parse_compact", lambda *args: None)
        return _outcome(path)


def _took_compact_path(path: Path) -> bool:
    prefix = _prefix(path)
    text = prefix[8:].decode()
    count = text.count('"data_offsets"')
    return fmt._parse_compact(path, text, count, len(prefix), path.stat().st_size) is not None


def _same_both_ways(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """Parse ``path`` by the general parser, then by the fast one cold and from its cache:
    all three agree. Returns the outcome."""
    fmt.forget_parsed_layouts()
    general = _general(path, monkeypatch)
    cold = _outcome(path)
    cached = _outcome(path)
    assert cold == general
    assert cached == general
    return general


F32x2 = np.array([1.0, 2.0], "<f4").tobytes()


def _e(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# Compact headers the fast path must refuse or pass on exactly as the general one does.
_CASES: list[tuple[str, bytes, bytes]] = [
    ("plain", _compact({"a": _e()}), F32x2),
    ("metadata", _compact({"__metadata__": {"k": "v"}, "a": _e()}), F32x2),
    ("empty", b"{}", b""),
    ("only-metadata", _compact({"__metadata__": {"k": "v"}}), b""),
    ("empty-metadata-and-data", _compact({"__metadata__": {}}), b"\0"),
    ("zero-size", _compact({"z": _e(shape=(0, 3), offsets=(0, 0)), "a": _e()}), F32x2),
    ("zero-size-after", _compact({"a": _e(), "z": _e(shape=(0,), offsets=(0, 0))}), F32x2),
    ("scalar", _compact({"s": _e("F64", (), (0, 8))}), F32x2),
    (
        "out-of-order",
        _compact({"b": _e("U8", (2,), (8, 10)), "a": _e()}),
        F32x2 + b"\1\2",
    ),
    ("unknown-dtype", _compact({"a": _e(), "f": _e("F2_NEW", (8,), (8, 10))}), F32x2 + b"ab"),
    ("lowercase-dtype", _compact({"a": _e("f32")}), F32x2),
    ("packed-ok", _compact({"p": _e("F4", (4,), (0, 2))}), b"\0\0"),
    ("packed-off-byte", _compact({"p": _e("F4", (3,), (0, 2))}), b"\0\0"),
    ("packed-wrong-size", _compact({"p": _e("F4", (4,), (0, 4))}), b"\0" * 4),
    ("size-mismatch", _compact({"a": _e(shape=(3,))}), F32x2),
    ("unknown-dtype-reversed", _compact({"f": _e("NEW", (1,), (8, 0))}), F32x2),
    ("hole", _compact({"a": _e(shape=(1,), offsets=(4, 8))}), F32x2),
    ("overlap", _compact({"a": _e(), "b": _e(shape=(1,), offsets=(4, 8))}), F32x2),
    ("trailing-data", _compact({"a": _e()}), F32x2 + b"junk"),
    ("short-data", _compact({"a": _e(shape=(4,), offsets=(0, 16))}), F32x2),
    ("duplicate-name", b'{"a":%s,"a":%s}' % (_compact(_e()), _compact(_e())), F32x2),
    (
        "duplicate-metadata",
        b'{"__metadata__":{},"__metadata__":{}}',
        b"",
    ),
    ("tensor-named-metadata", b'{"__metadata__":%s}' % _compact(_e()), F32x2),
    ("metadata-not-first", _compact({"a": _e(), "__metadata__": {"k": "v"}}), F32x2),
    ("metadata-int", _compact({"__metadata__": {"k": 1}, "a": _e()}), F32x2),
    ("metadata-nested", _compact({"__metadata__": {"k": {"x": "y"}}, "a": _e()}), F32x2),
    ("metadata-dup-key", b'{"__metadata__":{"k":"1","k":"2"},"a":%s}' % _compact(_e()), F32x2),
    ("leading-zero-dim", b'{"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}}', F32x2),
    ("leading-zero-offset", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[00,8]}}', F32x2),
    ("negative-offset", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', F32x2),
    ("float-dim", b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', F32x2),
    ("shape-double-comma", b'{"a":{"dtype":"F32","shape":[1,,2],"data_offsets":[0,8]}}', F32x2),
    ("shape-trailing-comma", b'{"a":{"dtype":"F32","shape":[2,],"data_offsets":[0,8]}}', F32x2),
    ("shape-leading-comma", b'{"a":{"dtype":"F32","shape":[,2],"data_offsets":[0,8]}}', F32x2),
    ("shape-comma-only", b'{"a":{"dtype":"F32","shape":[,],"data_offsets":[0,0]}}', b""),
    (
        "dtype-code-too-long",
        _compact({"a": _e("F" * 33, (2,), (0, 8))}),
        F32x2,
    ),
    ("dtype-code-32", _compact({"a": _e("F" * 32, (2,), (0, 8))}), F32x2),
    ("long-number", b'{"a":{"dtype":"U8","shape":[%s],"data_offsets":[0,8]}}' % (b"9" * 25), F32x2),
    ("space-inside", b'{"a": {"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
    ("fields-reordered", b'{"a":{"shape":[2],"dtype":"F32","data_offsets":[0,8]}}', F32x2),
    ("extra-field", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}', F32x2),
    ("missing-field", b'{"a":{"dtype":"F32","shape":[2]}}', F32x2),
    ("leading-comma", b'{,"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
    ("trailing-comma", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},}', F32x2),
    ("metadata-trailing-comma", b'{"__metadata__":{},}', b""),
    ("unclosed", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}', F32x2),
    ("extra-brace", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}}', F32x2),
    ("garbage-after", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}x', F32x2),
    ("escaped-name", b'{"\\u0061":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
    ("quote-in-name", _compact({'a"b': _e()}), F32x2),
    ("nul-in-name", _compact({"a\x00b": _e()}), F32x2),
    ("raw-control-in-name", b'{"a\tb":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
    ("empty-name", _compact({"": _e()}), F32x2),
    ("unicode-name", _compact({"wé🙂": _e()}), F32x2),
    ("padding-spaces", _compact({"a": _e()}) + b" " * 5000, F32x2),
    ("padding-mixed", _compact({"a": _e()}) + b" \t\r\n" * 1100, F32x2),
    ("padding-nul", _compact({"a": _e()}) + b"\0\0", F32x2),
    ("padding-vertical-tab", _compact({"a": _e()}) + b"\x0b", F32x2),
    ("only-spaces", b" " * 16, b""),
    ("top-array", b"[]", b""),
]


@pytest.mark.parametrize(("header", "data"), [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_compact_cases_parse_as_the_general_parser_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, header: bytes, data: bytes
) -> None:
    _same_both_ways(_write(tmp_path / "f.safetensors", header, data), monkeypatch)


@pytest.mark.parametrize(
    "name", ["plain", "metadata", "zero-size", "out-of-order", "unknown-dtype", "padding-spaces"]
)
def test_valid_compact_headers_take_the_fast_path(tmp_path: Path, name: str) -> None:
    header, data = next((h, d) for n, h, d in _CASES if n == name)
    assert _took_compact_path(_write(tmp_path / "f.safetensors", header, data))


def _checkpoint_file(tmp_path: Path, state: dict[str, np.ndarray], meta: Any = None) -> Path:
    where = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
    return ac.save_checkpoint(where, state) / MODEL_FILE


def test_files_of_arrayckpt_and_safetensors_take_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {f"layer{i}.w": np.full((i + 1, 3), i, np.float32) for i in range(40)}
    state["ids"] = np.arange(7, dtype=np.int64)
    state["empty"] = np.zeros((0, 2), np.float16)
    ours = _checkpoint_file(tmp_path, state)
    theirs = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file(state, str(theirs), metadata={"k": "v"})
    for path in (ours, theirs):
        assert _took_compact_path(path), path
        outcome = _same_both_ways(path, monkeypatch)
        assert outcome[0] == "ok" and len(outcome[1]) == len(state)
    assert _same_both_ways(ours, monkeypatch)[3] is not None  # the checksums, read fast


@pytest.mark.parametrize(
    "table",
    [
        lambda t: re.sub(r'":"([0-9a-f]{8})"', lambda m: m[0].upper(), t),  # still hex
        lambda t: t.replace('":"', '":" ', 1),  # a space in a value: int() accepts it
        lambda t: t.replace('":"', '":"0x', 1),  # too wide
        lambda t: t.replace('":"', '":"z', 1),
        lambda t: t.replace('":"', '":"', 1)[:-3] + '"}',  # too narrow
        lambda t: json.dumps(dict(reversed(json.loads(t).items()))),  # another order
        lambda t: json.dumps(json.loads(t)),  # spaces
        lambda t: t[:-1] + ',"extra":"00000000"}',
        lambda t: "{" + t[t.index(",") + 1 :],  # one missing
        lambda t: t.replace('"layer0.w"', '"layer0.w","layer0.w"', 1),
        lambda t: "{}",
        lambda t: "[]",
        lambda t: "not json",
    ],
)
def test_checksum_tables_in_other_forms_read_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: Any
) -> None:
    state = {f"layer{i}.w": np.full(3, i, np.float32) for i in range(4)}
    path = _checkpoint_file(tmp_path, state)
    blob = path.read_bytes()
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:start])
    meta = header["__metadata__"]
    meta[fmt.CHECKSUMS_KEY] = table(meta[fmt.CHECKSUMS_KEY])
    _write(path, _compact(header), blob[start:])
    _same_both_ways(path, monkeypatch)


def test_upper_case_checksums_read_fast_as_the_same_values(tmp_path: Path) -> None:
    state = {f"layer{i}.w": np.full(3, i, np.float32) for i in range(4)}
    path = _checkpoint_file(tmp_path, state)
    want = fmt.SafetensorsReader(path).header.checksums
    blob = path.read_bytes()
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    header = re.sub(rb'\\":\\"([0-9a-f]{8})', lambda m: m[0].upper(), blob[8:start])
    assert header != blob[8:start]
    _write(path, header, blob[start:])
    fmt.forget_parsed_layouts()
    fmt.SafetensorsReader(path)  # cold, then from the cache
    got = fmt.SafetensorsReader(path).header
    assert got.checksums == want and got.checksum_problem is None


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_damaged_compact_headers_parse_as_the_general_parser_does(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Bytes of a real header replaced by JSON-ish characters: whatever the damage, both
    parsers accept it with the same result or refuse it with the same error."""
    tmp = tmp_path_factory.mktemp("damaged")
    state = data.draw(states(min_size=1, max_size=5))
    path = _checkpoint_file(tmp, state)
    blob = bytearray(path.read_bytes())
    end = 8 + struct.unpack("<Q", blob[:8])[0]
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(8, end - 1))
        blob[at] = data.draw(st.sampled_from(b'0123456789,:"{}[] \\-aF_\x00'))
    path.write_bytes(bytes(blob))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _same_both_ways(path, monkeypatch)


def test_layout_cache_never_reuses_checksums_or_shares_maps(tmp_path: Path) -> None:
    """Two saves of one model share a layout but not their checksums: each load checks its
    own file's, and a corrupted second save still fails."""
    a = {f"p{i}": np.full(256, i, np.float32) for i in range(50)}
    b = {k: v + 1 for k, v in a.items()}
    ckpt_a = ac.save_checkpoint(tmp_path / "a", a)
    ckpt_b = ac.save_checkpoint(tmp_path / "b", b)
    fmt.forget_parsed_layouts()
    got_a = ac.load_checkpoint(ckpt_a).model
    got_b = ac.load_checkpoint(ckpt_b).model
    assert len(fmt._parsed_layouts) == 1  # one layout for both
    assert all(np.array_equal(got_a[k], a[k]) and np.array_equal(got_b[k], b[k]) for k in a)
    ra = fmt.SafetensorsReader(ckpt_a / MODEL_FILE)
    rb = fmt.SafetensorsReader(ckpt_b / MODEL_FILE)
    assert ra.header.checksums != rb.header.checksums
    assert ra.header.entries == rb.header.entries
    assert ra.header.entries is not rb.header.entries  # each header's own map
    rb.header.entries.pop("p0")
    assert "p0" in fmt.SafetensorsReader(ckpt_a / MODEL_FILE).header.entries
    e = ra.header.entries["p7"]
    blob = bytearray((ckpt_b / MODEL_FILE).read_bytes())
    blob[e.start + 5] ^= 0x40
    (ckpt_b / MODEL_FILE).write_bytes(bytes(blob))
    with pytest.raises(ac.CorruptCheckpointError, match="'p7' fails its CRC32C"):
        ac.load_checkpoint(ckpt_b)
    assert ac.load_checkpoint(ckpt_a).model["p7"][0] == 7


def test_layout_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "_LAYOUT_CACHE_ENTRIES", 100)
    fmt.forget_parsed_layouts()
    for i in range(6):
        state = {f"t{i}_{j}": np.zeros(j + 1, np.uint8) for j in range(30)}
        fmt.SafetensorsReader(_checkpoint_file(tmp_path, state))
    assert sum(len(v.entries) for v in fmt._parsed_layouts.values()) <= 100
    big = {f"t{j}": np.zeros(1, np.uint8) for j in range(150)}  # over the bound: not kept
    reader = fmt.SafetensorsReader(_checkpoint_file(tmp_path, big))
    assert len(reader.header.entries) == 150
    assert all(len(v.entries) != 150 for v in fmt._parsed_layouts.values())


def test_header_padded_to_4096_with_spaces_reads(tmp_path: Path) -> None:
    """Large files' headers are padded with spaces so that the data starts 4096-aligned."""
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64)}
    path = _checkpoint_file(tmp_path, state)
    blob = path.read_bytes()
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    header = blob[8:start].rstrip(b" ")
    padded = header + b" " * (-(8 + len(header)) % 4096 + 4096)
    _write(path, padded, blob[start:])
    assert _took_compact_path(path)
    for mmap in (True, False):
        got = ac.load_checkpoint(path.parent, mmap=mmap).model
        assert np.array_equal(got["w"], state["w"]) and np.array_equal(got["b"], state["b"])


def test_directly_written_file_takes_the_fast_path(tmp_path: Path) -> None:
    """Files of 64 MiB or more are written with O_DIRECT, their header padded with spaces
    to a 4096-byte block: still compact, read the fast way, data 4096-aligned."""
    from arrayckpt import direct

    state = {f"w{i}": np.full(1 << 20, i, np.float32) for i in range(direct.MIN_BYTES >> 22)}
    path = _checkpoint_file(tmp_path, state)
    assert _took_compact_path(path)
    fmt.forget_parsed_layouts()
    header = fmt.SafetensorsReader(path).header
    assert header.checksum_problem is None and header.checksums is not None
    for mmap in (True, False):
        got = ac.load_checkpoint(path.parent, mmap=mmap).model
        assert all(got[k][0] == v[0] for k, v in state.items())
