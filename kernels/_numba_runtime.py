"""Pointer-level helpers for the Numba CPU kernels: typed pointers, calls through function
addresses (BLAS ?gemm_, OpenMP), and the row-major GEMM on raw addresses.

The kernels never link a library themselves: the caller (fusedlinear.backend.numba_cpu) hands
them *addresses* — of a Fortran-interface ``?gemm_`` (PyTorch's MKL, or scipy's OpenBLAS), of
MKL's per-thread thread setter, of ``omp_get_thread_num``/``omp_get_num_threads`` — so the
compiled kernels hold no process-specific address and Numba can cache them on disk.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_VOIDP = ir.IntType(8).as_pointer()


def _typed_pointer(dtype):
    @intrinsic
    def as_pointer(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(dtype)))

        return types.CPointer(dtype)(addr), codegen

    return as_pointer


f64_ptr = _typed_pointer(types.float64)
i64_ptr = _typed_pointer(types.int64)


@intrinsic
def typed_ptr(typingctx, addr, like):
    """An integer address as a pointer to elements of ``like``'s type (a scalar of the dtype)."""
    if not (isinstance(addr, types.Integer) and isinstance(like, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(like)))

    return types.CPointer(like)(addr, like), codegen


@intrinsic
def address_of(typingctx, ptr):
    """The integer address held by a ``void*`` (a cfunc's argument)."""
    if ptr != types.voidptr:
        return None

    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(ptr), codegen


@intrinsic
def call_int(typingctx, fn):
    """``int fn(void)`` through its address (omp_get_thread_num, omp_get_num_threads)."""
    if not isinstance(fn, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])

    return types.int32(fn), codegen


@intrinsic
def call_int_int(typingctx, fn, value):
    """``int fn(int)`` through its address (MKL_Set_Num_Threads_Local: returns the previous value)."""
    if not (isinstance(fn, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(i32, [i32])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.trunc(args[1], i32)])

    return types.int32(fn, value), codegen


@intrinsic
def _call_gemm(typingctx, fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Fortran ``?gemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)``: every argument an address."""
    args = (fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    if not all(isinstance(t, types.Integer) for t in args):
        return None

    def codegen(context, builder, signature, llargs):
        fnty = ir.FunctionType(ir.VoidType(), [_VOIDP] * 13)
        fptr = builder.inttoptr(llargs[0], fnty.as_pointer())
        builder.call(fptr, [builder.inttoptr(v, _VOIDP) for v in llargs[1:]])
        return context.get_dummy_value()

    return types.none(*args), codegen


@njit(inline="always")
def address(base, ld, trans, row, col, itemsize):
    """Address of element (row, col) of a matrix stored row-major with leading dimension ``ld``,
    or, when ``trans``, stored as its transpose (element (row, col) at ``col * ld + row``)."""
    if trans:
        return base + (col * ld + row) * itemsize
    return base + (row * ld + col) * itemsize


@njit(inline="always")
def gemm(blas, threads_fn, alpha, beta, m, n, k, a, lda, ta, b, ldb, tb, c, ldc):
    """Row-major ``C[m, n] = op(A)[m, k] @ op(B)[k, n]``, single-threaded, beta taken from ``beta``.

    BLAS is column-major, and a row-major matrix read column-major is its transpose, so this is
    the column-major call ``Cᵀ = op(B)ᵀ op(A)ᵀ``: operands swapped, transpose flags kept.
    ``alpha``/``beta``: addresses of scalars of the dtype; ``blas``: the ?gemm_ address;
    ``threads_fn``: MKL_Set_Num_Threads_Local's address, or 0.
    """
    dims = np.empty(6, np.int32)  # the Fortran interface takes every integer by address
    dims[0] = n
    dims[1] = m
    dims[2] = k
    dims[3] = ldb
    dims[4] = lda
    dims[5] = ldc
    flags = np.empty(2, np.uint8)
    flags[0] = 84 if tb else 78  # 'T' / 'N'
    flags[1] = 84 if ta else 78
    previous = 0
    if threads_fn != 0:
        previous = call_int_int(threads_fn, 1)  # this call runs on this thread only
    d = dims.ctypes.data
    _call_gemm(blas, flags.ctypes.data, flags.ctypes.data + 1, d, d + 4, d + 8, alpha, b, d + 12,
               a, d + 16, beta, c, d + 20)
    if threads_fn != 0:
        call_int_int(threads_fn, previous)


def scipy_gemm_addresses() -> dict[str, int]:
    """Addresses of scipy's sgemm/dgemm (its OpenBLAS, Fortran interface)."""
    from numba.extending import get_cython_function_address

    return {name: get_cython_function_address("scipy.linalg.cython_blas", name) for name in ("sgemm", "dgemm")}


def _scipy_openblas():
    """threadpoolctl's controller of scipy's OpenBLAS (the 32-bit-integer one its cython_blas uses), or None."""
    from threadpoolctl import ThreadpoolController

    import scipy.linalg.cython_blas  # noqa: F401  (loads the library)

    for ctl in ThreadpoolController().lib_controllers:
        name = os.path.basename(ctl.filepath)
        if ctl.internal_api == "openblas" and "scipy_openblas" in name and "64_" not in name:
            return ctl
    return None


def limit_scipy_blas_threads() -> None:
    """scipy's OpenBLAS to one thread: the kernels' own threads each call it on one tile."""
    ctl = _scipy_openblas()
    if ctl is not None:
        ctl.set_num_threads(1)


def scipy_openblas_core() -> str:
    """The kernel family scipy's OpenBLAS chose at load (e.g. ``SkylakeX``, or ``Haswell`` when
    OPENBLAS_CORETYPE forces it), as threadpoolctl reports it; "" if unknown."""
    ctl = _scipy_openblas()
    return (getattr(ctl, "architecture", None) or "") if ctl is not None else ""
