#!/usr/bin/env bash
# One call on a GPU machine without network: install carried wheels, build the extension with all
# cores, run every test (GPU tests included) and the benchmarks; logs, JSON and tables go to OUT_DIR.
#
#   bash bench/gpu_run.sh [OUT_DIR]        (default: $OUT, else ./gpu_out)
#
# Expects python3 with torch (CUDA) and nvcc; wheels for whatever else is missing in .whl/
# (../shared/tools/device_wheels.sh puts nvidia-cutlass there). Extra arguments: KEYE_PYTEST_K (a pytest -k
# expression, e.g. "moe or sparse"), KEYE_PYTEST_ARGS (more pytest words),
# KEYE_BENCH_ARGS (keye bench); time limits KEYE_TEST_TIMEOUT / KEYE_BENCH_TIMEOUT (seconds); KEYE_ONLY_BUILD=1
# stops after the build (for profiling commands that follow in the same call).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(mkdir -p "${1:-${OUT:-gpu_out}}" && cd "${1:-${OUT:-gpu_out}}" && pwd)
exec > >(tee "$OUT_DIR/run.log") 2>&1
export PYTHONUNBUFFERED=1 KEYE_REQUIRE_KERNELS=1 KEYE_BUILD_JOBS="${KEYE_BUILD_JOBS:-$(nproc)}"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/keye-site .whl/*.whl
  export PYTHONPATH="/tmp/keye-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv || true

t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . > "$OUT_DIR/build.log" 2>&1; then
  tail -n 60 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s with $KEYE_BUILD_JOBS jobs"
python3 -m keye info
# registers / shared memory / stack of every kernel (spills show as STACK or LOCAL > 0)
cuobjdump --dump-resource-usage keye/_C*.so > "$OUT_DIR/resources.txt" 2>&1 || true
[ "${KEYE_ONLY_BUILD:-0}" = 1 ] && exit 0

status=0
timeout "${KEYE_TEST_TIMEOUT:-420}" python3 -m pytest -q -rs tests -p no:cacheprovider --junitxml "$OUT_DIR/tests.xml" \
  ${KEYE_PYTEST_K:+-k "$KEYE_PYTEST_K"} ${KEYE_PYTEST_ARGS:-} || status=1
timeout "${KEYE_BENCH_TIMEOUT:-300}" python3 -m keye bench ${KEYE_BENCH_ARGS:-} --json "$OUT_DIR/bench.json" \
  | tee "$OUT_DIR/bench.txt" || status=1
echo "gpu_run: $([ $status = 0 ] && echo OK || echo FAILED)"
exit $status
