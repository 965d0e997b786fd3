"""get_rng_state / set_rng_state: every imported global generator, through a checkpoint."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac


def _draws() -> list[float]:
    import torch

    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


def test_states_survive_a_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch is not installed")
    state = ac.get_rng_state()
    assert set(state) == {"python", "numpy", "torch"}
    expected = _draws()
    ac.save_checkpoint(tmp_path / "c", {"w": np.ones(1)}, extra={"rng": state})
    _draws()  # move every generator on
    ac.set_rng_state(ac.load_checkpoint(tmp_path / "c").extra["rng"])
    assert _draws() == expected


def test_imports_no_framework() -> None:
    code = (
        "import sys, arrayckpt as ac; s = ac.get_rng_state(); "
        "assert 'torch' not in sys.modules and 'torch' not in s, sorted(s); print(sorted(s))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "numpy" in out.stdout


def test_bad_state_is_refused() -> None:
    with pytest.raises(ac.InvalidInputError, match="unknown generators"):
        ac.set_rng_state({"jax": 1})
    with pytest.raises(ac.InvalidInputError, match="does not fit"):
        ac.set_rng_state({"numpy": {"bit_generator": "nope"}})
