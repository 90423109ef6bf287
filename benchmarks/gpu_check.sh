#!/usr/bin/env bash
# One call on a GPU machine, everything written under $OUT (or ./gpu-out); under 6 minutes (the
# step timeouts below add up to 345 s, plus the install):
#   1. install the project (and the CuPy wheel for the CUDA major version PyTorch was built with,
#      if CuPy is missing and a package index is reachable);
#   2. `fusedlinear parity` — every backend and dtype that can run here against float64 PyTorch;
#   3. the GPU tests (tests/test_gpu.py: forced cupy backend, both engines, CUDA-graph capture);
#   4. compute-sanitizer memcheck, racecheck and synccheck on a short fused forward+backward;
#   5. benchmarks/bench_gpu.py --quick (fused per engine vs eager vs torch.compile, MNIST step
#      plain and CUDA-graph captured, fp32/TF32/bf16/fp16).
# Each step has its own timeout; the exit status is non-zero if any step failed.
#   usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$OUT/cupy-cache}
status=0
step() { echo "== $1 ($(date +%T))"; }
fail() { echo "FAILED: $1"; status=1; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

step "install"
SITE=/tmp/fusedlinear-site
rm -rf "$SITE"
$PY -m pip install -q --no-deps --no-build-isolation --target "$SITE" . > "$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import cupy" 2>/dev/null; then
  major=$($PY -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
  echo "CuPy missing: pip install cupy-cuda${major}x" | tee -a "$OUT/install.log"
  timeout 60 $PY -m pip install -q --retries 0 --timeout 10 "cupy-cuda${major}x" >> "$OUT/install.log" 2>&1 || echo "(no CuPy wheel installed)"
fi
$PY -c "import fusedlinear, torch, cupy; print('fusedlinear', fusedlinear.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)" \
  | tee "$OUT/versions.txt" || fail "import"
(cd /tmp && $PY -m fusedlinear info) > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

step "fusedlinear parity"
timeout 50 $PY -m fusedlinear parity > "$OUT/parity.txt" 2>&1 || fail "parity"
tail -40 "$OUT/parity.txt"

step "GPU tests"
timeout 100 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x > "$OUT/gpu_tests.log" 2>&1 || fail "GPU tests"
tail -5 "$OUT/gpu_tests.log"

for tool in memcheck racecheck synccheck; do
  step "compute-sanitizer --tool $tool"
  timeout 35 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY benchmarks/gpu_smoke.py > "$OUT/sanitizer_$tool.log" 2>&1 \
    || fail "compute-sanitizer $tool (exit $?)"
  tail -3 "$OUT/sanitizer_$tool.log"
done

step "benchmark"
timeout 90 $PY benchmarks/bench_gpu.py --quick --out "$OUT" > "$OUT/bench.log" 2>&1 || fail "benchmark (partial results kept)"
cat "$OUT/bench_gpu.md" 2>/dev/null || tail -20 "$OUT/bench.log"
step "done (status $status)"
exit $status
