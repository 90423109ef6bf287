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
  one thread) or PyTorch's own MKL (``libtorch_cpu`` exports ``sgemm_``/``dgemm_`` and
  ``MKL_Set_Num_Threads_Local``, the per-thread setting); with MKL on 2+ threads the GEMMs may
  instead be whole-matrix multi-threaded MKL calls (``_whole``). Which library, and tiles of
  column blocks or row bands or whole-matrix calls, is chosen by measurement on a shape's first
  call and kept per machine (``_choose``); ``FUSEDLINEAR_CPU_BLAS=mkl|openblas`` forces the
  library. BLAS takes 32-bit sizes (``SIZE_MAX``): ``route`` sends larger ones to the torch backend.
* **Kernels.** Loaded natively from the kernel cache when it holds them (ctypes, no Numba:
  kernels/cpu_cache.py), else through Numba (kernels/cpu.py), which compiles and caches them.
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
import hashlib
import json
import os
import struct
import sys
import threading
import time
from typing import NamedTuple

import torch

from ..kernels import activations as _acts
from ..kernels import blas as _blas
from ..kernels import cpu_cache
from ..kernels import cpu_params as slots
from ..kernels import tiling
from ..kernels.cpu_params import P_A, P_BLAS_THREADS, P_DA, P_DB, P_DW, P_DX, P_DZ, P_SAVED, P_X, P_Z
from .cpu_runtime import FORK
from .notices import warn_once
from .layout import DTYPE_NAMES, matrix_operand

_cpu = None  # fusedlinear.kernels.cpu, imported on first use (it compiles or loads the kernels)


def _kernels():
    global _cpu
    if _cpu is None:
        from ..kernels import cpu

        _cpu = cpu
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
    from ..kernels.blas import scipy_gemm_addresses, scipy_openblas_core

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


_SCALARS = {dtype: (torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype)) for dtype in (torch.float32, torch.float64)}


@functools.lru_cache(maxsize=None)
def _entry(phase: str, activation: str, dtype) -> tuple[int, object]:
    """(address, ctypes callable) of the kernel for ``phase``, ``activation`` and ``dtype``: the
    cached native shared object when there is an intact one (no Numba import), else loaded from
    Numba's cache or compiled on first use (kernels.cpu.load, which also rebuilds a damaged one)."""
    address = cpu_cache.load_native(phase, None if phase == "backward_rows" else activation, DTYPE_NAMES[dtype])
    if address is None:
        address = _kernels().load([(phase, activation, DTYPE_NAMES[dtype])])[0].address
    return address, ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)


def _launch(address: int, call, params: array.array, parallel: bool) -> None:
    """Run the kernel at ``address`` (``call``: the same as a ctypes callable) on ``params``: on
    PyTorch's pool when ``parallel`` and more than one thread is set, else on this thread. Calls
    through OpenBLAS (no per-thread setter, unlike MKL's) hold it to one thread while they run."""
    openblas = params[P_BLAS_THREADS] == 0
    if openblas:
        _blas.pin_one_thread()
    try:
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
    finally:
        if openblas:
            _blas.unpin()


def _warn_fork_once():
    warn_once(("fork",), "fusedlinear: this process was forked from one with several threads (an OpenMP pool may "
              "exist there); fused kernels run on one thread here (OpenMP is not fork-safe). Use "
              "torch.set_num_threads(1) in workers or the 'spawn' start method.", stacklevel=4)


SIZE_MAX = 2**31 - 1  # BLAS (LP64) takes sizes and leading dimensions as 32-bit ints (backend.route checks)


@functools.lru_cache(maxsize=None)
def _template(dtype, library: str) -> tuple[int, ...]:
    """The parameter slots that depend only on the dtype and the BLAS library."""
    blas = blas_libraries()[library]
    one, zero = _SCALARS[dtype]
    p = [0] * slots.N_PARAMS
    p[slots.P_GEMM] = blas[DTYPE_NAMES[dtype]]
    p[slots.P_BLAS_THREADS] = blas["threads_fn"]
    p[slots.P_ALPHA], p[slots.P_BETA] = one.data_ptr(), zero.data_ptr()
    return tuple(p)


def _activation_slots(activation: str, slope: float) -> tuple[int, bool]:
    """(the slope's float64 bits as an int64, keeps Z?); asked when a plan is made."""
    return struct.unpack("<q", struct.pack("<d", slope))[0], _acts.ACTIVATIONS[activation].keeps_z


def _parallel(m: int, n: int, k: int, itemsize: int) -> bool:
    """Whether a call is worth PyTorch's thread team: enough flops, or a weight too large for one
    core's cache (at batch 1 the call is a memory-bound GEMV, and two cores stream it faster)."""
    return 2 * m * n * k >= tiling.CPU_PARALLEL_MIN_FLOP or n * k * itemsize >= tiling.CPU_PARALLEL_MIN_WEIGHT_BYTES


def _whole(parallel: bool) -> bool:
    """Whether whole-matrix BLAS calls (layout "whole": MKL's own threads, on PyTorch's pool, then
    the element-wise stages in parallel tiles) can run: a parallel call on 2+ threads, not in a
    forked child (MKL's threads are OpenMP too). Per-tile single-threaded MKL calls each repack
    the shared operand, ~10% slower at B=1024 (2-core EPYC); the tuner measures both."""
    return parallel and torch.get_num_threads() > 1 and not FORK.unsafe


# ---- the BLAS and tile layout, chosen by measurement ------------------------------------------
# On a call signature's first plan, each candidate ("library/layout": the BLAS libraries found,
# tiles of column blocks or of row bands, and with 2+ threads MKL's own threaded "whole"-matrix
# calls) runs the real call on the real operands into scratch outputs, TUNE_REPS times after one
# warm-up, taking turns; the fastest single run wins (other processes' load only adds time; on one
# thread runs are timed in this thread's CPU time). Winners are kept per shape class (dtype,
# forward or which gradients, rows rounded up to a power of two, N, K, threads, candidates) in a
# file in the kernel cache named after the machine (``machine_key``: CPU model, vector width, library versions,
# kernel sources, settings that force other code paths), so a new CPU or library version tunes again.
# Bounded: at most TUNE_BUDGET_S of timing per process (then the table's choice, not recorded),
# and a call whose single run exceeds TUNE_MAX_RUN_S is not timed further (table's choice,
# recorded; provisional if that run was descheduled). FUSEDLINEAR_CPU_BLAS=mkl|openblas forces
# the library (its layout by the table).
# A busy machine: a run during which the timing thread ran less than TUNE_CLEAN_SHARE of the
# wall time was descheduled. A choice measured with a candidate that had only such runs, or
# while the 1-minute load average exceeded the machine's CPUs (``_busy``), is kept as
# provisional: used as it is while the machine stays busy, measured again (once per process) by
# the first process that finds it quiet — whose layers of that shape may then differ from earlier
# processes' in the last bits (another BLAS or tiling), so not under
# torch.use_deterministic_algorithms(True), which keeps every kept choice as it is. Measured
# under a test suite's load, a settled choice had cost 784->512 at B=64, 2 threads, 45% more
# than the one measured on the quiet machine. To measure everything again, delete the
# tuning_*.json file.
TUNE_REPS = 5
TUNE_BUDGET_S = 3.0
TUNE_MAX_RUN_S = 0.05
TUNE_CLEAN_SHARE = 0.9
_tuning: dict = {"choices": None, "spent": 0.0, "announced": False, "rechecked": set()}
_tuning_lock = threading.RLock()


@functools.lru_cache(maxsize=None)
def machine_key() -> dict:
    """What a measured choice depends on besides the shape."""
    import platform

    import scipy

    from ..kernels.blas import scipy_openblas_version

    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                name, _, value = line.partition(":")
                info[name.strip()] = value.strip()
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    libraries = blas_libraries()
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "family/model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "vector_bits": 512 if "avx512f" in flags else 256 if "avx2" in flags else 128,
            "torch": torch.__version__, "scipy": scipy.__version__, "libraries": sorted(libraries),
            "openblas": f"{libraries['openblas']['core']} {scipy_openblas_version()}",
            "kernels": cpu_cache.generator_stamp().hex()[:16],
            # what forces other code paths on the same CPU (e.g. AVX2 kernels on an AVX-512 one)
            "forced": {v: os.environ[v] for v in ("MKL_ENABLE_INSTRUCTIONS", "NUMBA_CPU_NAME") if os.environ.get(v)}}


def tuning_path() -> str | None:
    folder = cpu_cache.cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(folder, f"tuning_{digest}.json")


def _busy() -> str | None:
    """Why this machine is too busy to trust a measurement now (its 1-minute load average above its
    CPUs), or None; None where the load average is unknown (Windows). The load average counts the
    whole machine (a container's too), so not the few CPUs this process may use: a job pinned to 4
    cores of a shared 64-core node would never be quiet (load on its own cores shows as descheduled
    runs)."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):
        return None
    return f"load average {load:.1f} on {cpus} CPUs" if load > cpus else None


def _entry_choice(entry) -> tuple[str | None, str | None]:
    """(choice, why it is provisional or None) of a tuning file's entry: a settled choice is the
    string itself, a provisional one ``{"choice": ..., "provisional": why}``."""
    if isinstance(entry, dict):
        return entry.get("choice"), str(entry.get("provisional") or "measured on a busy machine")
    return entry, None


def _choices() -> dict:
    """This machine's measured choices (read once per process; a damaged file is warned about once
    and measured again)."""
    if _tuning["choices"] is None:
        path = tuning_path()
        record, damage = cpu_cache.read_record(path) if path else (None, None)
        if damage:
            cpu_cache.warn_rebuild(f"tuning {os.path.basename(path)}", damage)
            cpu_cache.remove([path])
        _tuning["choices"] = dict(record or {})
    return _tuning["choices"]


def _table_choice(m: int, threads: int) -> str:
    """The choice without measuring: BLAS_CHOICE or the table (blas_functions), tiles by the table."""
    library = "mkl" if blas_functions(m)["threads_fn"] else "openblas"
    if library == "mkl" and m >= tiling.CPU_WHOLE_MIN_ROWS and threads > 1:
        return "mkl/whole"
    return f"{library}/{'bands' if m >= tiling.CPU_BAND_MIN_ROWS and threads > 1 else 'columns'}"


def _candidates(x, w) -> list[str]:
    """The "library/layout" choices a call can run: each BLAS found, in column blocks or (2+
    threads, 2 rows per thread) row bands, and MKL's threaded whole-matrix calls (see _whole)."""
    (m, k), n, threads = x.shape, w.shape[0], torch.get_num_threads()
    libraries = list(blas_libraries())
    layouts = ["columns", "bands"] if threads > 1 and m >= 2 * threads else ["columns"]
    candidates = [f"{library}/{layout}" for library in libraries for layout in layouts]
    if "mkl" in libraries and threads > 1 and _parallel(m, n, k, x.element_size()):
        candidates.append("mkl/whole")  # OpenBLAS's own threads are a second pool: never whole
    return candidates


def _shape_class(x, w, mask, candidates=None) -> str:
    """What a measured choice is kept under: dtype, forward or which gradients, rows rounded up to a
    power of two, N, K, threads, and the candidates (rows of one class can have different ones:
    on 2 threads m=3 has no row bands, m=4 has; each set is measured for itself)."""
    (m, k), n = x.shape, w.shape[0]
    what = "forward" if mask is None else "backward" + "".join("xwb"[i] for i in range(3) if mask[i])
    return (f"{DTYPE_NAMES[x.dtype]} {what} m<={1 << (m - 1).bit_length()} n={n} k={k} threads={torch.get_num_threads()}"
            f" of {','.join(candidates or _candidates(x, w))}")


def _choose(x, w, b, activation, slope, mask) -> str:
    default = _table_choice(x.shape[0], torch.get_num_threads())
    if BLAS_CHOICE != "auto" or FORK.unsafe:
        return default
    candidates = _candidates(x, w)
    if len(candidates) == 1:
        return candidates[0]
    key = _shape_class(x, w, mask, candidates)
    with _tuning_lock:
        kept, provisional = _entry_choice(_choices().get(key))
        if kept in candidates and (provisional is None or _busy() or torch.are_deterministic_algorithms_enabled()):
            return kept
        # A class is timed once per process: a provisional choice again, or where its settled choice
        # is no candidate here (an edited or stale file) and a provisional one cannot replace it.
        if _tuning["spent"] >= TUNE_BUDGET_S or key in _tuning["rechecked"]:
            return kept if kept in candidates else default
        if provisional is None:  # measuring a provisional choice again is part of the once announced
            _announce_tuning()
        _tuning["rechecked"].add(key)
        timings, descheduled = _time_plans({c: _plan(x, w, b, activation, slope, mask, c) for c in candidates}, x, w, mask)
        choice = default if timings is None else min(timings, key=timings.get)
        why = _busy() or ("timed runs were descheduled" if descheduled else None)
        _record(key, choice if why is None else {"choice": choice, "provisional": why})
        return choice


def _announce_tuning() -> None:
    if not _tuning["announced"]:
        _tuning["announced"] = True
        print(f"fusedlinear: timing the CPU BLAS and tile choices for new layer shapes (once per machine, at most "
              f"{TUNE_BUDGET_S:g} s; cached in {tuning_path() or 'memory only'})", file=sys.stderr, flush=True)


def _time_plans(plans: dict, x, w, mask) -> tuple[dict | None, bool]:
    """(the fastest of TUNE_REPS runs of each plan on x and w into scratch outputs, whether some
    plan had only descheduled runs), the plans taking turns (so a slow moment of a shared machine
    hits all alike); (None, whether that run was descheduled) when one run is too slow. A run was
    descheduled when this thread ran less than TUNE_CLEAN_SHARE of its wall time."""
    (m, k), n = x.shape, w.shape[0]
    xk = matrix_operand(x)[0]
    runs = {}
    for name, plan in plans.items():
        if mask is None:
            a, z = x.new_zeros((m, n)), x.new_zeros((m, n) if plan.keeps_z else 0)
            runs[name] = functools.partial(_run_forward, plan, xk, a, z)
        else:
            grad = x.new_zeros((m, n))
            bufs = (grad, grad, x.new_empty((m, n)), x.new_empty((m, k) if mask[0] else 0),
                    x.new_empty((n, k) if mask[1] else 0), x.new_empty(n if mask[2] else 0))
            runs[name] = functools.partial(_run_backward, plan, xk, *bufs, mask)
    # On one thread all of a run's work is on this thread: its CPU time leaves out the time the
    # machine gives to other processes (a run descheduled on a shared box no longer looks slow).
    one_thread = torch.get_num_threads() == 1
    samples = {name: [] for name in runs}
    clean = dict.fromkeys(runs, False)  # has a run that was not descheduled
    for rep in range(TUNE_REPS + 1):  # the first round is a warm-up
        for name, run in runs.items():
            cpu, wall = time.thread_time(), time.perf_counter()
            run()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            elapsed = cpu if one_thread else wall
            _tuning["spent"] += wall  # the budget bounds the caller's wait
            if elapsed > TUNE_MAX_RUN_S:
                return None, cpu < TUNE_CLEAN_SHARE * wall  # on a team, wall time: maybe only descheduled
            if rep:
                samples[name].append(elapsed)
                clean[name] |= cpu >= TUNE_CLEAN_SHARE * wall
    # other load only ever adds time: the fastest run is the least disturbed one
    return {name: min(s) for name, s in samples.items()}, not all(clean.values())


def _record(key: str, entry) -> None:
    """Add one choice (a string, or a provisional entry: see _entry_choice) to this machine's file:
    merged under its lock with what other processes added; a provisional entry never replaces a
    settled one that another process wrote meanwhile (this process keeps its own: one choice per
    shape for a process's lifetime, so its results do not change when a plan is made again)."""
    _tuning["choices"][key] = entry
    path = tuning_path()
    if path is None:
        return
    try:
        with cpu_cache.locked(path):
            record = cpu_cache.read_record(path)[0] or {}
            if _entry_choice(entry)[1] is not None and isinstance(record.get(key), str):  # settled there
                return
            cpu_cache.write_record(path, {**record, key: entry}, machine=machine_key())
    except OSError:
        pass  # a read-only cache: the choice holds for this process


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


def _plan(x, w, b, activation, slope, mask, choice: str | None = None) -> Plan | None:
    """The plan of a forward (``mask`` None) or a backward with that mask, with ``choice``
    ("library/layout", see _choose; by default the measured or forced one); None when BLAS's
    32-bit sizes cannot hold the problem."""
    (m, k), n = x.shape, w.shape[0]
    FORK.check()
    _, ldx, tx = matrix_operand(x)
    wk, ldw, tw = matrix_operand(w)
    if max(m, n, k, ldx, ldw) > SIZE_MAX:
        return None
    library, layout = (choice or _choose(x, w, b, activation, slope, mask)).split("/")
    mkl = library == "mkl"
    p = list(_template(x.dtype, library))
    p[slots.P_LDX], p[slots.P_TX] = ldx, tx
    p[slots.P_W], p[slots.P_LDW], p[slots.P_TW] = wk.data_ptr(), ldw, tw
    p[slots.P_M], p[slots.P_N], p[slots.P_K] = m, n, k
    p[slots.P_SLOPE], keeps_z = _activation_slots(activation, slope)
    threads = torch.get_num_threads()
    parallel = _parallel(m, n, k, x.element_size())
    whole = mkl and layout == "whole" and _whole(parallel)  # else (e.g. forked since the choice) tiles
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
        launch("forward", parallel, STAGE=2 if whole else 0,
               **dict(zip(("TM", "TN"), tiling.cpu_tiles(m, n, threads, layout == "bands"))))
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
        launch("backward_rows", parallel, **dict(zip(("TM", "TK"), tiling.cpu_tiles(m, k, threads, layout == "bands"))))
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
            # Each parameter block as an array once: a call copies it (0.16 us) instead of
            # converting a tuple of 31 ints (0.8 us per launch).
            plan = plan._replace(launches=tuple((address, call, array.array("q", template), parallel)
                                                for address, call, template, parallel in plan.launches))
            with _plans_lock:
                while len(_plans) >= _MAX_PLANS:
                    del _plans[next(iter(_plans))]  # the oldest; a call holding it runs on
                _plans[key] = plan
    return plan


def forward(x, w, b, activation, slope):
    """A = g(X Wᵀ + b) (and Z when the activation's derivative needs it) in one kernel call."""
    plan = _cached_plan(x, w, b, activation, slope, None)  # held until the kernels have returned
    assert plan is not None, "backend.route sends sizes over SIZE_MAX to the torch backend"
    m, n = x.shape[0], w.shape[0]
    xk = matrix_operand(x)[0]
    a = x.new_empty(m, n)  # sizes as ints, not a tuple: 1.0 vs 1.6 us per allocation
    z = x.new_empty(m, n) if plan.keeps_z else x.new_empty(0)
    _run_forward(plan, xk, a, z)
    return a, z


def _run_forward(plan, xk, a, z):
    x_ptr, a_ptr, z_ptr = xk.data_ptr(), a.data_ptr(), z.data_ptr() if plan.keeps_z else 0
    for address, call, template, parallel in plan.launches:
        p = array.array("q", template)
        p[P_X], p[P_A], p[P_Z] = x_ptr, a_ptr, z_ptr
        _launch(address, call, p, parallel)


def backward(grad, saved, x, w, activation, slope, mask):
    """dX, dW, db (each empty where ``mask`` says not needed) from dA and the saved A or Z."""
    mask = (bool(mask[0]), bool(mask[1]), bool(mask[2]))
    plan = _cached_plan(x, w, None, activation, slope, mask)  # held until the kernels have returned
    assert plan is not None, "backend.route sends sizes over SIZE_MAX to the torch backend"
    (m, k), n = x.shape, w.shape[0]
    xk = matrix_operand(x)[0]
    grad = grad.contiguous()
    saved = saved.contiguous()
    dz = x.new_empty(m, n)
    dx = x.new_empty(m, k) if mask[0] else x.new_empty(0)
    dw = x.new_empty(n, k) if mask[1] else x.new_empty(0)
    db = x.new_empty(n) if mask[2] else x.new_empty(0)
    _run_backward(plan, xk, grad, saved, dz, dx, dw, db, mask)
    return dx, dw, db


def _run_backward(plan, xk, grad, saved, dz, dx, dw, db, mask):
    pointers = (xk.data_ptr(), grad.data_ptr(), saved.data_ptr() if saved.numel() else 0, dz.data_ptr(),
                dx.data_ptr() if mask[0] else 0, dw.data_ptr() if mask[1] else 0, db.data_ptr() if mask[2] else 0)
    for address, call, template, parallel in plan.launches:
        p = array.array("q", template)
        p[P_X], p[P_DA], p[P_SAVED], p[P_DZ], p[P_DX], p[P_DW], p[P_DB] = pointers
        _launch(address, call, p, parallel)


def unavailable_reason() -> str | None:
    return None
