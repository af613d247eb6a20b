#!/usr/bin/env bash
# The one prepared run for a GPU machine that already has torch and triton:
# install genfast without letting pip touch torch, print the device and the
# versions, run the test suite on CUDA and the quick benchmarks, and leave the
# log and the tables in OUTDIR. Every step has a time limit taken from one
# budget (GPU_CHECK_BUDGET seconds, default 400) so the whole run ends well
# inside 8 minutes; a failed step does not stop the next; the exit status is
# non-zero if any step failed.
#
# usage: benchmarks/gpu_check.sh OUTDIR
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-400}
FAILED=()

# step NAME LIMIT RESERVE CMD...: run CMD for at most LIMIT seconds, and never
# into the RESERVE seconds that the later steps need.
step() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    local left=$((BUDGET - SECONDS - reserve))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 5)); then
        echo "=== $name: skipped, the time budget is spent"
        FAILED+=("$name (no time left)")
        return
    fi
    echo
    echo "=== $name (limit ${limit}s, ${SECONDS}s elapsed): $*"
    local start=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" || rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    if ((rc != 0)); then FAILED+=("$name (exit $rc)"); fi
}

versions() {
    nvidia-smi || return 1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")
EOF
}

install() {
    local torch_before torch_after
    torch_before=$("$PY" -c "import torch; print(torch.__version__)") || return 1
    # The light dependencies by name, then genfast with --no-deps: a resolver
    # that saw "torch>=2.5" could replace the machine's CUDA build of torch.
    "$PY" -m pip install --retries 1 --timeout 20 \
        pytest hypothesis scipy numpy rich matplotlib pytest-benchmark ninja filelock
    local rc=$?
    # No build isolation: it would download setuptools. GENFAST_NO_BUILD: the
    # C++ kernels compile in the build step, where their time shows.
    GENFAST_NO_BUILD=1 "$PY" -m pip install --no-deps --no-build-isolation -e . || rc=1
    torch_after=$("$PY" -c "import torch; print(torch.__version__)") || return 1
    if [ "$torch_before" != "$torch_after" ]; then
        echo "torch changed from $torch_before to $torch_after during the install"
        rc=1
    fi
    "$PY" -c "import genfast, genfast.kernels; print('genfast', genfast.__version__, 'from', genfast.__file__)" || rc=1
    return $rc
}

# timeout runs programs, not shell functions: the two functions go through bash -c.
export -f versions install
export PY

# Limits and reserves (seconds) for the default budget of 400: each step's
# reserve is the least time the steps after it need (install 40, build 40,
# info 20, tests 100, bench 120), so the worst case still ends near 400 s.
echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, output in $OUT"
step versions 20 320 bash -c versions
step install 90 280 bash -c install
step build 120 240 "$PY" -m genfast build
step info 30 220 "$PY" -m genfast info
step tests 240 120 "$PY" -m pytest tests -q --maxfail=25 -rf
step bench 180 0 "$PY" -m genfast bench --quick --device cuda \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" --markdown "$OUT/bench.md" --plot "$OUT/bench.png"

echo
echo "gpu_check: ${SECONDS}s in all; files in $OUT:"
ls -l "$OUT"
status=0
if ((${#FAILED[@]})); then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    status=1
else
    echo "gpu_check: every step passed"
fi
exec >&- 2>&-  # close the pipe so that tee writes the end of the log before we exit
wait "$TEE_PID" 2>/dev/null
exit $status
