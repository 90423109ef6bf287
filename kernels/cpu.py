"""Numba CPU kernels: fused Linear + activation, forward and backward, float32 and float64.

Shapes (row-major): X is (M, K), W is (N, K), b is (N,), Z and A are (M, N).

Forward, one output tile (rows r0:r1, columns c0:c1) per loop iteration, tiles in parallel::

    Z[tile] = X[r0:r1] @ W[c0:c1]ᵀ          one single-threaded BLAS call into the output
    Z[tile] += b[c0:c1];  A[tile] = g(Z)    epilogue while the tile is still in cache

so A is written once (and Z only for activations whose derivative needs it).

Backward, given dA::

    dZ = dA ⊙ g'(A or Z)        phase 1, per block of columns, fused with
    db = Σ_rows dZ              ... the column sums of that block, and
    dW[c0:c1] = dZ[:, c0:c1]ᵀ X ... that block's rows of dW (a BLAS call)
    dX = dZ W                   phase 2, per (rows x K-columns) tile (a BLAS call)

No 1/M factor anywhere: the mean of the loss already carries it, and these must equal autograd.

X and W arrive as integer addresses with a leading dimension and a transpose flag, so strided
and transposed tensors reach BLAS without a copy; the element-wise operands are arrays.
Accumulation is in the input dtype (BLAS sgemm/dgemm), except db, summed in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import activations as _acts
from ._numba_runtime import address, ensure_runtime, gemm


@njit(inline="always")
def where(cond, x, y):
    return x if cond else y


@njit(inline="always")
def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _generate_elementwise() -> str:
    """Source of ``_epilogue`` and ``_grad``: one loop nest per activation of the table."""
    fwd = ["def _epilogue(src, a, bias, r0, r1, c0, c1, act, s):"]
    bwd = ["def _grad(dz, dA, saved, r0, r1, c0, c1, act, s):"]
    for i, act in enumerate(_acts.ACTIVATIONS.values()):
        kw = "if" if i == 0 else "elif"
        fwd += [
            f"    {kw} act == {i}:  # {act.name}",
            "        for i in range(r0, r1):",
            "            for j in range(c0, c1):",
            "                z = src[i, j] + bias[j]",
        ]
        if act.saves == "z":  # src is Z's buffer: keep Z for backward
            fwd.append("                src[i, j] = z")
        fwd.append(f"                a[i, j] = {act.forward}")
        bwd += [
            f"    {kw} act == {i}:  # {act.name}",
            "        for i in range(r0, r1):",
            "            for j in range(c0, c1):",
            "                da = dA[i, j]",
        ]
        if _acts.saved_name(act):
            bwd.append(f"                {_acts.saved_name(act)} = saved[i, j]")
        bwd.append(f"                dz[i, j] = {act.backward}")
    return "\n".join(fwd + [""] + bwd) + "\n"


_namespace = {"math": math, "exp": math.exp, "tanh": math.tanh, "erf": math.erf, "where": where, "sigmoid": sigmoid}
exec(compile(_generate_elementwise(), f"<fusedlinear activation table {_acts.table_digest()}>", "exec"), _namespace)
_epilogue = njit(inline="always")(_namespace["_epilogue"])
_grad = njit(inline="always")(_namespace["_grad"])


@njit(parallel=True, nogil=True, cache=True)
def linear_act_forward(x, ldx, tx, w, ldw, tw, K, bias, a, z, act, slope, tm, tn):
    """A = g(X Wᵀ + b); Z kept in ``z`` when ``z`` is (M, N), else ``z`` is (0, 0).

    x, w: addresses of X (M, K) and W (N, K); ld*: leading dimensions; t*: stored transposed.
    bias: (N,) (zeros when the layer has none); a: (M, N) output; tm, tn: tile sizes.
    """
    M, N = a.shape
    item = a.itemsize
    one = np.ones(1, a.dtype)
    zero = np.zeros(1, a.dtype)
    src = z if z.shape[0] == M else a  # where BLAS writes Z
    n_tiles_n = (N + tn - 1) // tn
    n_tiles = ((M + tm - 1) // tm) * n_tiles_n
    status = 0
    for t in prange(n_tiles):
        r0 = (t // n_tiles_n) * tm
        c0 = (t % n_tiles_n) * tn
        r1 = min(r0 + tm, M)
        c1 = min(c0 + tn, N)
        # Z[r0:r1, c0:c1] = X[r0:r1, :] @ (W[c0:c1, :])ᵀ
        status += gemm(
            one, zero, r1 - r0, c1 - c0, K,
            address(x, ldx, tx, r0, 0, item), ldx, tx,
            address(w, ldw, tw, c0, 0, item), ldw, not tw,
            src.ctypes.data + (r0 * N + c0) * item, N,
        )
        _epilogue(src, a, bias, r0, r1, c0, c1, act, slope)
    return status


@njit(parallel=True, nogil=True, cache=True)
def linear_act_backward(dA, saved, x, ldx, tx, w, ldw, tw, K, act, slope, dx, dw, db, cb, tm, tk):
    """dZ = dA ⊙ g'(saved); db = Σ_rows dZ; dW = dZᵀ X; dX = dZ W.

    dA, saved: (M, N) (saved is (0, 0) for the identity); x, w as in forward.
    dx (M, K), dw (N, K), db (N,): outputs; one passed as shape (0, ...) is not computed.
    cb: columns per block in phase 1; tm, tk: dX tile sizes.
    """
    M, N = dA.shape
    item = dA.itemsize
    one = np.ones(1, dA.dtype)
    zero = np.zeros(1, dA.dtype)
    dz = np.empty((M, N), dA.dtype)
    need_dw = dw.shape[0] == N
    need_db = db.shape[0] == N
    status = 0
    n_blocks = (N + cb - 1) // cb
    for blk in prange(n_blocks):
        c0 = blk * cb
        c1 = min(c0 + cb, N)
        _grad(dz, dA, saved, 0, M, c0, c1, act, slope)
        if need_db:
            for j in range(c0, c1):
                acc = 0.0
                for i in range(M):
                    acc += dz[i, j]
                db[j] = acc
        if need_dw:
            # dW[c0:c1, :] = (dZ[:, c0:c1])ᵀ @ X
            status += gemm(
                one, zero, c1 - c0, K, M,
                dz.ctypes.data + c0 * item, N, True,
                x, ldx, tx,
                dw.ctypes.data + c0 * K * item, K,
            )
    if dx.shape[0] == M:
        n_tiles_k = (K + tk - 1) // tk
        n_tiles = ((M + tm - 1) // tm) * n_tiles_k
        for t in prange(n_tiles):
            r0 = (t // n_tiles_k) * tm
            k0 = (t % n_tiles_k) * tk
            r1 = min(r0 + tm, M)
            k1 = min(k0 + tk, K)
            # dX[r0:r1, k0:k1] = dZ[r0:r1, :] @ W[:, k0:k1]
            status += gemm(
                one, zero, r1 - r0, k1 - k0, N,
                dz.ctypes.data + r0 * N * item, N, False,
                address(w, ldw, tw, 0, k0, item), ldw, tw,
                dx.ctypes.data + (r0 * K + k0) * item, K,
            )
    return status


_KERNELS = (linear_act_forward, linear_act_backward)


def _invalidate_stale_cache() -> None:
    """Numba's disk cache keys on this file's timestamp only; the epilogues come from the
    activation table, so drop cached kernels that were built from another version of it."""
    digest = _acts.table_digest()
    for kernel in _KERNELS:
        cache = getattr(kernel, "_cache", None)
        path = getattr(cache, "_cache_path", None)
        if not path:
            continue
        stamp = f"{path}/fusedlinear-{kernel.__name__}.table"
        try:
            with open(stamp) as f:
                if f.read() == digest:
                    continue
        except OSError:
            pass
        try:
            cache.flush()
            with open(stamp, "w") as f:
                f.write(digest)
        except OSError:
            pass  # read-only cache location: Numba itself then compiles without caching


_invalidate_stale_cache()

__all__ = ["linear_act_forward", "linear_act_backward", "ensure_runtime"]
