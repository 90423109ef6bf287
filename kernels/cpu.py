"""Numba CPU kernels: fused Linear + activation, forward and backward, float32 and float64.

Shapes (row-major): X is (M, K), W is (N, K), b is (N,), Z and A are (M, N).

Forward, one output tile (rows r0:r1, columns c0:c1) per loop iteration, tiles in parallel::

    Z[tile] = X[r0:r1] @ W[c0:c1]ᵀ          one single-threaded BLAS call into the output
    Z[tile] += b[c0:c1];  A[tile] = g(Z)    epilogue while the tile is still in cache

so A is written once (and Z only for activations whose derivative needs it).

Backward, given dA::

    dZ = dA ⊙ g'(A or Z)        phase 1, per block of columns, fused with
    db = Σ_rows dZ              ... the column sums of that block, and
    dW[c0:c1] = dZ[:, c0:c1]ᵀ X ... that block's rows of dW (a BLAS call; at batch 1 an outer
                                product written in the loop)
    dX = dZ W                   phase 2, per (rows x K-columns) tile (a BLAS call)

No 1/M factor anywhere: the mean of the loss already carries it, and these must equal autograd.

Calling convention. Each kernel is a Numba ``cfunc`` ``void kernel(void *params)``: ``params``
is an int64 block (indices ``P_*`` below) of addresses, sizes and flags. The caller runs it
either directly (one thread) or as the body of ``GOMP_parallel(kernel, params, threads, 0)``
on PyTorch's own OpenMP pool; each thread takes tiles ``t = thread, thread + threads, ...``.
Sharing PyTorch's pool matters on small machines: a second pool spinning beside it on the
same cores made MNIST training steps 2x slower (2-core EPYC, measured with Numba's TBB layer).
X and W are addresses with a leading dimension and a transpose flag, so strided and transposed
tensors reach BLAS without a copy. Every output and workspace is allocated by the caller.
Accumulation is in the input dtype (BLAS sgemm/dgemm), except db, summed in float64.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
from numba import carray, cfunc, njit, types

from . import activations as _acts
from ._numba_runtime import address, address_of, call_int, f64_ptr, gemm, i64_ptr, typed_ptr

from .cpu_params import (  # noqa: F401  (the backend reads them here too)
    N_PARAMS, P_A, P_ACT, P_ALPHA, P_BETA, P_BIAS, P_BLAS_THREADS, P_CB, P_DA, P_DB, P_DW, P_DX, P_DZ, P_GEMM, P_K,
    P_LDW, P_LDX, P_M, P_N, P_NUM_THREADS, P_SAVED, P_SLOPE, P_STAGE, P_THREAD_NUM, P_TK, P_TM, P_TN, P_TW, P_TX,
    P_W, P_WHOLE, P_X, P_Z,
)


@njit(inline="always")
def where(cond, x, y):
    return x if cond else y


@njit(inline="always")
def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _generate_elementwise() -> str:
    """Source of ``_epilogue`` and ``_grad``: one loop nest per activation of the table.

    Rows are walked through 1-D slices indexed from 0: with indices from a run-time start
    Numba must allow negative (wrap-around) indices and the loop does not vectorise (8x slower
    for the ReLU epilogue, measured on 1024 x 512 float32)."""
    fwd = ["def _epilogue(src, a, bias, r0, r1, c0, c1, act, s):", "    b_ = bias[c0:c1]"]
    bwd = ["def _grad(dz, dA, saved, r0, r1, c0, c1, act, s):"]
    for i, act in enumerate(_acts.ACTIVATIONS.values()):
        kw = "if" if i == 0 else "elif"
        fwd += [
            f"    {kw} act == {i}:  # {act.name}",
            "        for i in range(r0, r1):",
            "            z_, a_ = src[i, c0:c1], a[i, c0:c1]",
            "            for j in range(a_.shape[0]):",
            "                z = z_[j] + b_[j]",
        ]
        if act.saves == "z":  # src is Z's buffer: keep Z for backward
            fwd.append("                z_[j] = z")
        fwd.append(f"                a_[j] = {act.forward}")
        saved = _acts.saved_name(act)
        bwd += [
            f"    {kw} act == {i}:  # {act.name}",
            "        for i in range(r0, r1):",
            "            dz_, da_, v_ = dz[i, c0:c1], dA[i, c0:c1], saved[i, c0:c1]",
            "            for j in range(dz_.shape[0]):",
            "                da = da_[j]",
        ]
        if saved:
            bwd.append(f"                {saved} = v_[j]")
        bwd.append(f"                dz_[j] = {act.backward}")
    return "\n".join(fwd + [""] + bwd) + "\n"


_namespace = {"math": math, "exp": math.exp, "tanh": math.tanh, "erf": math.erf, "where": where, "sigmoid": sigmoid}
exec(compile(_generate_elementwise(), f"<fusedlinear activation table {_acts.table_digest()}>", "exec"), _namespace)
_epilogue = njit(inline="always")(_namespace["_epilogue"])
_grad = njit(inline="always")(_namespace["_grad"])


@njit(inline="always")
def _team(P):
    """(this thread's number, team size): from OpenMP inside GOMP_parallel, (0, 1) when called directly."""
    if P[P_THREAD_NUM] == 0:
        return 0, 1
    return call_int(P[P_THREAD_NUM]), call_int(P[P_NUM_THREADS])


@njit(inline="always")
def _blas_threads(P):
    """The per-thread BLAS setter to pin calls to one thread, or 0 to let a whole-matrix call use BLAS's threads."""
    return 0 if P[P_WHOLE] != 0 else P[P_BLAS_THREADS]


@njit(inline="always")
def _slope(P):
    return carray(f64_ptr(P.ctypes.data), (N_PARAMS,))[P_SLOPE]


@njit
def _forward_tiles(P, a, src, bias):
    """A = g(X Wᵀ + b) over this thread's output tiles; BLAS writes Z into ``src`` (Z's buffer
    when the activation keeps Z, else A itself), the epilogue adds b and applies g in place."""
    tid, nth = _team(P)
    M, N, K = P[P_M], P[P_N], P[P_K]
    tm, tn = P[P_TM], P[P_TN]
    item = a.itemsize
    act, slope = P[P_ACT], _slope(P)
    tx, tw = P[P_TX] != 0, P[P_TW] != 0
    stage = P[P_STAGE]
    tiles_n = (N + tn - 1) // tn
    for t in range(tid, ((M + tm - 1) // tm) * tiles_n, nth):
        r0 = (t // tiles_n) * tm
        c0 = (t % tiles_n) * tn
        r1 = min(r0 + tm, M)
        c1 = min(c0 + tn, N)
        if stage != 2:  # Z[r0:r1, c0:c1] = X[r0:r1, :] @ (W[c0:c1, :])ᵀ
            gemm(P[P_GEMM], _blas_threads(P), P[P_ALPHA], P[P_BETA], r1 - r0, c1 - c0, K,
                 address(P[P_X], P[P_LDX], tx, r0, 0, item), P[P_LDX], tx,
                 address(P[P_W], P[P_LDW], tw, c0, 0, item), P[P_LDW], not tw,
                 src.ctypes.data + (r0 * N + c0) * item, N)
        if stage != 1:
            _epilogue(src, a, bias, r0, r1, c0, c1, act, slope)


@njit
def _backward_columns(P, dA, saved, dz, db, x_row, dw):
    """Phase 1, per block of columns: dZ = dA ⊙ g'(saved); db = Σ_rows dZ; dW = dZᵀ X.
    ``x_row``/``dw``: X's first row and dW as arrays, for the batch-1 case (an outer product)."""
    tid, nth = _team(P)
    M, N, K = P[P_M], P[P_N], P[P_K]
    cb = P[P_CB]
    item = dz.itemsize
    act, slope = P[P_ACT], _slope(P)
    tx = P[P_TX] != 0
    stage = P[P_STAGE]
    for blk in range(tid, (N + cb - 1) // cb, nth):
        c0 = blk * cb
        c1 = min(c0 + cb, N)
        if stage != 2:
            _grad(dz, dA, saved, 0, M, c0, c1, act, slope)
        if stage != 2 and P[P_DB] != 0:  # row by row, so the inner loop is contiguous and vectorises
            acc = np.zeros(c1 - c0, np.float64)
            for i in range(M):
                row = dz[i, c0:c1]
                for j in range(acc.shape[0]):
                    acc[j] += row[j]
            out = db[c0:c1]
            for j in range(acc.shape[0]):
                out[j] = acc[j]
        if stage != 1 and P[P_DW] != 0 and M == 1 and not tx:
            # batch 1: dW[c0:c1, :] = dZ[0, c0:c1]ᵀ ⊗ x, written directly: a BLAS call costs
            # more than the product here (784->512: 28 us through OpenBLAS, 21.5 us through MKL)
            for j in range(c0, c1):
                s, out = dz[0, j], dw[j]
                for kk in range(K):
                    out[kk] = s * x_row[kk]
        elif stage != 1 and P[P_DW] != 0:
            # dW[c0:c1, :] = (dZ[:, c0:c1])ᵀ @ X
            gemm(P[P_GEMM], _blas_threads(P), P[P_ALPHA], P[P_BETA], c1 - c0, K, M,
                 dz.ctypes.data + c0 * item, N, True,
                 P[P_X], P[P_LDX], tx,
                 P[P_DW] + c0 * K * item, K)


@njit
def _backward_rows(P, item):
    """Phase 2, per (rows x K-columns) tile: dX = dZ W."""
    tid, nth = _team(P)
    M, N, K = P[P_M], P[P_N], P[P_K]
    tm, tk = P[P_TM], P[P_TK]
    tw = P[P_TW] != 0
    tiles_k = (K + tk - 1) // tk
    for t in range(tid, ((M + tm - 1) // tm) * tiles_k, nth):
        r0 = (t // tiles_k) * tm
        k0 = (t % tiles_k) * tk
        r1 = min(r0 + tm, M)
        k1 = min(k0 + tk, K)
        # dX[r0:r1, k0:k1] = dZ[r0:r1, :] @ W[:, k0:k1]
        gemm(P[P_GEMM], _blas_threads(P), P[P_ALPHA], P[P_BETA], r1 - r0, k1 - k0, N,
             P[P_DZ] + r0 * N * item, N, False,
             address(P[P_W], P[P_LDW], tw, 0, k0, item), P[P_LDW], tw,
             P[P_DX] + (r0 * K + k0) * item, K)


# ---- entry points: void kernel(void *params), one per phase and dtype ----------------------
# (One per dtype: Numba caches a cfunc only when it is a plain module-level function.)

_SIGNATURE = types.void(types.voidptr)


def _cache_available() -> bool:
    """Whether Numba finds a writable cache location for this file (NUMBA_CACHE_DIR, __pycache__
    beside it, or the user-wide cache). Without one the kernels still work: they compile in
    every process (a few seconds), after one warning."""
    from numba.core.caching import FunctionCache

    try:
        FunctionCache(_cache_available)
        return True
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        warnings.warn(f"fusedlinear: no writable Numba cache location ({exc}); the CPU kernels are compiled "
                      f"in every process. Set NUMBA_CACHE_DIR to a writable directory to cache them.",
                      RuntimeWarning, stacklevel=2)
        return False


CACHE = _cache_available()


@njit(inline="always")
def _params(data):
    return carray(i64_ptr(address_of(data)), (N_PARAMS,))


@njit(inline="always")
def _forward_entry(P, zero):
    M, N = P[P_M], P[P_N]
    a = carray(typed_ptr(P[P_A], zero), (M, N))
    src = carray(typed_ptr(P[P_Z] if P[P_Z] != 0 else P[P_A], zero), (M, N))
    _forward_tiles(P, a, src, carray(typed_ptr(P[P_BIAS], zero), (N,)))


@njit(inline="always")
def _backward_columns_entry(P, zero):
    M, N = P[P_M], P[P_N]
    dA = carray(typed_ptr(P[P_DA], zero), (M, N))
    saved = carray(typed_ptr(P[P_SAVED] if P[P_SAVED] != 0 else P[P_DA], zero), (M, N))  # identity reads none
    K = P[P_K]
    x_row = carray(typed_ptr(P[P_X], zero), (K,))  # read only when M = 1 and X is stored row-major
    dw = carray(typed_ptr(P[P_DW] if P[P_DW] != 0 else P[P_DZ], zero), (N if P[P_DW] != 0 else 0, K))
    _backward_columns(P, dA, saved, carray(typed_ptr(P[P_DZ], zero), (M, N)), carray(typed_ptr(P[P_DB], zero), (N,)),
                      x_row, dw)


@cfunc(_SIGNATURE, cache=CACHE)
def forward_f32(data):
    _forward_entry(_params(data), np.float32(0))


@cfunc(_SIGNATURE, cache=CACHE)
def forward_f64(data):
    _forward_entry(_params(data), np.float64(0))


@cfunc(_SIGNATURE, cache=CACHE)
def backward_columns_f32(data):
    _backward_columns_entry(_params(data), np.float32(0))


@cfunc(_SIGNATURE, cache=CACHE)
def backward_columns_f64(data):
    _backward_columns_entry(_params(data), np.float64(0))


@cfunc(_SIGNATURE, cache=CACHE)
def backward_rows_f32(data):
    _backward_rows(_params(data), 4)


@cfunc(_SIGNATURE, cache=CACHE)
def backward_rows_f64(data):
    _backward_rows(_params(data), 8)


KERNELS = {
    ("forward", "float32"): forward_f32, ("forward", "float64"): forward_f64,
    ("backward_columns", "float32"): backward_columns_f32, ("backward_columns", "float64"): backward_columns_f64,
    ("backward_rows", "float32"): backward_rows_f32, ("backward_rows", "float64"): backward_rows_f64,
}


def _invalidate_stale_cache() -> None:
    """Numba's disk cache keys on this file's timestamp only; the epilogues come from the
    activation table, so drop cached kernels that were built from another version of it."""
    digest = _acts.table_digest()
    for kernel in KERNELS.values():
        cache = getattr(kernel, "_cache", None)
        path = getattr(getattr(cache, "_cache_path", None), "__str__", lambda: None)()
        if not path:
            continue
        stamp = os.path.join(path, f"fusedlinear-{kernel.__name__}.table")
        try:
            with open(stamp) as f:
                if f.read() == digest:
                    continue
        except OSError:
            pass
        try:
            cache.flush()
            kernel._compiled = False
            with open(stamp, "w") as f:
                f.write(digest)
        except OSError:
            pass  # read-only cache location: Numba itself then compiles without caching


__all__ = ["KERNELS", "N_PARAMS"]
