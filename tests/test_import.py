"""What importing arrayckpt and running its CLI's --help pull in (timed by
bench/import_time.py, not here: timings on shared machines vary)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
# safetensors' bindings and crc32c (which loads importlib.metadata) are needed only by a
# save or a load, so neither is imported by `import arrayckpt` or `--help`.
HEAVY = (
    "ml_dtypes",
    "torch",
    "jax",
    "cupy",
    "obstore",
    "mpi4py",
    "lightning",
    "safetensors",
    "crc32c",
)


def loaded_after(code: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_import_arrayckpt_skips_ml_dtypes_and_frameworks() -> None:
    assert not {m for m in HEAVY if m in loaded_after("import arrayckpt")}


def test_help_skips_ml_dtypes() -> None:
    code = (
        "import sys\nfrom arrayckpt.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert not {m for m in HEAVY if m in loaded_after(code)}


def test_bf16_still_loads_with_ml_dtypes_imported_on_demand(tmp_path: Path) -> None:
    code = (
        f"import numpy as np, arrayckpt as ac, sys\n"
        f"ac.save_checkpoint({str(tmp_path / 'c')!r}, {{'w': np.ones(2, np.float32)}})\n"
        f"assert 'ml_dtypes' not in sys.modules\n"
        f"from arrayckpt import dtypes\n"
        f"print(dtypes.by_code('BF16').numpy)\n"
    )
    assert "ml_dtypes" in loaded_after(code)
    import ml_dtypes

    import arrayckpt as ac

    ac.save_checkpoint(tmp_path / "b", {"w": np.ones(2, ml_dtypes.bfloat16)})
    assert ac.load_checkpoint(tmp_path / "b").model["w"].dtype == ml_dtypes.bfloat16


def test_the_import_benchmark_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "import_time.py"), "--runs", "1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1: a target missed on a busy machine
    assert "import arrayckpt" in proc.stdout and "ml_dtypes imported: no" in proc.stdout
