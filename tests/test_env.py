"""arrayckpt/env.py: bad ARRAYCKPT_* values are InvalidInputErrors naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import arrayckpt as ac
from arrayckpt import env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["0", "-2", "four", "1.5"])
def test_a_bad_positive_int_names_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", value)
    with pytest.raises(ac.InvalidInputError, match=r"ARRAYCKPT_TEST_VAR=.*positive integer"):
        env.positive_int("ARRAYCKPT_TEST_VAR", 3)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_bad_seconds_name_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", value)
    with pytest.raises(ac.InvalidInputError, match=r"ARRAYCKPT_TEST_VAR=.*positive number"):
        env.positive_seconds("ARRAYCKPT_TEST_VAR", 1.0)


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("ON", True), ("yes", True), ("0", False), ("Off", False)]
)
def test_a_switch_reads_on_and_off(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", value)
    assert env.switch("ARRAYCKPT_TEST_VAR", not expected) is expected


@pytest.mark.parametrize("value", ["2", "maybe", "-"])
def test_a_bad_switch_names_the_variable_and_the_values(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", value)
    with pytest.raises(ac.InvalidInputError, match=r"ARRAYCKPT_TEST_VAR=.*1 or 0"):
        env.switch("ARRAYCKPT_TEST_VAR", True)


@pytest.mark.parametrize("value", ["-1", "20", "ten", "2.5"])
def test_an_int_out_of_its_range_names_the_variable_and_the_range(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", value)
    with pytest.raises(ac.InvalidInputError, match=r"ARRAYCKPT_TEST_VAR=.*from 0 to 19"):
        env.int_between("ARRAYCKPT_TEST_VAR", 10, 0, 19)
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", "0")
    assert env.int_between("ARRAYCKPT_TEST_VAR", 10, 0, 19) == 0


def test_unset_or_blank_gives_the_default_and_good_values_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ARRAYCKPT_TEST_VAR", raising=False)
    assert env.positive_int("ARRAYCKPT_TEST_VAR", 3) == 3
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", " ")
    assert env.positive_seconds("ARRAYCKPT_TEST_VAR", 2.5) == 2.5
    monkeypatch.setenv("ARRAYCKPT_TEST_VAR", " 7 ")
    assert env.positive_int("ARRAYCKPT_TEST_VAR", 3) == 7
    assert env.positive_seconds("ARRAYCKPT_TEST_VAR", 1.0) == 7.0


def test_a_bad_thread_count_fails_the_save_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARRAYCKPT_THREADS", "many")
    with pytest.raises(ac.InvalidInputError, match="ARRAYCKPT_THREADS='many'"):
        ac.save_checkpoint(tmp_path / "c", {"w": np.ones(4, np.float32)})
    assert list(tmp_path.iterdir()) == []  # no debris


def _run(body: str, tmp_path: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **environ},
    )


def test_a_bad_exit_timeout_refuses_the_save_instead_of_dropping_it_at_exit(
    tmp_path: Path,
) -> None:
    result = _run(
        """
        import sys
        import numpy as np
        import arrayckpt as ac

        ac.AsyncCheckpointer().save(sys.argv[1] + "/ckpt", {"w": np.ones(4, np.float32)})
        """,
        tmp_path,
        ARRAYCKPT_EXIT_TIMEOUT="ten minutes",
    )
    assert result.returncode == 1
    assert "InvalidInputError" in result.stderr
    assert "ARRAYCKPT_EXIT_TIMEOUT='ten minutes'" in result.stderr
    assert not (tmp_path / "ckpt").exists()


def test_an_exit_timeout_broken_after_the_save_still_waits_for_it(tmp_path: Path) -> None:
    result = _run(
        """
        import os, sys
        import numpy as np
        import arrayckpt as ac

        ac.AsyncCheckpointer().save(sys.argv[1] + "/ckpt", {"w": np.ones(4, np.float32)})
        os.environ["ARRAYCKPT_EXIT_TIMEOUT"] = "-1"
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "ARRAYCKPT_EXIT_TIMEOUT='-1'" in result.stderr
    assert (ac.load_checkpoint(tmp_path / "ckpt").model["w"] == 1).all()
