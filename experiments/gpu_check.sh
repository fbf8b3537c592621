#!/usr/bin/env bash
# Issue 23's device check, from the repository root on the GPU machine (docs/PERFORMANCE.md):
#   1. installs the carried wheels in .whl/ (ml_collections, which the test suite imports),
#   2. runs `python -m experiments.gpu_benchmark` (JSON rewritten after each row, so a cut run
#      keeps its rows),
#   3. runs the fast test tier once on the GPU backend, to find what breaks there.
# Everything lands in $OUT (default /tmp/gpu_check). Each part has its own time limit; the whole
# stays under 8 minutes. BENCH_ARGS / TEST_ARGS replace the parts' arguments (e.g. a CPU dry run:
# JAX_PLATFORMS=cpu BENCH_ARGS=--quick TEST_ARGS=tests/test_metrics.py experiments/gpu_check.sh).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-315}
TEST_LIMIT_S=${TEST_LIMIT_S:-110}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1  # `python -m` puts the repository root on the path
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv 2>&1
    "$PYTHON" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

echo "== benchmark (limit ${BENCH_LIMIT_S} s)"
timeout -k 10 "$BENCH_LIMIT_S" "$PYTHON" -m experiments.gpu_benchmark \
    --json "$OUT/gpu_benchmark.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_benchmark.log"
bench_rc=${PIPESTATUS[0]}

echo "== fast test tier (limit ${TEST_LIMIT_S} s)"
# No -x: one run should list every test that fails on this backend, not only the first.
# Workers share the GPU, so none may take most of its memory at start.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$TEST_LIMIT_S" "$PYTHON" -m pytest \
    -m "not slow" -q -rfEs -p no:cacheprovider --durations=10 --junitxml="$OUT/tests.xml" \
    ${TEST_ARGS:--n 8} 2>&1 | tee "$OUT/tests.log"
test_rc=${PIPESTATUS[0]}

echo "benchmark exit $bench_rc (124: out of time), tests exit $test_rc; files in $OUT"
[ "$bench_rc" = 0 ] && [ "$test_rc" = 0 ]
