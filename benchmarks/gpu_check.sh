#!/usr/bin/env bash
# One call on the GPU machine, from the repository root, results under $OUT (default ./gpu-out).
# That machine: python3 is /opt/torch/.venv/bin/python3 with torch, CuPy, pytest preinstalled; no
# network; the call is killed after 10 minutes; only 8 files under $OUT (<= 2 folders deep) come
# back. So: nothing is downloaded (the package tree is copied to a staging folder on PYTHONPATH),
# every step runs under `timeout` inside one overall budget (GPU_CHECK_SECONDS, default 330 s:
# the call ends inside 6 minutes), and $OUT gets 7 files:
#   env.txt        nvidia-smi, versions, `fusedlinear info`
#   steps.txt      each step: ok / FAILED rc / TIMED OUT, and its seconds
#   tests.log      the GPU-marked tests (tests/test_gpu.py), the torch.compile one last
#   parity.txt     `fusedlinear parity --backend cupy --quick --progress` (rows as they complete)
#   sanitizer.log  compute-sanitizer memcheck, racecheck, initcheck on benchmarks/gpu_smoke.py:
#                  torch's caching allocator off (so out-of-bounds reads hit unallocated memory),
#                  memcheck and racecheck on our kernels only (names start with fl_)
#   bench.md       benchmarks/bench_gpu.py rows, each appended the moment it is measured: the
#                  4096^3 layer in every dtype, the MNIST step ungraphed / make_graphed_callables /
#                  torch.cuda.graph, then torch.compile(mode="reduce-overhead"), each beside eager
#   bench.log      the benchmark's tracebacks, if any
# CuPy's kernel cache and torch.compile's caches stay outside $OUT.
# Exit status: 0 when every step passed.
#
# GPU_CHECK_DRY=1 (tests/test_gpu_check_dry.py): the same interpreter finding, install, steps and
# timeouts on a CPU machine, with stand-ins for nvidia-smi and compute-sanitizer on PATH; the
# parity and benchmark steps run their CPU forms (backend torch; bench_gpu.py --dry).
#   usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_SECONDS:-330}
START=$SECONDS
status=0

# The interpreter: $PYTHON, else the GPU machine's, else python3 on PATH.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3
else PY=$(command -v python3); fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_INDEX=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-${TMPDIR:-/tmp}/fusedlinear-cupy-cache}
if [ -z "${CUDA_PATH:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_PATH=/usr/local/cuda; fi  # CuPy's headers

# step NAME LIMIT LOG COMMAND...: COMMAND under `timeout` (the smaller of LIMIT and what is left
# of the budget; SIGTERM, then SIGKILL 5 s later, to its whole process group), output appended to
# LOG, one line in steps.txt.
: > "$OUT/steps.txt"
# GPU_CHECK_ONLY=tests,memcheck,... (step names, spaces as dashes: bench-layers): a short rerun of
# those steps (gpu, install and import always run).
ONLY=${GPU_CHECK_ONLY:-}
step() {
  local name=$1 limit=$2 log=$3 left t0 rc note
  shift 3
  case "$name" in gpu|install|import) ;; *)
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",${name// /-},"* ]]; then return; fi ;;
  esac
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then
    echo "$name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$OUT/steps.txt"; status=1; return
  fi
  echo "== $name (limit ${limit}s, $(date +%T))" >> "$log"
  t0=$SECONDS
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) note=ok ;;
    124|137) note="TIMED OUT after ${limit}s (rc $rc; rows so far kept)"; status=1 ;;
    *) note="FAILED (rc $rc)"; status=1 ;;
  esac
  echo "$name: $note, $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

ENV=$OUT/env.txt
: > "$ENV"
echo "python: $PY; CUDA_PATH=${CUDA_PATH:-unset}; CUPY_CACHE_DIR=$CUPY_CACHE_DIR; dry=$DRY" >> "$ENV"
step gpu 15 "$ENV" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv

# Install without the network: the package tree as setuptools' package-dir maps it, on PYTHONPATH.
STAGE=${TMPDIR:-/tmp}/fusedlinear-stage
step install 30 "$ENV" bash -c 'rm -rf "$1" && mkdir -p "$1/fusedlinear" && cp -r src/fusedlinear/. "$1/fusedlinear/" &&
  for d in kernels backend torch_ext; do cp -r "$d" "$1/fusedlinear/"; done' _ "$STAGE"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
step import 60 "$ENV" "$PY" -c "import fusedlinear, torch; print('fusedlinear', fusedlinear.__version__, 'from',
fusedlinear.__file__, '| torch', torch.__version__, 'cuda', torch.version.cuda)"
step info 45 "$ENV" "$PY" -m fusedlinear info

# The GPU-marked tests; the torch.compile one (a compile costs 10-60 s) in a step of its own after
# the sanitizers (a known failure must not take budget from parity and the sanitizers), with its
# whole traceback in the log (on 2026-12-06 it failed on an H100 and a `| tail -5` kept no cause).
step tests 110 "$OUT/tests.log" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --maxfail=40 \
  -k "not torch_compile"

if [ "$DRY" = 1 ]; then PARITY=(--backend torch --dtype float32); else PARITY=(--backend cupy); fi
step parity 40 "$OUT/parity.txt" "$PY" -m fusedlinear parity "${PARITY[@]}" --quick --progress

# memcheck and racecheck instrument our kernels only (kns=fl_: racecheck on cuBLAS alone outlasts
# the budget). initcheck instruments every kernel: it learns which bytes are initialised from the
# writes it sees, and a write by a kernel it does not instrument (torch's fill and copy, cuBLAS)
# goes unseen, so with the filter each of our kernels' reads of a torch-written input is reported
# as uninitialised (seen on an H100, 2026-12-06: 100 such reports of dA in fl_grad_identity_bf16,
# then the step's timeout).
# Unfiltered, initcheck may also report inside torch's or cuBLAS's kernels (CUB/Thrust and
# cuSPARSE are known to draw initcheck reports): the step fails on the program's own exit status,
# and the next one on a report in one of our kernels (names start with fl_) only.
SAN=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer)
OURS=(--error-exitcode 9 --kernel-name kns=fl_)  # any report fails the step; our kernels only
step memcheck 60 "$OUT/sanitizer.log" "${SAN[@]}" "${OURS[@]}" --tool memcheck "$PY" benchmarks/gpu_smoke.py
step racecheck 30 "$OUT/sanitizer.log" "${SAN[@]}" "${OURS[@]}" --tool racecheck "$PY" benchmarks/gpu_smoke.py --quick
step initcheck 60 "$OUT/sanitizer.log" "${SAN[@]}" --tool initcheck "$PY" benchmarks/gpu_smoke.py --quick
step "initcheck fl_ reports" 5 "$OUT/sanitizer.log" bash -c \
  'if grep -A1 "Uninitialized" "$1" | grep "at fl_"; then exit 1; fi' _ "$OUT/sanitizer.log"

step "compile test" 90 "$OUT/tests.log" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  -k torch_compile --tb=long -rA

if [ "$DRY" = 1 ]; then BENCH=(--dry --inner 2 --rounds 3 --dry-sleep "${GPU_CHECK_DRY_SLEEP:-0}" --dry-fail "${GPU_CHECK_DRY_FAIL:-}"); else BENCH=(); fi
BENCH_RUN=("$PY" benchmarks/bench_gpu.py --md "$OUT/bench.md" "${BENCH[@]}")
step "bench layers" "${GPU_CHECK_LAYERS_LIMIT:-45}" "$OUT/bench.log" "${BENCH_RUN[@]}" --part layers
step "bench mnist graphs" 45 "$OUT/bench.log" "${BENCH_RUN[@]}" --part mnist
step "bench compile" 90 "$OUT/bench.log" "${BENCH_RUN[@]}" --part compile

echo "== done: status $status, $((SECONDS - START)) s" | tee -a "$OUT/steps.txt"
exit $status
