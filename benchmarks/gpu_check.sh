#!/usr/bin/env bash
# The one prepared run for a GPU machine that already has torch and triton:
# install genfast without letting pip touch torch, print the device and the
# versions, run the test suite on CUDA and the quick benchmarks, and leave the
# log (and each step's own, stepN-NAME.log) and the tables in OUTDIR. Every
# step has a time limit taken from one budget (GPU_CHECK_BUDGET seconds,
# default 510) so the whole run ends inside 9 minutes; a failed step does not
# stop the next; the exit status is non-zero if any step failed.
#
# On a fresh machine the tests spend most of their time compiling ~1200 Triton
# specializations: all of them need ~8 minutes on 16 cores, so with both parts
# the tests get 150 s (about a third of the suite) and the benchmarks the rest.
# Two runs cover everything: GPU_CHECK_PARTS=tests, then GPU_CHECK_PARTS=bench.
# A test's traceback is printed when it fails, so a run cut at its limit still
# says why.
#
# usage: benchmarks/gpu_check.sh OUTDIR
#   GPU_CHECK_WHEELS=DIR  wheels to install first, for a machine without a package index
#   GPU_CHECK_PARTS="tests bench"  (default) or one of them
#   GPU_CHECK_TESTS="FILE|NODE ..."  these tests only (default: every file, in priority order)
#   GPU_CHECK_BUDGET=SECONDS  (default 510)
#   GPU_CHECK_SKIP_CPP=1  skip the C++ build
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
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-510}
PARTS=${GPU_CHECK_PARTS:-tests bench}
FAILED=()
STEP=0

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
    # Each step's output goes to a file of its own as well: a log that does not come back whole
    # loses no step's output.
    STEP=$((STEP + 1))
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/step$STEP-${name// /_}.log"
    rc=${PIPESTATUS[0]}
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
    local torch_before torch_after rc=0 missing=()
    torch_before=$("$PY" -c "import torch; print(torch.__version__)") || return 1
    # Optional wheels for a machine without a package index (GPU_CHECK_WHEELS=DIR).
    if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
        "$PY" -m pip install -q --no-index --no-deps "$GPU_CHECK_WHEELS"/*.whl || rc=1
    fi
    # Only the light dependencies that are missing, by name, never torch: a
    # resolver that saw "torch>=2.5" could replace the machine's CUDA build.
    for m in pytest hypothesis scipy numpy ninja filelock diffusers rich matplotlib; do
        "$PY" -c "import $m" 2>/dev/null || missing+=("$m")
    done
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}"
        "$PY" -m pip install -q --retries 0 --timeout 10 "${missing[@]}" || echo "(not installed: the tests that need them skip)"
    fi
    # No build isolation: it would download setuptools. GENFAST_NO_BUILD: the
    # C++ kernels compile in their own step.
    GENFAST_NO_BUILD=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e . || rc=1
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

# Each step's reserve is the least time the steps after it need, so the worst
# case still ends near the budget. The C++ kernels (the CPU backend, which CI
# covers) build in the background meanwhile, to show they compile against this
# machine's torch; the tests here are the GPU's: Triton and the reference on CUDA.
echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, output in $OUT"
step versions 20 $((BUDGET - 30)) bash -c versions
step install 60 $((BUDGET - 90)) bash -c install
# GPU_CHECK_SKIP_CPP=1: not the C++ build (a second run on the same machine; its timings stay quieter)
BUILD_PID=
if [ -z "${GPU_CHECK_SKIP_CPP:-}" ]; then
    # Low priority and the rest of the budget: it shares the cores with the tests' Triton compiles.
    build_limit=$((BUDGET - SECONDS - 10))
    ((build_limit < 5)) && build_limit=5
    GENFAST_CACHE=$(mktemp -d) timeout "$build_limit" nice -n 10 "$PY" -m genfast build >"$OUT/.build.log" 2>&1 &
    BUILD_PID=$!
else
    echo "C++ build skipped (GPU_CHECK_SKIP_CPP)" >"$OUT/.build.log"
fi
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$(($(nproc) < 16 ? $(nproc) : 16))")
if [[ $PARTS == *tests* ]]; then
    # The tests alone get the whole budget; with the benchmarks, 150 s.
    if [[ $PARTS == *bench* ]]; then limit=150 reserve=270; else limit=$BUDGET reserve=5; fi
    # Files in the order they are handed to the workers: first those whose GPU runs found what the
    # interpreter cannot (whole loops, compiled steps, fp8 bytes, the sampler), then the rest.
    files=()
    if [ -n "${GPU_CHECK_TESTS:-}" ]; then
        read -r -a files <<<"$GPU_CHECK_TESTS"
    else
        for f in e2e hf schedulers sampling attention diffusion vae activation; do files+=("tests/test_$f.py"); done
        for f in tests/test_*.py; do [[ " ${files[*]} " == *" $f "* ]] || files+=("$f"); done
    fi
    step tests $limit $reserve env GENFAST_DISABLE_CPP=1 GENFAST_REPORT_FAILURES=1 "$PY" -m pytest "${files[@]}" -v \
        --tb=short -p no:cacheprovider "${XDIST[@]}" --maxfail=50 -rf -W ignore::UserWarning
    # -v: each test's result is in the log as it ends, even if the step is cut before the summary.
    pkill -9 -f -- "-m pytest" 2>/dev/null  # a run cut at its limit leaves its xdist workers busy
fi
if [[ $PARTS == *bench* ]]; then
    # The benchmarks in four parts, most wanted first, each with its own tables
    # (attention's first calls compile a dozen prefill/decode specializations:
    # sampling gets its own step so that a slow compile cannot cost its rows).
    bench() {
        local name=$1
        shift
        step "bench $name" "$@" --quick --device cuda --json "$OUT/bench_$name.json" --markdown "$OUT/bench_$name.md"
    }
    # Limits L and reserves R with the tests before them, and (bench alone) with the budget to
    # themselves and two more steps after them.
    # Bench alone: limits for the default budget, scaled to another (an H200 run: attention was cut
    # at 58 s; the six steps after it took 35, 69, 35, 46, 54 and 56 s of wall).
    if [[ $PARTS == *tests* ]]; then L=(75 35 60 40 60) R=(195 160 100 60 0)
    else
        L=() R=()
        for x in 100 40 70 45 55 75 15 55; do L+=($((x * BUDGET / 510))); done
        for ((i = 0; i < ${#L[@]}; i++)); do r=0; for ((j = i + 1; j < ${#L[@]}; j++)); do r=$((r + L[j])); done; R+=($r); done
    fi
    bench attention "${L[0]}" "${R[0]}" "$PY" -m genfast bench --ops attention
    bench sampling "${L[1]}" "${R[1]}" "$PY" -m genfast bench --ops sampling
    bench pointwise "${L[2]}" "${R[2]}" "$PY" -m genfast bench --ops vae conv
    bench diffusion "${L[3]}" "${R[3]}" "$PY" -m genfast bench --ops diffusion
    # The decode loop end to end at the quick size (launch-bound on a GPU): genfast eager and with
    # its step in a CUDA graph, the gpt-fast-style loop, HF generate; no torch.compile (its compile
    # alone would spend the budget). The table is in the log.
    step "e2e decode" "${L[4]}" "${R[4]}" "$PY" benchmarks/e2e/decode.py --device cuda --no-compile
    # With the budget to themselves, the benchmarks add the SD1.5 UNet's sampling loop (25 DPM++ 2M
    # steps, patched UNet and fused scheduler against the diffusers loop, then one forward of each
    # under the profiler: where an uncaptured loop's host time goes), each quick case's kernel
    # times next to its wall time (the medians above include this host's launch time) and, before
    # that, the host's time per call.
    if [[ $PARTS != *tests* ]]; then
        step "e2e diffusion" "${L[5]}" "${R[5]}" "$PY" benchmarks/e2e/diffusion.py --device cuda --full --profile
        # The host's cost per call: one ATen kernel, eager GroupNorm+SiLU, genfast's ops, bare Triton
        # launches with 1 and 24 arguments (what a host-bound loop is made of).
        step "host time" "${L[6]}" "${R[6]}" "$PY" benchmarks/host_time.py --device cuda
        step profile "${L[7]}" "${R[7]}" "$PY" benchmarks/gpu_profile.py --quick --skip torch.compile \
            --ops sampling diffusion group_norm_act batch_norm_act gated_act attention
    fi
fi
rc=0
if [ -n "$BUILD_PID" ]; then wait "$BUILD_PID" || rc=$?; fi
echo "=== C++ build (background): exit $rc"
cat "$OUT/.build.log"
rm -f "$OUT/.build.log"

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
