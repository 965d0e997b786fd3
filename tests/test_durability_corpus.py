"""Suite 7: a corpus of malformed checkpoint files, each rejected with a clear error.

Every case replaces one file of a valid checkpoint and asserts `load_checkpoint` raises a
`CheckpointError` whose message names the file and the problem. The files are built here
by hand, byte by byte, not with the library's writer.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt.format import CHECKSUMS_KEY, FORMAT_KEY, tensor_checksum
from arrayckpt.limits import MAX_HEADER_BYTES, MAX_TENSORS

A = np.arange(2, dtype=np.float32).tobytes()  # 8 bytes
B = np.array([7], dtype=np.int64).tobytes()  # 8 bytes


def entry(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def header(**overrides: object) -> dict:
    h: dict = {"a": entry(), "b": entry("I64", (1,), (8, 16)), "__metadata__": {"k": "v"}}
    h.update(overrides)
    return {k: v for k, v in h.items() if v is not None}


def st(
    h: dict | str | bytes | None = None,
    data: bytes = A + B,
    *,
    length: int | None = None,
    raw_suffix: bytes = b"",
) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    if h is None:
        h = header()
    text = h if isinstance(h, bytes) else (h if isinstance(h, str) else json.dumps(h)).encode()
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data + raw_suffix


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def with_checksums(table: object) -> bytes:
    meta = {FORMAT_KEY: "1", CHECKSUMS_KEY: table if isinstance(table, str) else json.dumps(table)}
    return st(header(__metadata__=meta))


GOOD_SUMS = {
    "a": f"{tensor_checksum('F32', (2,), A):08x}",
    "b": f"{tensor_checksum('I64', (1,), B):08x}",
}

# name -> (file bytes, what the message must say)
SAFETENSORS: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "shorter than the 8-byte header length"),
    "shorter than the length prefix": (b"\x01\x02\x03", "shorter than the 8-byte"),
    "header length past EOF": (st(length=10_000), "runs past the end"),
    "header length over the cap": (st(length=MAX_HEADER_BYTES + 1), "cap"),
    "header length 2**64-1": (st(length=2**64 - 1), "cap"),
    "data truncated": (st()[:-3], "holds only"),
    "only the header": (st(data=b""), "holds only 0 data bytes"),
    "entry-count bomb": (
        st(b"{" + b'"data_offsets":0,' * (MAX_TENSORS + 1) + b'"x":0}', data=b""),
        "more than",
    ),
    "invalid UTF-8 in header": (st(b'{"a\xff": 1}'), "not valid UTF-8"),
    "invalid JSON": (st(b'{"a": {"dtype": "F32",'), "not valid JSON"),
    "JSON followed by garbage": (st(json.dumps(header()) + "xyz"), "not valid JSON"),
    "header is a list": (st(b"[]", data=b""), "must be a JSON object, not list"),
    "header is a string": (st(b'"hi"', data=b""), "must be a JSON object, not str"),
    "header is null": (st(b"null", data=b""), "must be a JSON object, not NoneType"),
    "duplicate tensor names": (
        st(f'{{"a": {json.dumps(entry())}, "a": {json.dumps(entry())}}}', data=A),
        "duplicate key 'a'",
    ),
    "duplicate field in an entry": (
        st('{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data=A),
        "duplicate key 'dtype'",
    ),
    "extra field in an entry": (st(header(a={**entry(), "x": 1})), "unknown fields ['x']"),
    "missing field in an entry": (
        st(header(a={"dtype": "F32", "data_offsets": [0, 8]})),
        "missing fields ['shape']",
    ),
    "entry is not an object": (st(header(a=[1, 2])), "entry must be an object"),
    "unknown dtype": (st(header(a=entry("F33"))), "unknown dtype 'F33'"),
    "dtype is not a string": (st(header(a=entry(5))), "unknown dtype 5"),
    "dtype in lower case": (st(header(a=entry("f32"))), "unknown dtype 'f32'"),
    "negative dimension": (st(header(a=entry(shape=[-2]))), "negative number -2"),
    "float dimension": (st(header(a=entry(shape=[2.0]))), "unexpected number 2.0"),
    "negative zero offset": (
        st('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}', data=A),
        "negative number -0",
    ),
    "bool dimension": (st(header(a=entry(shape=[True, 2]))), "must be a list of non-negative"),
    "shape not a list": (st(header(a=entry(shape=2))), "must be a list of non-negative"),
    "offsets of length one": (st(header(a=entry(offsets=[8]))), "must be two non-negative"),
    "offsets not a list": (st(header(a=entry(offsets="0-8"))), "must be two non-negative"),
    "offsets out of bounds": (
        st(header(a=entry(shape=(4,), offsets=(0, 16)), b=None), data=A),
        "holds only 8 data bytes",
    ),
    "offsets past the data": (st(header(b=entry("I64", (2,), (8, 24)))), "holds only 16"),
    "offsets beyond 2**64": (st(header(b=entry("I64", (1,), (2**70, 2**70 + 8)))), "unused bytes"),
    "reversed offsets": (st(header(a=entry(shape=(0,), offsets=(8, 0)))), "reversed"),
    "overlapping tensors": (st(header(b=entry("I64", (1,), (4, 12)))), "overlap"),
    "hole between tensors": (
        st(header(b=entry("I64", (1,), (12, 20))), data=A + b"\0" * 12),
        "4 unused bytes",
    ),
    "trailing bytes": (st(raw_suffix=b"\0\0\0"), "3 trailing bytes"),
    "shape times itemsize mismatch": (st(header(a=entry(shape=(3,)))), "needs 12 bytes"),
    "size overflow": (st(header(a=entry(shape=(2**40, 2**40, 2**40)))), "needs"),
    "metadata value not a string": (st(header(__metadata__={"k": 1})), "__metadata__ must map"),
    "metadata is a list": (st(header(__metadata__=["k"])), "__metadata__ must map"),
    "empty tensor name": (st(header(**{"": entry()}, a=None)), "non-empty"),
    "NUL in a tensor name": (st(header(**{"a\0b": entry()}, a=None)), "contain no NUL"),
    "NaN in the header": (st(b'{"a": NaN}'), "NaN is not a number JSON allows"),
    "Infinity in the header": (st(b'{"a": Infinity}'), "Infinity is not a number JSON allows"),
    "1e999 in the header": (st(b'{"a": 1e999}'), "unexpected number 1e999"),
    "deeply nested header": (st(nested(100_000), data=b""), "nested too deeply"),
    "checksum mismatch (flipped bit)": (
        with_checksums(GOOD_SUMS)[:-1] + bytes([B[-1] ^ 1]),
        "fails its CRC32C",
    ),
    "checksum table not JSON": (with_checksums("{oops"), "not a map of tensor names"),
    "checksum table with non-hex": (with_checksums({"a": "zz", "b": "00"}), "not a map"),
    "checksum table missing a tensor": (
        with_checksums({"a": GOOD_SUMS["a"]}),
        "does not list exactly",
    ),
    "checksum table nested deeply": (with_checksums(nested(100_000)), "not a map"),
    "arrayckpt metadata without its checksum table": (
        st(header(__metadata__={FORMAT_KEY: "1"})),
        "lacks its 'arrayckpt.crc32c' table",
    ),
    "dtype changed to another of the same size": (
        st(
            header(
                __metadata__={FORMAT_KEY: "1", CHECKSUMS_KEY: json.dumps(GOOD_SUMS)}, a=entry("I32")
            )
        ),
        "fails its CRC32C",
    ),
    "shape changed, same size": (
        st(
            header(
                __metadata__={FORMAT_KEY: "1", CHECKSUMS_KEY: json.dumps(GOOD_SUMS)},
                a=entry(shape=(1, 2)),
            )
        ),
        "fails its CRC32C",
    ),
}

# training_state.json cases: file bytes -> what the message must say
STATE: dict[str, tuple[bytes, str]] = {
    "state: empty file": (b"", "not valid JSON"),
    "state: invalid UTF-8": (b'{"step": 1, "\xff": 2}', "not valid JSON"),
    "state: invalid JSON": (b'{"step": 1', "not valid JSON"),
    "state: not an object": (b"[1, 2]", "must hold a JSON object, not list"),
    "state: NaN": (b'{"step": 1, "learning_rate": NaN}', "NaN is not a number JSON allows"),
    "state: Infinity": (b'{"step": 1, "learning_rate": Infinity}', "Infinity is not a number"),
    "state: -Infinity": (b'{"step": 1, "learning_rate": -Infinity}', "-Infinity is not"),
    "state: 1e999": (b'{"step": 1, "learning_rate": 1e999}', "learning_rate must be a finite"),
    "state: learning rate a huge integer": (
        b'{"step": 1, "learning_rate": 1' + b"0" * 400 + b"}",
        "learning_rate must be a finite",
    ),
    "state: step 2**64": (b'{"step": 18446744073709551616}', "step must be an integer in"),
    "state: step with 5000 digits": (b'{"step": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "state: deep nesting": (
        b'{"step": 1, "metadata": ' + nested(100_000).encode() + b"}",
        "nested too deeply",
    ),
    "state: duplicate keys": (b'{"step": 1, "step": 2}', "duplicate key 'step'"),
    "state: bool step": (b'{"step": true}', "step must be an integer"),
    "state: bool epoch": (b'{"step": 1, "epoch": false}', "epoch must be an integer"),
    "state: bool version": (b'{"version": true, "step": 1}', "version must be an integer"),
    "state: float step": (b'{"step": 1.0}', "step must be an integer"),
    "state: negative step": (b'{"step": -1}', "step must be an integer"),
    "state: string step": (b'{"step": "5"}', "step must be an integer"),
    "state: version 2**32": (b'{"version": 4294967296, "step": 1}', "version must be"),
    "state: missing step": (b'{"version": 2, "epoch": 1}', "missing required field 'step'"),
    "state: metadata a list": (b'{"step": 1, "metadata": ["a"]}', "metadata must map"),
    "state: metadata value an int": (b'{"step": 1, "metadata": {"a": 1}}', "metadata must map"),
    "state: learning rate a string": (
        b'{"step": 1, "learning_rate": "0.1"}',
        "learning_rate must be a finite",
    ),
    "state: bool learning rate": (
        b'{"step": 1, "learning_rate": true}',
        "learning_rate must be a finite",
    ),
    "state: larger than the cap": (
        b'{"step": 1, "pad": "' + b" " * (16 * 2**20) + b'"}',
        "larger than",
    ),
}


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("valid") / "ckpt"
    ac.save_checkpoint(
        path,
        {"w": np.ones(3, np.float32)},
        {"m": np.zeros(2, np.float32)},
        ac.TrainingState(step=5),
    )
    return path


def corrupt(valid: Path, where: Path, name: str, data: bytes | Callable[[Path], None]) -> Path:
    ckpt = where / "ckpt"
    ckpt.mkdir(parents=True)
    for f in valid.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    target = ckpt / name
    if callable(data):
        data(target)
    else:
        target.write_bytes(data)
    return target


def load_fails(ckpt: Path, path: Path, problem: str, *, mmap: bool = True) -> None:
    with pytest.raises(ac.CheckpointError) as info:
        ac.load_checkpoint(ckpt, mmap=mmap)
    message = str(info.value)
    assert str(path) in message, f"the message does not name the file: {message}"
    assert problem in message, f"the message does not name the problem: {message}"


def test_the_corpus_is_large_enough() -> None:
    assert len(SAFETENSORS) + len(STATE) + len(OTHER) >= 45


def test_the_base_file_is_valid(tmp_path: Path) -> None:
    """The corpus corrupts a file that is valid as built: only the corruption is wrong."""
    (tmp_path / "x.safetensors").write_bytes(st())
    from arrayckpt.format import SafetensorsReader

    arrays = SafetensorsReader(tmp_path / "x.safetensors").arrays()
    assert arrays["a"].tolist() == [0.0, 1.0] and arrays["b"].tolist() == [7]
    ok = with_checksums(GOOD_SUMS)
    (tmp_path / "y.safetensors").write_bytes(ok)
    assert SafetensorsReader(tmp_path / "y.safetensors").arrays()["b"].tolist() == [7]
    ac.TrainingState.from_json(b'{"step": 1, "learning_rate": 1e-3, "metadata": {"a": "b"}}')


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_malformed_safetensors(
    valid_checkpoint: Path, tmp_path: Path, case: str, mmap: bool
) -> None:
    data, problem = SAFETENSORS[case]
    for name in ("model.safetensors", "optimizer.safetensors"):
        path = corrupt(valid_checkpoint, tmp_path / name, name, data)
        load_fails(path.parent, path, problem, mmap=mmap)


@pytest.mark.parametrize("case", list(STATE))
def test_malformed_training_state(valid_checkpoint: Path, tmp_path: Path, case: str) -> None:
    data, problem = STATE[case]
    path = corrupt(valid_checkpoint, tmp_path, "training_state.json", data)
    load_fails(path.parent, path, problem)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _missing(path: Path) -> None:
    path.unlink()


OTHER: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "model file is a directory": ("model.safetensors", _directory, "is a directory"),
    "state file is a directory": ("training_state.json", _directory, "is a directory"),
    "optimizer file is a directory": ("optimizer.safetensors", _directory, "is a directory"),
    "state file missing": ("training_state.json", _missing, "does not exist"),
    "model file missing": ("model.safetensors", _missing, "no complete checkpoint"),
}


@pytest.mark.parametrize("case", list(OTHER))
def test_wrong_kind_of_file(valid_checkpoint: Path, tmp_path: Path, case: str) -> None:
    name, damage, problem = OTHER[case]
    path = corrupt(valid_checkpoint, tmp_path, name, damage)
    load_fails(
        path.parent,
        path if name != "model.safetensors" or "missing" not in case else path.parent,
        problem,
    )


def test_loading_never_runs_code() -> None:
    """No deserializer that can execute code is imported or called anywhere in the package."""
    import ast

    unsafe_modules = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle"}
    hits = []
    package = Path(ac.__file__).parent
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(package)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in unsafe_modules for n in names):
                    hits.append(f"{where}: imports {names}")
            elif isinstance(node, ast.Name) and node.id in {"eval", "exec"}:
                hits.append(f"{where}: {node.id}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr == "load"
                and isinstance(node.value, ast.Name)
                and node.value.id in {"torch", "yaml"}
            ):
                hits.append(f"{where}: {node.value.id}.load")
            elif (
                isinstance(node, ast.keyword)
                and node.arg == "allow_pickle"
                and not (isinstance(node.value, ast.Constant) and node.value.value is False)
            ):
                hits.append(f"{where}: allow_pickle")
    assert hits == []
