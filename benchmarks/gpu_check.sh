#!/usr/bin/env bash
# One call on a GPU machine (no network; PyTorch, CuPy, numba, scipy already there):
# install the project without dependencies, run the GPU tests, compute-sanitizer (memcheck and
# racecheck) on a short fused forward+backward, and the fused-vs-eager benchmark.
# Writes logs, JSON and a summary table under $OUT (or ./gpu-out). Budget: under 6 minutes.
#   usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0
step() { echo "== $1 ($(date +%T))"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

step "install (no dependencies, no network)"
SITE=/tmp/fusedlinear-site
rm -rf "$SITE"
$PY -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . > "$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import fusedlinear, torch, cupy; print('fusedlinear', fusedlinear.__version__, 'torch', torch.__version__, 'cupy', cupy.__version__)"

step "GPU tests"
timeout 180 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool"
  timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY benchmarks/gpu_smoke.py > "$OUT/sanitizer_$tool.log" 2>&1
  rc=$?
  tail -3 "$OUT/sanitizer_$tool.log"
  [ "$rc" -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc"; status=1; }
done

step "benchmark"
timeout 120 $PY benchmarks/bench_gpu.py --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench_gpu.md" 2>/dev/null || tail -20 "$OUT/bench.log"
step "done (status $status)"
exit $status
