"""Backend "numba": CPU tensors, float32/float64, through the Numba kernels in fusedlinear.kernels.cpu.

What this layer does for the kernels:

* **Memory.** Every output and workspace is a PyTorch tensor, handed over by address. X and W
  go to BLAS as (address, leading dimension, transposed?) whenever their rows or their columns
  are contiguous (a transposed tensor is read in place); other strides (expanded, stride-0
  rows) are copied first.
* **BLAS.** Each tile is one single-threaded ``?gemm_`` call, into scipy's OpenBLAS (held to
  one thread) — or, when that OpenBLAS runs only its AVX2 kernels (e.g. OPENBLAS_CORETYPE=Haswell),
  into PyTorch's own MKL (``libtorch_cpu`` exports ``sgemm_``/``dgemm_`` and
  ``MKL_Set_Num_Threads_Local``, the per-thread setting) below CPU_OPENBLAS_MIN_ROWS rows; each
  measured fastest in its range (kernels/tiling.py). ``FUSEDLINEAR_CPU_BLAS=mkl|openblas`` forces
  one; with MKL forced, large batches use whole-matrix multi-threaded MKL calls instead of tiles
  (``_whole``).
* **Launch plans.** What a call's parameter blocks hold that does not change from step to step
  (sizes, tiles, BLAS, W's and b's addresses) is worked out once per call signature and kept;
  a call fills in only its input's and outputs' addresses (``_cached_plan``).
* **Threads.** The kernels run as the body of ``GOMP_parallel`` on PyTorch's own OpenMP pool
  (the libgomp PyTorch loaded), with ``torch.get_num_threads()`` threads: one pool for eager
  ops and fused ops, never two spinning side by side. One thread — ``torch.set_num_threads(1)``
  as in DataLoader workers, a small problem, or a process forked after the pool started (where
  OpenMP must not be used again) — calls the kernel directly on the calling thread.
* **Concurrency.** The kernel calls release the GIL; Python threads may call at once.
"""

from __future__ import annotations

import array
import ctypes
import functools
import os
import struct
import warnings

import torch

from ..kernels import activations as _acts
from ..kernels import cpu_params as slots
from ..kernels import tiling
from ..kernels.cpu_params import P_A, P_DA, P_DB, P_DW, P_DX, P_DZ, P_SAVED, P_X, P_Z
from .layout import matrix_operand

_cpu = None  # fusedlinear.kernels.cpu, imported on first use (it compiles or loads the kernels)
_pool_started = False


def _kernels():
    global _cpu
    if _cpu is None:
        from ..kernels import _numba_runtime, cpu

        _cpu = cpu
        _numba_runtime.limit_scipy_blas_threads()
    return _cpu


# Which BLAS the kernels call: "auto" (see blas_functions), "mkl" or "openblas". Read from the
# environment variable FUSEDLINEAR_CPU_BLAS when this module is imported (the first fused CPU
# call), not per call: a lookup in os.environ costs ~0.5 us, and a training step makes a dozen.
BLAS_CHOICE = os.environ.get("FUSEDLINEAR_CPU_BLAS", "auto")


@functools.lru_cache(maxsize=None)
def blas_libraries() -> dict:
    """The BLAS libraries the kernels can call, by name, as addresses of their ?gemm_ (and, for
    MKL, of its per-thread thread setter): "mkl" (PyTorch's own, when libtorch_cpu exports it)
    and "openblas" (scipy's, with the kernel family it runs: ``core``)."""
    from ..kernels._numba_runtime import scipy_gemm_addresses, scipy_openblas_core

    found = {}
    if torch.backends.mkl.is_available():
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            address = lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value  # noqa: E731
            found["mkl"] = {"library": "MKL (PyTorch's)", "float32": address("sgemm_"),
                            "float64": address("dgemm_"), "threads_fn": address("MKL_Set_Num_Threads_Local")}
        except (OSError, AttributeError):
            pass
    addresses = scipy_gemm_addresses()
    core = scipy_openblas_core()
    found["openblas"] = {"library": f"OpenBLAS (scipy's, {core or 'unknown'} kernels)", "float32": addresses["sgemm"],
                         "float64": addresses["dgemm"], "threads_fn": 0, "core": core}
    return found


def blas_functions(m: int = tiling.CPU_OPENBLAS_MIN_ROWS) -> dict:
    """The BLAS for a call with ``m`` rows: BLAS_CHOICE (mkl | openblas) if set, else
    scipy's OpenBLAS when it runs AVX-512 kernels, and otherwise (AVX2 kernels, e.g. with
    OPENBLAS_CORETYPE=Haswell) MKL below CPU_OPENBLAS_MIN_ROWS rows and OpenBLAS from there on:
    per-tile calls of each measured fastest in its range (kernels/tiling.py)."""
    libraries = blas_libraries()
    choice = BLAS_CHOICE
    if choice == "auto":
        avx512 = libraries["openblas"]["core"].lower() in tiling.OPENBLAS_AVX512_CORES
        choice = "mkl" if "mkl" in libraries and m < tiling.CPU_OPENBLAS_MIN_ROWS and not avx512 else "openblas"
    if choice not in libraries:
        raise RuntimeError(f"FUSEDLINEAR_CPU_BLAS={choice!r}: available here are {', '.join(libraries)} (or auto)")
    return libraries[choice]


@functools.lru_cache(maxsize=None)
def openmp() -> dict | None:
    """PyTorch's OpenMP runtime: GOMP_parallel and the thread-number queries, or None."""
    candidates = [os.path.join(os.path.dirname(torch.__file__), "lib", name) for name in ("libgomp.so.1", "libiomp5.so")]
    for path in [p for p in candidates if os.path.exists(p)] + [None]:
        try:
            lib = ctypes.CDLL(path)  # None: symbols already loaded in the process
            parallel = lib.GOMP_parallel
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        address = lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value  # noqa: E731
        return {"library": path or "process", "parallel": parallel,
                "thread_num": address("omp_get_thread_num"), "num_threads": address("omp_get_num_threads")}
    return None


def threading_report() -> str:
    omp = openmp()
    return (f"GOMP_parallel on PyTorch's OpenMP pool ({omp['library']})" if omp
            else "no OpenMP runtime found: single-threaded kernels")


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
_SCALARS = {dtype: (torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype)) for dtype in _DTYPE_NAMES}


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


_forked = False  # in a process forked after the OpenMP pool started, OpenMP is not used again
os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.lru_cache(maxsize=None)
def _entry(name: str, dtype) -> tuple[int, object]:
    """(address, ctypes callable) of kernel ``name`` for ``dtype``."""
    address = _kernels().KERNELS[(name, _DTYPE_NAMES[dtype])].address
    return address, ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)


def _launch(address: int, call, params: array.array, parallel: bool) -> None:
    """Run the kernel at ``address`` (``call``: the same as a ctypes callable) on ``params``: on
    PyTorch's pool when ``parallel`` and more than one thread is set, else on this thread."""
    global _pool_started
    if parallel and torch.get_num_threads() > 1:
        omp = openmp()
        if omp is not None and not (_forked and _pool_started):
            _pool_started = True
            params[0], params[1] = omp["thread_num"], omp["num_threads"]
            omp["parallel"](address, params.buffer_info()[0], torch.get_num_threads(), 0)
            return
        if _forked and _pool_started:
            _warn_fork_once()
    params[0] = params[1] = 0
    call(params.buffer_info()[0])


_fork_warned = False


def _warn_fork_once():
    global _fork_warned
    if not _fork_warned:
        _fork_warned = True
        warnings.warn("fusedlinear: this process was forked after the OpenMP pool started; fused kernels run "
                      "on one thread here (OpenMP is not fork-safe). Use torch.set_num_threads(1) in workers "
                      "or the 'spawn' start method.", RuntimeWarning, stacklevel=4)


def _check_dims(*dims: int) -> None:
    if max(dims) >= 2**31:
        raise RuntimeError(f"fusedlinear: dimension {max(dims)} exceeds BLAS's 32-bit limit; "
                           f"use fusedlinear.use_backend('torch')")


@functools.lru_cache(maxsize=None)
def _template(dtype, library: str) -> tuple[int, ...]:
    """The parameter slots that depend only on the dtype and the BLAS library."""
    blas = blas_libraries()[library]
    one, zero = _SCALARS[dtype]
    p = [0] * slots.N_PARAMS
    p[slots.P_GEMM] = blas[_DTYPE_NAMES[dtype]]
    p[slots.P_BLAS_THREADS] = blas["threads_fn"]
    p[slots.P_ALPHA], p[slots.P_BETA] = one.data_ptr(), zero.data_ptr()
    return tuple(p)


@functools.lru_cache(maxsize=None)
def _activation_slots(activation: str, slope: float) -> tuple[int, int, bool]:
    """(activation id, the slope's float64 bits as an int64, keeps Z?)."""
    return (_acts.ACTIVATION_IDS[activation], struct.unpack("<q", struct.pack("<d", slope))[0],
            _acts.ACTIVATIONS[activation].saves == "z")


def _parallel(m: int, n: int, k: int, itemsize: int) -> bool:
    """Whether a call is worth PyTorch's thread team: enough flops, or a weight too large for one
    core's cache (at batch 1 the call is a memory-bound GEMV, and two cores stream it faster)."""
    return 2 * m * n * k >= tiling.CPU_PARALLEL_MIN_FLOP or n * k * itemsize >= tiling.CPU_PARALLEL_MIN_WEIGHT_BYTES


def _whole(mkl: bool, m: int, parallel: bool) -> bool:
    """Large problems with MKL forced: whole-matrix BLAS calls (MKL's own threads, on PyTorch's
    pool), then the element-wise stages in parallel tiles. Per-tile single-threaded MKL calls
    each repack the shared operand, ~10% slower at B=1024 (2-core EPYC)."""
    return (mkl and parallel and m >= tiling.CPU_WHOLE_MIN_ROWS and torch.get_num_threads() > 1
            and not _forked)  # MKL's own threads are OpenMP too: not in a forked child


def _plan(x, w, b, activation, slope, mask):
    """What a call runs: its launches ``[(kernel address, kernel, parameter slots, parallel?)]``,
    with every slot filled that does not change from call to call (sizes, tiles, BLAS, W and b),
    the tensors those addresses point into, and whether the plan may be kept for later calls (not
    when it points into a copy of an oddly strided W or b, made for this call). Forward when
    ``mask`` is None, else backward with that mask. Per call only the input's and the outputs'
    addresses are filled in."""
    (m, k), n = x.shape, w.shape[0]
    blas = blas_functions(m)
    mkl = blas["threads_fn"] != 0
    p = list(_template(x.dtype, "mkl" if mkl else "openblas"))
    _, ldx, tx = matrix_operand(x)
    wk, ldw, tw = matrix_operand(w)
    _check_dims(m, n, k, ldx, ldw)
    p[slots.P_LDX], p[slots.P_TX] = ldx, tx
    p[slots.P_W], p[slots.P_LDW], p[slots.P_TW] = wk.data_ptr(), ldw, tw
    p[slots.P_M], p[slots.P_N], p[slots.P_K] = m, n, k
    p[slots.P_ACT], p[slots.P_SLOPE], _ = _activation_slots(activation, slope)
    threads = torch.get_num_threads()
    parallel = _parallel(m, n, k, x.element_size())
    whole = _whole(mkl, m, parallel)
    launches = []

    def launch(name, run_parallel, **values):
        for slot, value in values.items():
            p[getattr(slots, f"P_{slot}")] = value
        launches.append((*_entry(name, x.dtype), tuple(p), run_parallel))

    if mask is None:  # forward
        bias = b.contiguous() if b is not None else x.new_zeros(n)
        p[slots.P_BIAS] = bias.data_ptr()
        if whole:
            launch("forward", False, TM=m, TN=n, WHOLE=1, STAGE=1)  # one multi-threaded GEMM ...
            p[slots.P_WHOLE] = 0
        launch("forward", parallel, STAGE=2 if whole else 0, **dict(zip(("TM", "TN"), tiling.cpu_tiles(m, n, threads))))
        return launches, (wk, bias), wk is w and (b is None or bias is b)
    p[slots.P_CB] = tiling.cpu_column_block(n, threads)
    if whole:
        launch("backward_columns", True, STAGE=1)  # dZ and db in parallel column blocks ...
        if mask[1]:  # ... then dW and dX as whole GEMMs
            launch("backward_columns", False, WHOLE=1, STAGE=2, CB=n)
        if mask[0]:
            launch("backward_rows", False, WHOLE=1, STAGE=2, CB=n, TM=m, TK=k)
        return launches, (wk,), wk is w
    launch("backward_columns", parallel if mask[1] else m * n >= tiling.CPU_PARALLEL_MIN_FLOP)
    if mask[0]:
        launch("backward_rows", parallel, **dict(zip(("TM", "TK"), tiling.cpu_tiles(m, k, threads))))
    return launches, (wk,), wk is w


# Launch plans by call signature. A plan holds W's and b's addresses but no reference to them,
# so they are part of the key (address, shape, strides): the caller's W is the one the address
# points into, and a new tensor is a new plan. Plans with copies made for this call only
# (an oddly strided W or b) are not kept.
_plans: dict = {}
_MAX_PLANS = 256


def _cached_plan(x, w, b, activation, slope, mask):
    key = (x.shape, x.stride(), x.dtype, w.data_ptr(), w.shape, w.stride(),
           None if b is None or mask is not None else (b.data_ptr(), b.stride()),
           activation, slope, mask, torch.get_num_threads(), _forked, BLAS_CHOICE)
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(x, w, b, activation, slope, mask)
        if plan[2]:  # kept without W and b themselves (only a zero bias it made)
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = plan = (plan[0], tuple(t for t in plan[1] if t is not w and t is not b), True)
    return plan


def forward(x, w, b, activation, slope):
    """A = g(X Wᵀ + b) (and Z when the activation's derivative needs it) in one kernel call."""
    (m, k), n = x.shape, w.shape[0]
    launches, keep, _ = _cached_plan(x, w, b, activation, slope, None)  # keep: copies the launches point into
    xk = matrix_operand(x)[0]
    a = x.new_empty((m, n))
    keeps_z = _activation_slots(activation, slope)[2]
    z = x.new_empty((m, n) if keeps_z else 0)
    for address, call, template, parallel in launches:
        p = array.array("q", template)
        p[P_X], p[P_A], p[P_Z] = xk.data_ptr(), a.data_ptr(), z.data_ptr() if keeps_z else 0
        _launch(address, call, p, parallel)
    return a, z


def backward(grad, saved, x, w, activation, slope, mask):
    """dX, dW, db (each empty where ``mask`` says not needed) from dA and the saved A or Z."""
    (m, k), n = x.shape, w.shape[0]
    mask = (bool(mask[0]), bool(mask[1]), bool(mask[2]))
    launches, keep, _ = _cached_plan(x, w, None, activation, slope, mask)  # keep: copies the launches point into
    xk = matrix_operand(x)[0]
    grad = grad.contiguous()
    saved = saved.contiguous()
    dz = x.new_empty((m, n))
    dx = x.new_empty((m, k) if mask[0] else 0)
    dw = x.new_empty((n, k) if mask[1] else 0)
    db = x.new_empty(n if mask[2] else 0)
    for address, call, template, parallel in launches:
        p = array.array("q", template)
        p[P_X], p[P_DA], p[P_SAVED], p[P_DZ] = xk.data_ptr(), grad.data_ptr(), saved.data_ptr() if saved.numel() else 0, dz.data_ptr()
        p[P_DX], p[P_DW], p[P_DB] = (dx.data_ptr() if mask[0] else 0, dw.data_ptr() if mask[1] else 0,
                                     db.data_ptr() if mask[2] else 0)
        _launch(address, call, p, parallel)
    return dx, dw, db


def unavailable_reason() -> str | None:
    return None
