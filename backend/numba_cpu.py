"""Backend "numba": CPU tensors, float32/float64, through the Numba kernels in fusedlinear.kernels.cpu.

What this layer does for the kernels:

* **Memory.** Every output and workspace is a PyTorch tensor, handed over by address. X and W
  go to BLAS as (address, leading dimension, transposed?) whenever their rows or their columns
  are contiguous (a transposed tensor is read in place); other strides (expanded, stride-0
  rows) are copied first.
* **Lifetimes (the rule).** Every address a kernel reads or writes points into a tensor that
  lives until the kernel has returned: one the call holds in a local (its arguments, outputs and
  contiguous copies) or one owned by the ``Plan`` the call holds in a local (a zero bias, a copy
  of an oddly strided W or b). A plan owns everything its addresses point into except the
  caller's own W and b, whose addresses are then part of the plan's key (the call holds them).
  Plans are immutable; evicting one only drops the cache's reference, so a call (on any thread)
  that holds it runs on. Tensors without a data pointer (sparse, mkldnn, vmap's batched tensors)
  never get here: ``fusedlinear.backend.route`` sends them to the torch backend.
* **BLAS.** Each tile is one single-threaded ``?gemm_`` call, into scipy's OpenBLAS (held to
  one thread) — or, when that OpenBLAS runs only its AVX2 kernels (e.g. OPENBLAS_CORETYPE=Haswell),
  into PyTorch's own MKL (``libtorch_cpu`` exports ``sgemm_``/``dgemm_`` and
  ``MKL_Set_Num_Threads_Local``, the per-thread setting) below CPU_OPENBLAS_MIN_ROWS rows; each
  measured fastest in its range (kernels/tiling.py). ``FUSEDLINEAR_CPU_BLAS=mkl|openblas`` forces
  one; with MKL forced, large batches use whole-matrix multi-threaded MKL calls instead of tiles
  (``_whole``). BLAS takes 32-bit sizes (``SIZE_MAX``): ``route`` sends larger ones to the torch backend.
* **Launch plans.** What a call's parameter blocks hold that does not change from step to step
  (sizes, tiles, BLAS, W's and b's addresses) is worked out once per call signature and kept
  (at most ``_MAX_PLANS``, the oldest evicted first); a call fills in only its input's and
  outputs' addresses (``_cached_plan``).
* **Threads.** The kernels run as the body of ``GOMP_parallel`` on PyTorch's own OpenMP pool
  (the libgomp PyTorch loaded), with ``torch.get_num_threads()`` threads: one pool for eager
  ops and fused ops, never two spinning side by side. One thread — ``torch.set_num_threads(1)``
  as in DataLoader workers, or a small problem — calls the kernel directly on the calling thread.
* **Fork.** In a child forked from a process that may have had an OpenMP pool (``FORK``, in
  :mod:`fusedlinear.backend`), the kernels run on the calling thread, with one warning.
* **Concurrency.** The kernel calls release the GIL; Python threads may call at once.
"""

from __future__ import annotations

import array
import ctypes
import functools
import os
import struct
import threading
import warnings
from typing import NamedTuple

import torch

from ..kernels import activations as _acts
from ..kernels import cpu_params as slots
from ..kernels import tiling
from ..kernels.cpu_params import P_A, P_DA, P_DB, P_DW, P_DX, P_DZ, P_SAVED, P_X, P_Z
from . import FORK
from .layout import matrix_operand

_cpu = None  # fusedlinear.kernels.cpu, imported on first use (it compiles or loads the kernels)


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
BLAS_CHOICE = os.environ.get("FUSEDLINEAR_CPU_BLAS") or "auto"
BLAS_CHOICES = ("auto", "mkl", "openblas")


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
    if choice not in BLAS_CHOICES:
        raise ValueError(f"FUSEDLINEAR_CPU_BLAS={choice!r} is not a BLAS choice: use one of "
                         f"{', '.join(BLAS_CHOICES)} (or unset it for auto)")
    if choice == "auto":
        avx512 = libraries["openblas"]["core"].lower() in tiling.OPENBLAS_AVX512_CORES
        choice = "mkl" if "mkl" in libraries and m < tiling.CPU_OPENBLAS_MIN_ROWS and not avx512 else "openblas"
    if choice not in libraries:
        raise RuntimeError(f"FUSEDLINEAR_CPU_BLAS={choice!r}: this PyTorch has no {choice}; available here are "
                           f"{', '.join(libraries)} (or auto)")
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


@functools.lru_cache(maxsize=None)
def _entry(phase: str, activation: str, dtype) -> tuple[int, object]:
    """(address, ctypes callable) of the kernel for ``phase``, ``activation`` and ``dtype``:
    loaded from the disk cache or compiled on first use (kernels.cpu.load)."""
    address = _kernels().load([(phase, activation, _DTYPE_NAMES[dtype])])[0].address
    return address, ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)


def _launch(address: int, call, params: array.array, parallel: bool) -> None:
    """Run the kernel at ``address`` (``call``: the same as a ctypes callable) on ``params``: on
    PyTorch's pool when ``parallel`` and more than one thread is set, else on this thread."""
    if parallel and torch.get_num_threads() > 1:
        omp = openmp()
        if omp is not None and not FORK.unsafe:
            params[0], params[1] = omp["thread_num"], omp["num_threads"]
            omp["parallel"](address, params.buffer_info()[0], torch.get_num_threads(), 0)
            return
        if FORK.unsafe:
            _warn_fork_once()
    params[0] = params[1] = 0
    call(params.buffer_info()[0])


_fork_warned = False


def _warn_fork_once():
    global _fork_warned
    if not _fork_warned:
        _fork_warned = True
        warnings.warn("fusedlinear: this process was forked from one with several threads (an OpenMP pool may "
                      "exist there); fused kernels run on one thread here (OpenMP is not fork-safe). Use "
                      "torch.set_num_threads(1) in workers or the 'spawn' start method.", RuntimeWarning, stacklevel=4)


SIZE_MAX = 2**31 - 1  # BLAS (LP64) takes sizes and leading dimensions as 32-bit ints (backend.route checks)


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


def _activation_slots(activation: str, slope: float) -> tuple[int, int, bool]:
    """(activation id, the slope's float64 bits as an int64, keeps Z?); asked when a plan is made."""
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
            and not FORK.unsafe)  # MKL's own threads are OpenMP too: not in a forked child


class Plan(NamedTuple):
    """What a call runs, immutable: ``launches``, each (kernel address, kernel, parameter slots,
    parallel?) with every slot filled that does not change from call to call (sizes, tiles, BLAS,
    W and b); whether Z is kept; ``owned``, the tensors those slots point into that the caller does
    not hold (a zero bias, copies of an oddly strided W or b); ``kept``, whether later calls may
    use it (not when it holds such a copy: W and b may change in place between calls)."""

    launches: tuple
    keeps_z: bool
    owned: tuple
    kept: bool


def _plan(x, w, b, activation, slope, mask) -> Plan | None:
    """The plan of a forward (``mask`` None) or a backward with that mask; None when BLAS's
    32-bit sizes cannot hold the problem."""
    (m, k), n = x.shape, w.shape[0]
    FORK.check()
    blas = blas_functions(m)
    mkl = blas["threads_fn"] != 0
    p = list(_template(x.dtype, "mkl" if mkl else "openblas"))
    _, ldx, tx = matrix_operand(x)
    wk, ldw, tw = matrix_operand(w)
    if max(m, n, k, ldx, ldw) > SIZE_MAX:
        return None
    p[slots.P_LDX], p[slots.P_TX] = ldx, tx
    p[slots.P_W], p[slots.P_LDW], p[slots.P_TW] = wk.data_ptr(), ldw, tw
    p[slots.P_M], p[slots.P_N], p[slots.P_K] = m, n, k
    p[slots.P_ACT], p[slots.P_SLOPE], keeps_z = _activation_slots(activation, slope)
    threads = torch.get_num_threads()
    parallel = _parallel(m, n, k, x.element_size())
    whole = _whole(mkl, m, parallel)
    launches = []

    def launch(name, run_parallel, **values):
        for slot, value in values.items():
            p[getattr(slots, f"P_{slot}")] = value
        launches.append((*_entry(name, activation, x.dtype), tuple(p), run_parallel))

    def plan(kept, *made):  # owns what it made; the caller holds its own W and b
        return Plan(tuple(launches), keeps_z, tuple(t for t in made if t is not w and t is not b), kept)

    if mask is None:  # forward
        bias = b.contiguous() if b is not None else x.new_zeros(n)
        p[slots.P_BIAS] = bias.data_ptr()
        if whole:
            launch("forward", False, TM=m, TN=n, WHOLE=1, STAGE=1)  # one multi-threaded GEMM ...
            p[slots.P_WHOLE] = 0
        launch("forward", parallel, STAGE=2 if whole else 0, **dict(zip(("TM", "TN"), tiling.cpu_tiles(m, n, threads))))
        return plan(wk is w and (b is None or bias is b), wk, bias)
    p[slots.P_CB] = tiling.cpu_column_block(n, threads)
    if whole:
        launch("backward_columns", True, STAGE=1)  # dZ and db in parallel column blocks ...
        if mask[1]:  # ... then dW and dX as whole GEMMs
            launch("backward_columns", False, WHOLE=1, STAGE=2, CB=n)
        if mask[0]:
            launch("backward_rows", False, WHOLE=1, STAGE=2, CB=n, TM=m, TK=k)
        return plan(wk is w, wk)
    launch("backward_columns", parallel if mask[1] else m * n >= tiling.CPU_PARALLEL_MIN_FLOP)
    if mask[0]:
        launch("backward_rows", parallel, **dict(zip(("TM", "TK"), tiling.cpu_tiles(m, k, threads))))
    return plan(wk is w, wk)


# Launch plans by call signature. A kept plan holds W's and b's addresses but no reference to
# them (a plan must not keep a model's weights alive), so they are part of the key (address,
# shape, strides): the caller's W is the one the address points into, and a new tensor is a new
# plan. The slope is keyed by its bits: -0.0 == 0.0 (and NaN != NaN) as floats.
_plans: dict = {}
_plans_lock = threading.Lock()  # for insertion and eviction; lookups take no lock
_MAX_PLANS = 256
_slope_bits = struct.Struct("<d").pack


def _cached_plan(x, w, b, activation, slope, mask) -> Plan | None:
    key = (x.shape, x.stride(), x.dtype, w.data_ptr(), w.shape, w.stride(),
           None if b is None or mask is not None else (b.data_ptr(), b.stride()),
           activation, _slope_bits(slope), mask, torch.get_num_threads(), FORK.unsafe, BLAS_CHOICE)
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(x, w, b, activation, slope, mask)
        if plan is not None and plan.kept:
            with _plans_lock:
                while len(_plans) >= _MAX_PLANS:
                    del _plans[next(iter(_plans))]  # the oldest; a call holding it runs on
                _plans[key] = plan
    return plan


def forward(x, w, b, activation, slope):
    """A = g(X Wᵀ + b) (and Z when the activation's derivative needs it) in one kernel call."""
    plan = _cached_plan(x, w, b, activation, slope, None)  # held until the kernels have returned
    assert plan is not None, "backend.route sends sizes over SIZE_MAX to the torch backend"
    (m, k), n = x.shape, w.shape[0]
    xk = matrix_operand(x)[0]
    a = x.new_empty((m, n))
    z = x.new_empty((m, n) if plan.keeps_z else 0)
    for address, call, template, parallel in plan.launches:
        p = array.array("q", template)
        p[P_X], p[P_A], p[P_Z] = xk.data_ptr(), a.data_ptr(), z.data_ptr() if plan.keeps_z else 0
        _launch(address, call, p, parallel)
    return a, z


def backward(grad, saved, x, w, activation, slope, mask):
    """dX, dW, db (each empty where ``mask`` says not needed) from dA and the saved A or Z."""
    mask = (bool(mask[0]), bool(mask[1]), bool(mask[2]))
    plan = _cached_plan(x, w, None, activation, slope, mask)  # held until the kernels have returned
    assert plan is not None, "backend.route sends sizes over SIZE_MAX to the torch backend"
    (m, k), n = x.shape, w.shape[0]
    xk = matrix_operand(x)[0]
    grad = grad.contiguous()
    saved = saved.contiguous()
    dz = x.new_empty((m, n))
    dx = x.new_empty((m, k) if mask[0] else 0)
    dw = x.new_empty((n, k) if mask[1] else 0)
    db = x.new_empty(n if mask[2] else 0)
    for address, call, template, parallel in plan.launches:
        p = array.array("q", template)
        p[P_X], p[P_DA], p[P_SAVED], p[P_DZ] = xk.data_ptr(), grad.data_ptr(), saved.data_ptr() if saved.numel() else 0, dz.data_ptr()
        p[P_DX], p[P_DW], p[P_DB] = (dx.data_ptr() if mask[0] else 0, dw.data_ptr() if mask[1] else 0,
                                     db.data_ptr() if mask[2] else 0)
        _launch(address, call, p, parallel)
    return dx, dw, db


def unavailable_reason() -> str | None:
    return None
