"""kernels/blas.py, scipy's OpenBLAS for the CPU kernels: its ?gemm_ addresses (bundled library
or cython_blas), and its thread count left as the user set it."""

import os
import subprocess
import sys

import pytest
import torch

from fusedlinear import backend


def test_scipy_blas_through_cython_blas_when_the_bundled_library_is_not_found(monkeypatch):
    """kernels/blas.py loads scipy's bundled OpenBLAS directly; for other scipy builds it falls
    back to cython_blas's function pointers and threadpoolctl. Both must name the same library
    and compute C = A B (called here through ctypes, Fortran interface, column-major)."""
    import ctypes

    import numpy as np

    from fusedlinear.kernels import blas

    direct = (blas.scipy_gemm_addresses(), blas.scipy_openblas_core(), blas.scipy_openblas_version())
    monkeypatch.setattr(blas, "_bundled", lambda: None)
    fallback = (blas.scipy_gemm_addresses(), blas.scipy_openblas_core(), blas.scipy_openblas_version())
    assert fallback[1:] == direct[1:] and direct[1] != ""
    previous = blas.scipy_blas_threads(1)
    assert blas._scipy_openblas().num_threads == 1
    assert blas.scipy_blas_threads(previous) == 1 and blas._scipy_openblas().num_threads == previous
    rng = np.random.default_rng(0)
    a, b = np.asfortranarray(rng.standard_normal((3, 4))), np.asfortranarray(rng.standard_normal((4, 5)))
    for addresses in (direct[0], fallback[0]):
        c = np.zeros((3, 5), order="F")
        ref = ctypes.c_void_p
        dgemm = ctypes.CFUNCTYPE(None, *[ref] * 13)(addresses["dgemm"])
        ints = [np.array([v], np.int32) for v in (3, 5, 4, 3, 4, 3)]  # m, n, k, lda, ldb, ldc
        one, zero, n = np.array([1.0]), np.array([0.0]), np.frombuffer(b"N", np.uint8)
        p = lambda arr: arr.ctypes.data  # noqa: E731
        dgemm(p(n), p(n), p(ints[0]), p(ints[1]), p(ints[2]), p(one), p(a), p(ints[3]), p(b), p(ints[4]),
              p(zero), p(c), p(ints[5]))
        np.testing.assert_allclose(c, a @ b, rtol=1e-12, atol=1e-12)  # float64, 4 terms: rounding only


_SCIPY_THREADS_AFTER_FUSED_CALLS = r"""
import torch
import fusedlinear
from fusedlinear.kernels import blas

blas.scipy_blas_threads(3)  # the user's choice, before the first fused call
x = torch.randn(96, 200, dtype=torch.float64, requires_grad=True)
w = torch.randn(150, 200, dtype=torch.float64, requires_grad=True)
counts = []
for threads in (1, 2):  # on this thread, and on PyTorch's team (2*96*200*150 flops: the parallel path)
    torch.set_num_threads(threads)
    fusedlinear.fused_linear(x, w, None, "gelu").sum().backward()
    counts.append(blas.scipy_blas_threads(3))
print(counts)
"""


@pytest.mark.skipif(backend.select(torch.device("cpu"), torch.float32) != "numba", reason="the numba backend is not the CPU backend here")
def test_fused_calls_leave_scipys_blas_threads_as_the_user_set_them():
    """The kernels hold scipy's OpenBLAS to one thread only while they run (its count is
    process-wide): afterwards the user's scipy.linalg has its own count back. A fresh process: the
    first fused call is the one that once set it to 1 for good."""
    out = subprocess.run([sys.executable, "-c", _SCIPY_THREADS_AFTER_FUSED_CALLS], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "FUSEDLINEAR_BACKEND": "numba"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[3, 3]", out.stderr[-2000:]
