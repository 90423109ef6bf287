"""Numba runtime set-up shared by the CPU kernels: threading layer, BLAS threads, pointer helpers.

* Threading layer: TBB when it can be loaded (thread-safe *and* fork-safe: 8 Python threads may
  call the kernels at once, and DataLoader workers fork after the first call). The ``tbb`` wheel
  puts ``libtbb.so.12`` in ``<prefix>/lib``, which the loader does not search, so it is loaded
  here by path first. A ``NUMBA_THREADING_LAYER`` set by the user wins.
* BLAS threads: every tile is one BLAS call made from a Numba worker thread, so scipy's OpenBLAS
  (the one ``scipy.linalg.cython_blas`` and therefore Numba use; numpy and torch have their own)
  is limited to one thread, or the two pools would multiply to 2 x 2 threads on 2 cores.
* ``gemm``: row-major ``C = op(A) op(B)`` through ``numba_xxgemm`` (Numba's own BLAS shim, which
  resolves scipy's sgemm/dgemm by name at run time, so kernels using it can be cached on disk).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_setup_lock = threading.Lock()
_ready = False
TBB_LOADED = False


def _load_tbb() -> bool:
    candidates = []
    for prefix in {sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX", "")}:
        if prefix:
            candidates += glob.glob(os.path.join(prefix, "lib", "libtbb.so.12*"))
    for path in sorted(candidates):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    try:  # a system TBB on the default search path
        ctypes.CDLL("libtbb.so.12", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _limit_scipy_blas_threads() -> None:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a declared dependency
        return
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library we limit)

    for ctl in ThreadpoolController().lib_controllers:
        if ctl.internal_api == "openblas" and "scipy" in os.path.basename(ctl.filepath) and "64_" not in os.path.basename(ctl.filepath):
            ctl.set_num_threads(1)


def ensure_runtime() -> None:
    """Idempotent one-time set-up; call before the first parallel kernel."""
    global _ready, TBB_LOADED
    if _ready:
        return
    with _setup_lock:
        if _ready:
            return
        if "NUMBA_THREADING_LAYER" not in os.environ:
            TBB_LOADED = _load_tbb()
            if TBB_LOADED:
                numba.config.THREADING_LAYER = "tbb"
            else:
                warnings.warn(
                    "fusedlinear: Intel TBB could not be loaded (pip install tbb); Numba falls back to "
                    "another threading layer and concurrent calls from several Python threads are serialised.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _limit_scipy_blas_threads()
        # numba_xxgemm looks sgemm/dgemm up under the GIL on first use: do it here, on this
        # thread, before a worker thread without the GIL needs it.
        for dtype in (np.float32, np.float64):
            _prime_blas(np.ones((2, 2), dtype))
        _ready = True


@njit(cache=True)
def _prime_blas(a):
    return np.dot(a, a)


# ---- row-major GEMM on raw addresses ---------------------------------------------------------

_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(
        types.char, types.char, types.char,  # kind, transa, transb
        types.intp, types.intp, types.intp,  # m, n, k
        types.voidptr, types.voidptr, types.intp,  # alpha, a, lda
        types.voidptr, types.intp, types.voidptr,  # b, ldb, beta
        types.voidptr, types.intp,  # c, ldc
    ),
)


@intrinsic
def _voidptr(typingctx, addr):
    """An integer address as ``void*`` (kernels receive tensors' data pointers as integers)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(addr), codegen


@njit(inline="always")
def address(base, ld, trans, row, col, itemsize):
    """Address of element (row, col) of a matrix stored row-major with leading dimension ``ld``,
    or, when ``trans``, stored as its transpose (element (row, col) at ``col * ld + row``)."""
    if trans:
        return base + (col * ld + row) * itemsize
    return base + (row * ld + col) * itemsize


@njit(inline="always")
def gemm(one, zero, m, n, k, a, lda, ta, b, ldb, tb, c, ldc):
    """Row-major ``C[m, n] = op(A)[m, k] @ op(B)[k, n]`` (beta = 0), dtype taken from ``one``.

    BLAS is column-major, and a row-major matrix read column-major is its transpose, so this is
    the column-major call ``Cᵀ = op(B)ᵀ op(A)ᵀ``: operands swapped, transpose flags kept.
    """
    kind = np.int8(115) if one.itemsize == 4 else np.int8(100)  # 's' / 'd'
    flag_a = np.int8(84) if ta else np.int8(78)  # 'T' / 'N'
    flag_b = np.int8(84) if tb else np.int8(78)
    status = _xxgemm(
        kind, flag_b, flag_a, n, m, k,
        one.ctypes, _voidptr(b), ldb, _voidptr(a), lda,
        zero.ctypes, _voidptr(c), ldc,
    )
    return status
