"""scipy's OpenBLAS for the CPU kernels: the addresses of its ?gemm_, its thread count and the
kernel family it runs. Plain Python (no Numba import): the warm path needs them without the JIT.

scipy's wheels bundle OpenBLAS as ``scipy.libs/libscipy_openblas*.so`` with its symbols prefixed
``scipy_``; it is loaded here directly with ctypes (the very library scipy.linalg.cython_blas
calls: the loader maps one copy), because importing scipy.linalg to reach it took 0.19 s of a
0.27 s warm start (Intel Xeon AVX-512, 2 cores). Other scipy builds go through cython_blas's
exported function pointers and threadpoolctl.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import threading


@functools.lru_cache(maxsize=None)
def _bundled():
    """scipy's bundled 32-bit-integer OpenBLAS, loaded with ctypes, or None (another build)."""
    spec = importlib.util.find_spec("scipy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(glob.glob(os.path.join(os.path.dirname(location), "scipy.libs", "libscipy_openblas*.so*"))):
            if "64_" in os.path.basename(path):
                continue
            try:
                lib = ctypes.CDLL(path)
                lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
                lib.scipy_openblas_get_config.restype = ctypes.c_char_p
                lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
                lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
                lib.scipy_sgemm_, lib.scipy_dgemm_  # noqa: B018  (both must be there)
                return lib
            except (OSError, AttributeError):
                continue
    return None


def scipy_gemm_addresses() -> dict[str, int]:
    """Addresses of scipy's sgemm/dgemm (its OpenBLAS, Fortran interface)."""
    lib = _bundled()
    if lib is not None:
        return {name: ctypes.cast(getattr(lib, f"scipy_{name}_"), ctypes.c_void_p).value for name in ("sgemm", "dgemm")}
    # The pointers in cython_blas's exported capsules (what numba.extending.get_cython_function_address reads).
    from scipy.linalg import cython_blas

    name_of, pointer_of = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
    name_of.restype, name_of.argtypes = ctypes.c_char_p, [ctypes.py_object]
    pointer_of.restype, pointer_of.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    capsules = cython_blas.__pyx_capi__
    return {name: pointer_of(capsules[name], name_of(capsules[name])) for name in ("sgemm", "dgemm")}


@functools.lru_cache(maxsize=None)
def _scipy_openblas():
    """threadpoolctl's controller of scipy's OpenBLAS (the 32-bit-integer one its cython_blas uses), or None."""
    from threadpoolctl import ThreadpoolController

    import scipy.linalg.cython_blas  # noqa: F401  (loads the library)

    for ctl in ThreadpoolController().lib_controllers:
        name = os.path.basename(ctl.filepath)
        if ctl.internal_api == "openblas" and "scipy_openblas" in name and "64_" not in name:
            return ctl
    return None


def scipy_blas_threads(n: int) -> int:
    """Set scipy's OpenBLAS to ``n`` threads; the count it had (unchanged when it was ``n``)."""
    lib = _bundled()
    if lib is not None:
        previous = lib.scipy_openblas_get_num_threads()
        if previous != n:
            lib.scipy_openblas_set_num_threads(n)
        return previous
    ctl = _scipy_openblas()
    if ctl is None:
        return n
    previous = ctl.num_threads
    if previous != n:
        ctl.set_num_threads(n)
    return previous


# The kernels' own threads each call OpenBLAS on one tile, so it must run one thread then. Its
# thread count is process-wide (openblas_set_num_threads_local, 0.3.27+, sets the same global
# one), so it is set to 1 only while a team runs and then given back: the user's scipy.linalg
# keeps its threads. Counted, so overlapping launches from several Python threads restore it once.
_pin_lock = threading.Lock()
_pins = [0, 0]  # launches running with OpenBLAS pinned, the count to give back


def pin_one_thread() -> None:
    with _pin_lock:
        if _pins[0] == 0:
            _pins[1] = scipy_blas_threads(1)
        _pins[0] += 1


def unpin() -> None:
    with _pin_lock:
        _pins[0] -= 1
        if _pins[0] == 0:
            scipy_blas_threads(_pins[1])


def scipy_openblas_core() -> str:
    """The kernel family scipy's OpenBLAS chose at load (e.g. ``SkylakeX``, or ``Haswell`` when
    OPENBLAS_CORETYPE forces it); "" if unknown."""
    lib = _bundled()
    if lib is not None:
        return (lib.scipy_openblas_get_corename() or b"").decode()
    ctl = _scipy_openblas()
    return (getattr(ctl, "architecture", None) or "") if ctl is not None else ""


def scipy_openblas_version() -> str:
    """The version of scipy's OpenBLAS ("0.3.30"); "" if unknown."""
    lib = _bundled()
    if lib is not None:
        config = (lib.scipy_openblas_get_config() or b"").decode().split()
        return config[1] if len(config) > 1 else ""
    ctl = _scipy_openblas()
    return (getattr(ctl, "version", None) or "") if ctl is not None else ""
