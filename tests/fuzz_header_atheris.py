"""Optional coverage-guided fuzzing of the safetensors header validator with atheris.

    pip install atheris
    python tests/fuzz_header_atheris.py -atheris_runs=1000000 [corpus_dir]

Every input is a candidate file; the validator must accept it or raise
`CheckpointError` (anything else, or a crash, is a finding). Not collected by pytest.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from arrayckpt.errors import CheckpointError
    from arrayckpt.format import parse_header

PATH = Path("fuzz.safetensors")


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(CheckpointError):
        parse_header(PATH, data, len(data))


def seed_corpus() -> str:
    """A directory holding one valid arrayckpt file, so the fuzzer starts deep."""
    import numpy as np

    import arrayckpt as ac

    where = Path(tempfile.mkdtemp(prefix="arrayckpt-atheris-"))
    ac.save_checkpoint(
        where / "ckpt", {"w": np.ones((2, 3), np.float32), "b": np.zeros(0, np.int64)}
    )
    (where / "seeds").mkdir()
    (where / "seeds" / "valid").write_bytes((where / "ckpt" / "model.safetensors").read_bytes())
    return str(where / "seeds")


def main() -> None:
    argv = (
        sys.argv if any(not a.startswith("-") for a in sys.argv[1:]) else [*sys.argv, seed_corpus()]
    )
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
