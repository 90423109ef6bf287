"""scipy's OpenBLAS for the CPU kernels: the addresses of its ?gemm_, its thread count and the
kernel family it runs. Plain Python (no Numba import): the warm path needs them without the JIT."""

from __future__ import annotations

import ctypes
import os


def scipy_gemm_addresses() -> dict[str, int]:
    """Addresses of scipy's sgemm/dgemm (its OpenBLAS, Fortran interface): the pointers in
    cython_blas's exported capsules (what numba.extending.get_cython_function_address reads)."""
    from scipy.linalg import cython_blas

    name_of, pointer_of = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
    name_of.restype, name_of.argtypes = ctypes.c_char_p, [ctypes.py_object]
    pointer_of.restype, pointer_of.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    capsules = cython_blas.__pyx_capi__
    return {name: pointer_of(capsules[name], name_of(capsules[name])) for name in ("sgemm", "dgemm")}


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


def scipy_openblas_version() -> str:
    """The version of scipy's OpenBLAS, as threadpoolctl reports it; "" if unknown."""
    ctl = _scipy_openblas()
    return (getattr(ctl, "version", None) or "") if ctl is not None else ""
