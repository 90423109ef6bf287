#!/usr/bin/env bash
# The CPU benchmark set behind benchmarks/RESULTS.md. Each provider runs in its own processes,
# alternated over rounds (see `fusedlinear bench --help`). Needs `pip install ".[bench]"`.
# Writes benchmarks/results/cpu.csv and cpu_coretype_env.csv (appended) and the PNG plots.
# About 20 minutes on 2 cores.
#
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: some machines (this project's VM among them) set these to
# work around older OpenBLAS builds; on a current OpenBLAS they force its AVX2 (Haswell) kernels.
# The main tables run without them, as a current install runs; one step table runs with the
# environment as it is, for comparison. The CSV column openblas_core names the kernels that ran.
set -euo pipefail
cd "$(dirname "$0")"
R=results
mkdir -p "$R"
fl() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fusedlinear.bench "$@" --csv "$R/cpu.csv"; }
fl step --providers fused,eager,blas --batches 1,64,256,1024 --rounds 5 --plot "$R/step.png"
python -m fusedlinear.bench step --providers fused,eager --batches 1,64,256,1024 --rounds 5 --csv "$R/cpu_coretype_env.csv"
fl step --providers fused_mkl,fused_openblas,eager --batches 1,64,256,1024 --rounds 3
fl step --providers fused,eager,compile --batches 64,1024 --rounds 2
fl infer --providers fused,eager --batches 1,64,1024 --rounds 3
fl layer --shape 784x512 --mode fwdbwd --providers fused,eager,blas --batches 1,16,64,256,1024,4096 --rounds 3 \
   --plot "$R/layer_784x512.png"
fl layer --shape 784x512 --mode forward --providers fused,eager --batches 64,1024 --rounds 3
fl layer --shape 784x512 --mode backward --providers fused,eager --batches 64,1024 --rounds 3
fl layer --shape 512x10 --mode fwdbwd --providers fused,eager --batches 64,1024 --rounds 3
for n in 1024 2048; do
  fl layer --shape ${n}x${n} --mode fwdbwd --providers fused,eager,blas --batches 64,256,1024 --rounds 3
done
for act in gelu sigmoid; do
  fl layer --shape 784x512 --mode fwdbwd --activation $act --providers fused,eager --batches 64,1024 --rounds 3
done
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fusedlinear.bench coldstart --csv "$R/coldstart.csv"
