"""Tunables: how each kernel cuts its work into tiles, for the CPU and for CUDA launches.

Kept in one place, and plain Python, so the Numba kernels, the CuPy launcher and the C++
emulation harness in ``tests/`` all take grid and tile sizes from the same functions.
"""

from __future__ import annotations

# ---- CPU (Numba + single-threaded BLAS per tile) -------------------------------------------
# Each tile is one BLAS call followed by the epilogue while the tile is still in L2.
# Largest tile 256 x 256 (fp32: 256 KiB of output) keeps BLAS near its full rate on the
# 2-core AVX-512 EPYC (measured with benchmarks/bench_kernels.py, 2026-11); tiles are halved
# down to CPU_MIN_TILE_* until every thread has at least two tiles to balance.
CPU_MAX_TILE_M = 256
CPU_MAX_TILE_N = 256
CPU_MIN_TILE_M = 16
CPU_MIN_TILE_N = 64
CPU_TILES_PER_THREAD = 2


def cpu_tiles(m: int, n: int, threads: int) -> tuple[int, int]:
    """Tile sizes (tm, tn) for an (m, n) output computed by ``threads`` threads."""
    tm, tn = min(m, CPU_MAX_TILE_M), min(n, CPU_MAX_TILE_N)
    want = CPU_TILES_PER_THREAD * threads if threads > 1 else 1

    def count(tm: int, tn: int) -> int:
        return -(-m // tm) * -(-n // tn)

    while count(tm, tn) < want and tn > CPU_MIN_TILE_N:
        tn = max(CPU_MIN_TILE_N, (tn + 1) // 2)
    while count(tm, tn) < want and tm > CPU_MIN_TILE_M:
        tm = max(CPU_MIN_TILE_M, (tm + 1) // 2)
    return max(tm, 1), max(tn, 1)


def cpu_column_block(n: int, threads: int) -> int:
    """Columns of dZ per block in backward's first phase (dZ, db and that block's rows of dW)."""
    want = CPU_TILES_PER_THREAD * threads if threads > 1 else 1
    return max(16, -(-n // want))


# ---- CUDA -------------------------------------------------------------------------------------
# A block of CUDA_THREADS threads computes a CUDA_TILE_M x CUDA_TILE_N output tile, each thread
# a CUDA_THREAD_M x CUDA_THREAD_N register micro-tile; K is walked CUDA_TILE_K at a time through
# shared memory. These must match the #defines the CUDA source is compiled with (cuda.py passes
# them as -D options, so they are set here only).
CUDA_TILE_M = 64
CUDA_TILE_N = 64
CUDA_TILE_K = 16
CUDA_THREAD_M = 4
CUDA_THREAD_N = 4
CUDA_THREADS = (CUDA_TILE_M // CUDA_THREAD_M) * (CUDA_TILE_N // CUDA_THREAD_N)  # 256
CUDA_EW_THREADS = 256  # element-wise and column-reduction kernels


def cuda_defines() -> dict[str, int]:
    return {
        "FL_TILE_M": CUDA_TILE_M,
        "FL_TILE_N": CUDA_TILE_N,
        "FL_TILE_K": CUDA_TILE_K,
        "FL_THREAD_M": CUDA_THREAD_M,
        "FL_THREAD_N": CUDA_THREAD_N,
        "FL_EW_THREADS": CUDA_EW_THREADS,
    }


def cuda_gemm_grid(m: int, n: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for a tiled GEMM with an (m, n) output: x over n, y over m."""
    grid = (-(-n // CUDA_TILE_N), -(-m // CUDA_TILE_M), 1)
    return grid, (CUDA_THREADS, 1, 1)


def cuda_columns_grid(n: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for a per-column reduction over rows (db): one thread per column."""
    return (-(-n // CUDA_EW_THREADS), 1, 1), (CUDA_EW_THREADS, 1, 1)


def cuda_elementwise_grid(count: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for a grid-stride element-wise kernel over ``count`` elements."""
    blocks = max(1, min(-(-count // CUDA_EW_THREADS), 65535))
    return (blocks, 1, 1), (CUDA_EW_THREADS, 1, 1)
