#!/usr/bin/env bash
# The GPU checks, as one script for a session that gets a CUDA machine (it starts bare).
#
#     OUT=/some/dir bash bench/gpu_check.sh      # from the repository root
#
# 1. a venv with arrayckpt[test] and a CUDA build of torch (and cupy-cuda12x if it installs),
# 2. the GPU tests (`pytest -m gpu`) and the suites whose backends gain torch-cuda/CuPy,
# 3. `bench/run.py --gpu --quick` (torch CUDA -> pinned stall against the D2H limit, plain
#    .cpu() copies and DCP async_save; CuPy cases where CuPy installed).
# Writes at most 7 flat files to $OUT: env.txt install.log pytest_gpu.log pytest_more.log
# bench.log bench.json summary.txt. Every step has a time cap; the whole script stays under
# about 7.5 minutes (DEADLINE_S) and carries on past a failed step, recording it.
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
DEADLINE_S=${DEADLINE_S:-450}
VENV=${VENV:-/tmp/arrayckpt-gpu-venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

left() { echo $((DEADLINE_S - SECONDS)); }
# step NAME CAP_S LOG CMD...: run CMD for at most min(CAP_S, time left - 10 s), log its rc.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local limit
    limit=$(left)
    limit=$((limit - 10))
    ((limit > cap)) && limit=$cap
    if ((limit < 5)); then
        echo "$name: SKIPPED (out of time)" | tee -a "$SUMMARY"
        return 0
    fi
    local t0=$SECONDS
    echo "== $name (cap ${limit}s): $*" >>"$log"
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict=ok
    ((rc == 124 || rc == 137)) && verdict="TIMED OUT after ${limit}s"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED rc=$rc"
    echo "$name: $verdict ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
    return $rc
}

{
    date -u
    nvidia-smi || echo "nvidia-smi: not found"
    nproc
    python3 --version
    git log -1 --oneline 2>/dev/null || true
} >"$OUT/env.txt" 2>&1

# --- 1. environment ----------------------------------------------------------------------
# System site-packages: a machine image that already has torch/cupy saves the download.
step venv 60 "$OUT/install.log" python3 -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
[ -x "$PY" ] || PY=python3
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "torch with CUDA already present" >>"$OUT/install.log"
    step install 120 "$OUT/install.log" "$PY" -m pip install ".[test]"
else
    # Plain `torch` from PyPI is the CUDA build on Linux x86_64.
    step install 240 "$OUT/install.log" "$PY" -m pip install ".[test]" torch
fi
step install-cupy 60 "$OUT/install.log" "$PY" -m pip install cupy-cuda12x \
    || echo "cupy: not installed; its tests and bench cases skip" | tee -a "$SUMMARY"
"$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import importlib
for name in ("numpy", "safetensors", "torch", "cupy"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:  # report, never stop: the steps below say what skips
        print(name, "unavailable:", exc)
try:
    import torch
    print("torch.cuda.is_available:", torch.cuda.is_available(), torch.version.cuda)
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(0))
except Exception as exc:
    print("torch cuda:", exc)
try:
    import cupy
    print("cupy devices:", cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print("cupy cuda:", exc)
EOF

# --- 2. tests ----------------------------------------------------------------------------
# -rs lists every skip with its reason: a skipped GPU test here means a broken setup.
step pytest-gpu 90 "$OUT/pytest_gpu.log" \
    "$PY" -m pytest -p no:cacheprovider -m gpu -v -rs tests
# The suites whose backend fixtures and async paths gain torch-cuda (and CuPy) here.
step pytest-more 100 "$OUT/pytest_more.log" \
    "$PY" -m pytest -p no:cacheprovider -q -rs -x \
    tests/test_async_checkpointer.py tests/test_checkpoint.py tests/test_backends.py \
    tests/test_fill.py tests/test_docs.py tests/test_pool.py tests/test_hostcopy.py \
    tests/test_staging_modes.py tests/test_staging_budget.py

# --- 3. benchmark ------------------------------------------------------------------------
rm -f bench/results/bench-cuda-quick-*.json
step bench 200 "$OUT/bench.log" "$PY" bench/run.py --gpu --quick
step bench-staging 60 "$OUT/bench.log" "$PY" bench/staging.py --quick
newest=$(ls -t bench/results/bench-cuda-quick-*.json 2>/dev/null | head -1)
[ -n "$newest" ] && cp "$newest" "$OUT/bench.json"
echo "total: ${SECONDS} s" | tee -a "$SUMMARY"
exit 0
