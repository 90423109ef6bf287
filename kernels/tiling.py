"""Tunables: how each kernel cuts its work into tiles, for the CPU and for CUDA launches.

Kept in one place, and plain Python, so the Numba kernels, the CuPy launcher and the C++
emulation harness in ``tests/`` all take grid and tile sizes from the same functions.
"""

from __future__ import annotations

import math

# ---- CPU (Numba kernels on PyTorch's OpenMP pool, single-threaded BLAS per tile) -------------
# Small batches (M < CPU_WHOLE_MIN_ROWS): each tile is one single-threaded BLAS call followed by
# the epilogue while the tile is hot. A tile spans all M rows and a block of columns, so every
# thread packs only its own slice of W, once: bands of rows instead (each packing all of W)
# measured 20% slower at M = 64 (2-core EPYC, MKL, 2026-11).
CPU_TILES_PER_THREAD = 1
CPU_MIN_TILE_N = 64
# Large batches: one band of rows per thread (each packing all of W) instead. In-process
# alternation, 784->512 ReLU, bands over column blocks: forward 0.99 at M=1024, 0.91 at M=4096;
# backward 0.94 and 0.98 (2-core EPYC, SkylakeX OpenBLAS, 2026-11-28).
CPU_BAND_MIN_ROWS = 1024
# Below this many flops a call runs on the calling thread: waking the OpenMP team costs more than
# it saves (2 MFLOP is ~20 us of single-core sgemm on the 2-core EPYC).
CPU_PARALLEL_MIN_FLOP = 2_000_000
# ... unless the weight is larger than this: then even a batch-1 call (a memory-bound GEMV) runs
# on the team, since two cores stream a weight faster than one. Fused 784->512 at batch 1, one
# thread / two: forward 30 / 21 us, backward 57 / 40 us; at 256 KiB (256x256) 13.3 / 12.8 us;
# at 128 KiB (128x256) one thread is faster (2-core EPYC, float32, 2026-11-28).
CPU_PARALLEL_MIN_WEIGHT_BYTES = 256 * 1024
# Which BLAS the tiles call is measured on each new shape class (fusedlinear.backend.numba_cpu
# ._choose, cached per machine); the table below (blas_functions) is the choice when it is not
# measured: FUSEDLINEAR_CPU_BLAS set, a forked child, or the per-process tuning budget spent.
# The table was written on 2-core AMD EPYCs. PyTorch's MKL below
# this many rows, scipy's OpenBLAS from here on. Fused Linear+ReLU 784->512 forward+backward over
# eager PyTorch, per-round paired medians (2-core EPYC, 2026-11-28): B=1 MKL 1.27 / OpenBLAS 2.10,
# B=32 1.08 / 1.18, B=64 1.07 / 1.07, B=128 1.04 / 1.01, B=256 1.02 (MKL whole) / 0.96,
# B=1024 1.03 / 0.95.
CPU_OPENBLAS_MIN_ROWS = 64
# ... but when scipy's OpenBLAS runs one of these AVX-512 kernel families, it is used at every
# batch size. MNIST training step, in-process alternation, fused with MKL / with OpenBLAS
# (SkylakeX kernels) over eager: B=1 1.19 / 1.15, B=16 1.06 / 0.95, B=64 1.03 / 0.68 (2-core
# EPYC, OPENBLAS_CORETYPE unset, 2026-11-28).
OPENBLAS_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")
# When the layout is not measured (MKL forced, or the tuning budget spent), MKL calls from this
# many rows on run as whole-matrix multi-threaded calls and only the element-wise stages are tiled
# (layout "whole", fusedlinear.backend.numba_cpu._whole); measured, "whole" is one more candidate.
CPU_WHOLE_MIN_ROWS = 256


def cpu_tiles(m: int, n: int, threads: int, bands: bool | None = None) -> tuple[int, int]:
    """Tile sizes (tm, tn) for an (m, n) output computed by ``threads`` threads. Column blocks
    (``bands`` False; by default below CPU_BAND_MIN_ROWS rows): all m rows, and the columns cut
    into CPU_TILES_PER_THREAD blocks per thread (at least CPU_MIN_TILE_N wide), so each thread
    packs only its own slice of the weight once. Bands (``bands`` True; by default from
    CPU_BAND_MIN_ROWS on): one band of rows per thread over all columns. The backend measures
    both on a new shape (fusedlinear.backend.numba_cpu._choose)."""
    want = CPU_TILES_PER_THREAD * threads if threads > 1 else 1
    if m >= CPU_BAND_MIN_ROWS if bands is None else bands:
        return max(1, -(-m // want)), max(1, n)
    return max(1, m), max(1, min(n, max(CPU_MIN_TILE_N, -(-n // want))))


def cpu_column_block(n: int, threads: int) -> int:
    """Columns of dZ per block in backward's first phase (dZ, db and that block's rows of dW)."""
    want = CPU_TILES_PER_THREAD * threads if threads > 1 else 1
    return max(16, -(-n // want))


# ---- CUDA -------------------------------------------------------------------------------------
# The "own" GEMM engine (FUSEDLINEAR_CUDA_GEMM=own): a block of CUDA_THREADS threads computes a
# CUDA_TILE_M x CUDA_TILE_N output tile, each thread a CUDA_THREAD_M x CUDA_THREAD_N register
# micro-tile; K is walked CUDA_TILE_K at a time through shared memory. These must match the
# #defines the CUDA source is compiled with (cuda.py passes them as -D options, so they are set
# here only).
CUDA_TILE_M = 64
CUDA_TILE_N = 64
CUDA_TILE_K = 16
CUDA_THREAD_M = 4
CUDA_THREAD_N = 4
CUDA_THREADS = (CUDA_TILE_M // CUDA_THREAD_M) * (CUDA_TILE_N // CUDA_THREAD_N)  # 256
CUDA_EW_THREADS = 256  # element-wise kernels: threads per block
CUDA_EW_MAX_BLOCKS = 65535  # element-wise kernels stride over the rest (4 M threads in flight)
CUDA_GRAD_COLS = 32  # backward's dZ + db pass: columns per block (as many blocks as N / 32) ...
# ... walked by 32 / V threads (each V = cuda_vector columns: 16 bytes) times row lanes, up to this
# many threads per block: 512, so an instance may use up to 128 registers (64 K per SM) and still
# launch (16/32-bit instances take <= 92 on sm_80/sm_90, nvcc 13.0); float64 256 (its GELU
# instance takes 166 registers on sm_90)
CUDA_GRAD_THREADS = 512
CUDA_GRAD_THREADS_F64 = 256
# CUDA's launch limits (every GPU since compute capability 3.0): grid x, y, z and threads per block.
CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)
CUDA_BLOCK_MAX_THREADS = 1024


def cuda_defines() -> dict[str, int]:
    return {
        "FL_TILE_M": CUDA_TILE_M,
        "FL_TILE_N": CUDA_TILE_N,
        "FL_TILE_K": CUDA_TILE_K,
        "FL_THREAD_M": CUDA_THREAD_M,
        "FL_THREAD_N": CUDA_THREAD_N,
        "FL_GRAD_COLS": CUDA_GRAD_COLS,
        "FL_GRAD_THREADS": CUDA_GRAD_THREADS,
        "FL_GRAD_THREADS_F64": CUDA_GRAD_THREADS_F64,
    }


def cuda_check_launch(grid, block) -> None:
    """Raise if (grid, block) exceeds CUDA's launch limits (a launch would fail, or worse, run a
    truncated grid)."""
    threads = block[0] * block[1] * block[2]
    if not (all(1 <= g <= lim for g, lim in zip(grid, CUDA_GRID_MAX)) and 1 <= threads <= CUDA_BLOCK_MAX_THREADS):
        raise ValueError(f"CUDA launch grid {grid} / block {block} outside the limits "
                         f"(grid <= {CUDA_GRID_MAX}, 1..{CUDA_BLOCK_MAX_THREADS} threads per block)")


def cuda_gemm_grid(m: int, n: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for the own tiled GEMM with an (m, n) output: x over m (any batch), y over n."""
    return (-(-m // CUDA_TILE_M), -(-n // CUDA_TILE_N), 1), (CUDA_THREADS, 1, 1)


def cuda_vector(itemsize: int) -> int:
    """Elements per 16-byte load of the element-wise kernels (fl_vec in fl_types.cuh): 8 for the
    16-bit types, 4 for float32, 2 for float64."""
    return 16 // itemsize


def cuda_elementwise_grid(count: int, vector: int = 1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for a grid-stride element-wise kernel over ``count`` elements, each thread
    taking ``vector`` of them per step (cuda_vector; where the kernel falls back to single
    elements, the grid-stride loop covers the rest with the same threads)."""
    blocks = max(1, min(-(-count // (CUDA_EW_THREADS * vector)), CUDA_EW_MAX_BLOCKS))
    return (blocks, 1, 1), (CUDA_EW_THREADS, 1, 1)


def cuda_grad_grid(m: int, n: int, max_threads: int = CUDA_GRAD_THREADS,
                   vector: int = 1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for backward's one-launch dZ + db pass over an (m, n) gradient: a block per
    CUDA_GRAD_COLS columns, of CUDA_GRAD_COLS / ``vector`` threads (each owning ``vector``
    consecutive columns: the kernel's V, cuda_vector of the dtype) x row lanes, walking all m
    rows of its columns. Lanes: about m / 8 (each lane walks >= 8 rows, so its sum amortises the
    block's final reduction), a power of two (the kernel's reduction tree halves them) from 1 to
    ``max_threads`` / threads across."""
    across = CUDA_GRAD_COLS // vector
    lanes = 1
    while lanes * 2 * across <= max_threads and lanes * 8 < m:
        lanes *= 2
    return (-(-n // CUDA_GRAD_COLS), 1, 1), (across, lanes, 1)
