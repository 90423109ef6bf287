"""Pointer-level helpers for the Numba CPU kernels: typed pointers, calls through function
addresses (BLAS ?gemm_, OpenMP), and the row-major GEMM on raw addresses.

The kernels never link a library themselves: the caller (fusedlinear.backend.numba_cpu) hands
them *addresses* — of a Fortran-interface ``?gemm_`` (PyTorch's MKL, or scipy's OpenBLAS), of
MKL's per-thread thread setter, of ``omp_get_thread_num``/``omp_get_num_threads`` — so the
compiled kernels hold no process-specific address and Numba can cache them on disk.
"""

from __future__ import annotations

from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blas import scipy_gemm_addresses, scipy_openblas_core  # noqa: F401  (moved there)

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
i32_ptr = _typed_pointer(types.int32)
u8_ptr = _typed_pointer(types.uint8)


@intrinsic(prefer_literal=True)
def stack_address(typingctx, nbytes):
    """The address of ``nbytes`` (a constant) of scratch memory in the calling function's stack
    frame (one alloca in its entry block). The kernels use it instead of np.empty/np.zeros, so
    their machine code calls no Numba runtime function and links as a plain shared object
    (kernels/cpu_cache.py loads it without Numba)."""
    if not isinstance(nbytes, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        words = ir.ArrayType(ir.IntType(64), -(-nbytes.literal_value // 8))  # 8-byte aligned
        return builder.ptrtoint(cgutils.alloca_once(builder, words), ir.IntType(64))

    return types.int64(nbytes), codegen


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
    d = stack_address(32)  # the Fortran interface takes every integer and flag by address
    dims = carray(i32_ptr(d), (6,))
    dims[0] = n
    dims[1] = m
    dims[2] = k
    dims[3] = ldb
    dims[4] = lda
    dims[5] = ldc
    flags = carray(u8_ptr(d + 24), (2,))
    flags[0] = 84 if tb else 78  # 'T' / 'N'
    flags[1] = 84 if ta else 78
    previous = 0
    if threads_fn != 0:
        previous = call_int_int(threads_fn, 1)  # this call runs on this thread only
    _call_gemm(blas, d + 24, d + 25, d, d + 4, d + 8, alpha, b, d + 12,
               a, d + 16, beta, c, d + 20)
    if threads_fn != 0:
        call_int_int(threads_fn, previous)
