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

Compiled on first use, one kernel per (phase, activation, dtype). The activation is a
compile-time constant: its element-wise loops (from the table in kernels/activations.py) are
written into the kernel's own small generated module, which Numba compiles and caches on disk
(``load``), and whose machine code is also linked as a shared object that later processes load
without Numba. The files of one kernel, their names (a digest of everything that generates the
kernel), their atomic writes, digests and locks: kernels/cpu_cache.py.

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

import glob
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import numpy as np
from numba import carray, cfunc, njit, types

from . import activations as _acts
from . import cpu_cache
from ._numba_runtime import address, address_of, call_int, f64_ptr, gemm, i64_ptr, stack_address, typed_ptr
from .cpu_cache import cache_dir  # noqa: F401  (part of this module's interface)

from .cpu_params import (  # noqa: F401  (the backend reads them here too)
    N_PARAMS, P_A, P_ALPHA, P_BETA, P_BIAS, P_BLAS_THREADS, P_CB, P_DA, P_DB, P_DW, P_DX, P_DZ, P_GEMM, P_K,
    P_LDW, P_LDX, P_M, P_N, P_NUM_THREADS, P_SAVED, P_SLOPE, P_STAGE, P_THREAD_NUM, P_TK, P_TM, P_TN, P_TW, P_TX,
    P_W, P_WHOLE, P_X, P_Z,
)

SIGNATURE = types.void(types.voidptr)  # void kernel(void *params)
PHASES = ("forward", "backward_columns", "backward_rows")
DTYPES = ("float32", "float64")
exp, log1p, tanh, erf = math.exp, math.log1p, math.tanh, math.erf  # the table's functions, for the generated modules


@njit(inline="always")
def where(cond, x, y):
    return x if cond else y


@njit(inline="always")
def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# The kernels call no Numba runtime function, so their machine code links as a plain shared
# object (kernels/cpu_cache.py loads it without Numba): no np.empty/np.zeros (stack scratch
# instead, ``stack_address``), error_model="numpy" (no ZeroDivisionError checks), and the tile
# loops written as ``while`` (Numba's range() with a run-time step checks it for zero and raises).
# db's float64 partial sums are kept DB_CHUNK columns at a time in a 2 KiB stack buffer.
DB_CHUNK = 256


@njit(inline="always")
def _params(data):
    return carray(i64_ptr(address_of(data)), (N_PARAMS,))


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


# ---- the kernels' bodies; ``epilogue``/``grad``: one activation's element-wise loops --------

def _own_name(body, loops):
    """``body`` compiled under a name of its kernel's own. Numba names a compiled function after its
    module, qualified name and a counter that restarts in every process, so one activation's body
    compiled in one process and another's compiled in another process got the same symbol; loaded
    side by side from the disk cache, the first linked ran for both (another activation's values).
    The body is named after its loops' generated module, whose name carries the kernel's digest."""
    body.__qualname__ = f"{body.__name__}__{loops.py_func.__module__}"
    return njit(body, error_model="numpy")


def forward_body(epilogue):
    """The forward kernel for one activation: ``body(params address, a zero of the dtype)``."""

    def forward(data, zero):
        """A = g(X Wᵀ + b) over this thread's output tiles; BLAS writes Z into ``src`` (Z's buffer
        when the activation keeps Z, else A itself), the epilogue adds b and applies g in place."""
        P = _params(data)
        tid, nth = _team(P)
        M, N, K = P[P_M], P[P_N], P[P_K]
        a = carray(typed_ptr(P[P_A], zero), (M, N))
        src = carray(typed_ptr(P[P_Z] if P[P_Z] != 0 else P[P_A], zero), (M, N))
        bias = carray(typed_ptr(P[P_BIAS], zero), (N,))
        tm, tn = P[P_TM], P[P_TN]
        item = a.itemsize
        slope = _slope(P)
        tx, tw = P[P_TX] != 0, P[P_TW] != 0
        stage = P[P_STAGE]
        tiles_n = (N + tn - 1) // tn
        t, tiles = tid - nth, ((M + tm - 1) // tm) * tiles_n
        while t + nth < tiles:  # t = tid, tid + nth, ...
            t += nth
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
                epilogue(src, a, bias, r0, r1, c0, c1, slope)

    return _own_name(forward, epilogue)


def backward_columns_body(grad):
    """Backward phase 1 for one activation: ``body(params address, a zero of the dtype)``."""

    def backward_columns(data, zero):
        """Per block of columns: dZ = dA ⊙ g'(saved); db = Σ_rows dZ; dW = dZᵀ X."""
        P = _params(data)
        tid, nth = _team(P)
        M, N, K = P[P_M], P[P_N], P[P_K]
        dA = carray(typed_ptr(P[P_DA], zero), (M, N))
        saved = carray(typed_ptr(P[P_SAVED] if P[P_SAVED] != 0 else P[P_DA], zero), (M, N))  # identity reads none
        dz = carray(typed_ptr(P[P_DZ], zero), (M, N))
        db = carray(typed_ptr(P[P_DB], zero), (N,))
        x_row = carray(typed_ptr(P[P_X], zero), (K,))  # read only when M = 1 and X is stored row-major
        dw = carray(typed_ptr(P[P_DW] if P[P_DW] != 0 else P[P_DZ], zero), (N if P[P_DW] != 0 else 0, K))
        cb = P[P_CB]
        item = dz.itemsize
        slope = _slope(P)
        tx = P[P_TX] != 0
        stage = P[P_STAGE]
        blk, blocks = tid - nth, (N + cb - 1) // cb
        while blk + nth < blocks:  # blk = tid, tid + nth, ...
            blk += nth
            c0 = blk * cb
            c1 = min(c0 + cb, N)
            if stage != 2:
                grad(dz, dA, saved, 0, M, c0, c1, slope)
            if stage != 2 and P[P_DB] != 0:  # row by row, so the inner loop is contiguous and vectorises
                scratch = carray(f64_ptr(stack_address(2048)), (DB_CHUNK,))  # float64 sums, on the stack
                for j0 in range(c0, c1, DB_CHUNK):
                    acc = scratch[:min(DB_CHUNK, c1 - j0)]
                    acc[:] = 0.0
                    for i in range(M):
                        row = dz[i, j0:j0 + acc.shape[0]]
                        for j in range(acc.shape[0]):
                            acc[j] += row[j]
                    out = db[j0:j0 + acc.shape[0]]
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

    return _own_name(backward_columns, grad)


@njit(error_model="numpy")
def backward_rows_body(data, zero):
    """Backward phase 2, per (rows x K-columns) tile: dX = dZ W. The same for every activation."""
    P = _params(data)
    tid, nth = _team(P)
    M, N, K = P[P_M], P[P_N], P[P_K]
    item = carray(typed_ptr(P[P_DZ], zero), (M, N)).itemsize
    tm, tk = P[P_TM], P[P_TK]
    tw = P[P_TW] != 0
    tiles_k = (K + tk - 1) // tk
    t, tiles = tid - nth, ((M + tm - 1) // tm) * tiles_k
    while t + nth < tiles:  # t = tid, tid + nth, ...
        t += nth
        r0 = (t // tiles_k) * tm
        k0 = (t % tiles_k) * tk
        r1 = min(r0 + tm, M)
        k1 = min(k0 + tk, K)
        # dX[r0:r1, k0:k1] = dZ[r0:r1, :] @ W[:, k0:k1]
        gemm(P[P_GEMM], _blas_threads(P), P[P_ALPHA], P[P_BETA], r1 - r0, k1 - k0, N,
             P[P_DZ] + r0 * N * item, N, False,
             address(P[P_W], P[P_LDW], tw, 0, k0, item), P[P_LDW], tw,
             P[P_DX] + (r0 * K + k0) * item, K)


# ---- generated modules: one kernel each ------------------------------------------------------

def _elementwise_source(phase: str, act: _acts.Activation) -> list[str]:
    """One activation's loop nest: ``epilogue`` (forward: A = g(Z + b), keeping Z if needed) or
    ``grad`` (dZ = dA ⊙ g'). Rows are walked through 1-D slices indexed from 0: with indices from
    a run-time start Numba must allow negative (wrap-around) indices and the loop does not
    vectorise (8x slower for the ReLU epilogue, measured on 1024 x 512 float32)."""
    if phase == "forward":
        lines = ["def epilogue(src, a, bias, r0, r1, c0, c1, s):",
                 "    b_ = bias[c0:c1]",
                 "    for i in range(r0, r1):",
                 "        z_, a_ = src[i, c0:c1], a[i, c0:c1]",
                 "        for j in range(a_.shape[0]):",
                 "            z = z_[j] + b_[j]"]
        if act.keeps_z:  # src is Z's buffer: keep Z for backward
            lines.append("            z_[j] = z")
        return lines + [f"            a_[j] = {act.forward}"]
    saved = _acts.saved_name(act)
    lines = ["def grad(dz, dA, saved, r0, r1, c0, c1, s):",
             "    for i in range(r0, r1):",
             "        dz_, da_, v_ = dz[i, c0:c1], dA[i, c0:c1], saved[i, c0:c1]",
             "        for j in range(dz_.shape[0]):",
             "            da = da_[j]"]
    if saved:
        lines.append(f"            {saved} = v_[j]")
    return lines + [f"            dz_[j] = {act.backward}"]


def kernel_source(phase: str, activation: str | None, dtype: str, cache: bool) -> str:
    """The text of the module holding one kernel, ``kernel``: its phase's body with the
    activation's element-wise loops, for one dtype (``activation`` None for backward_rows)."""
    what = f"{phase} {activation}/{dtype}" if activation else f"{phase} {dtype}"
    lines = [f'"""fusedlinear CPU kernel: {what}. Generated by fusedlinear.kernels.cpu; do not edit."""',
             "import numpy as np",
             "from numba import cfunc, njit",
             "from fusedlinear.kernels.cpu import SIGNATURE, backward_columns_body, backward_rows_body, forward_body",
             "from fusedlinear.kernels.cpu import erf, exp, log1p, sigmoid, tanh, where  # noqa: F401",
             ""]
    if phase == "backward_rows":
        body = "backward_rows_body"
    else:
        act = _acts.check_activation(activation)
        lines += ["", '@njit(inline="always", error_model="numpy")', *_elementwise_source(phase, act), ""]
        loops = "epilogue" if phase == "forward" else "grad"
        lines += ["", f"body = {phase}_body({loops})"]
        body = "body"
    lines += ["", "", f'@cfunc(SIGNATURE, cache={cache}, error_model="numpy")', "def kernel(data):", f"    {body}(data, np.{dtype}(0))", ""]
    return "\n".join(lines)


def _cache_available() -> bool:
    """Whether kernels can be cached on disk: a writable directory (``cache_dir``) and a Numba
    that finds a cache location. Without one the kernels still work: they compile in every
    process, after one warning."""
    from numba.core.caching import FunctionCache

    try:
        FunctionCache(_cache_available)
        if cache_dir() is None:
            raise RuntimeError("NUMBA_CACHE_DIR, the package's __pycache__ and the user cache directory are not writable")
        return True
    except RuntimeError as exc:  # e.g. "cannot cache function ...: no locator available"
        warnings.warn(f"fusedlinear: no writable Numba cache location ({exc}); the CPU kernels are compiled "
                      f"in every process. Set NUMBA_CACHE_DIR to a writable directory to cache them.",
                      RuntimeWarning, stacklevel=2)
        return False


CACHE = _cache_available()


# ---- loading: on first use, with one line on stderr when it takes a while ---------------------

_kernels: dict = {}  # (phase, activation or None, dtype) -> the compiled cfunc, in this process
_lock = threading.Lock()
_announced = False
ANNOUNCE_AFTER_S = 1.0


def _announce(labels: list[str]) -> None:
    global _announced
    if not _announced:
        _announced = True
        where = f"cached in {cache_dir()}" if CACHE else "not cached: no writable cache location"
        print(f"fusedlinear: compiling CPU kernels for {', '.join(labels)} (first use; {where})",
              file=sys.stderr, flush=True)


def _stale_numba_files(module_name: str, source_path: str) -> list[str]:
    """Numba's cached files for the generated module at ``source_path``, found without loading
    them: Numba's cache directory for that file, asked through a stand-in function defined there."""
    from numba.core.caching import FunctionCache

    namespace = {"__name__": module_name}
    exec(compile("def kernel(): pass", source_path, "exec"), namespace)
    try:
        path = FunctionCache(namespace["kernel"]).cache_path
    except RuntimeError:  # no cache locator: nothing Numba could have written
        return []
    return _numba_files(path, source_path)


def _numba_files(numba_dir: str, source_path: str) -> list[str]:
    """Numba names a cached function's files after its source file: ``<stem>.kernel-<line>...``."""
    stem = os.path.splitext(os.path.basename(source_path))[0]
    return sorted(glob.glob(os.path.join(glob.escape(numba_dir), f"{glob.escape(stem)}.kernel-*")))


def _numba_cpu() -> tuple[str, str]:
    """The CPU name and LLVM feature string Numba compiles for (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES,
    NUMBA_ENABLE_AVX honoured): the native object is emitted for the very same target."""
    import llvmlite.binding as ll
    from numba.core import codegen, config

    name = config.CPU_NAME if config.CPU_NAME is not None else ll.get_host_cpu_name()
    return name, config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()


def _build_native(kernel, stem: str) -> str | None:
    """Link ``kernel``'s machine code as the shared object ``stem.so`` (a C compiler driver, $CC or
    cc, does the linking), loadable with ctypes without Numba; its path, or None when there is no
    linker or the object does not link or load (the kernel is then served by Numba's cache)."""
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None
    import llvmlite.binding as ll

    try:
        cpu, features = _numba_cpu()
        machine = ll.Target.from_default_triple().create_target_machine(
            cpu=cpu, features=features, opt=3, reloc="pic", codemodel="default")
        module = ll.parse_assembly(kernel._library.get_llvm_str())
        for value in [*module.functions, *module.global_variables]:  # only the entry point is exported ...
            if not value.is_declaration and value.name != kernel.native_name:
                value.linkage = ll.Linkage.internal
        builder = ll.create_pass_builder(machine, ll.create_pipeline_tuning_options(3))
        builder.getModulePassManager().run(module, builder)  # ... so what it does not reach is dropped
        obj = machine.emit_object(module)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(stem), prefix=".build-") as tmp:
            with open(os.path.join(tmp, "kernel.o"), "wb") as f:
                f.write(obj)
            subprocess.run([cc, "-shared", "-o", os.path.join(tmp, "kernel.so"), os.path.join(tmp, "kernel.o")],
                           check=True, capture_output=True, timeout=120)
            with open(os.path.join(tmp, "kernel.so"), "rb") as f:
                cpu_cache.atomic_write(stem + ".so", f.read())
        import ctypes

        ctypes.CDLL(stem + ".so")[kernel.native_name]  # an unresolved symbol fails here, not in a later process
        return stem + ".so"
    except (OSError, RuntimeError, ValueError, AttributeError, subprocess.SubprocessError) as exc:
        if os.environ.get("FUSEDLINEAR_DEBUG_NATIVE"):
            print(f"fusedlinear: no native kernel {stem}: {exc!r} {getattr(exc, 'stderr', '')}", file=sys.stderr)
        cpu_cache.remove([stem + ".so"])
        return None


def _import_module(path: str, module_name: str):
    # A top-level module in sys.modules: Numba finds its globals by importing the module's name.
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _import_generated(key: tuple, source: str, announce) -> object:
    """The cfunc ``kernel`` of a generated module: from its group in ``cache_dir()`` (Numba then
    loads it from its cache), or built afresh — the source written, compiled, the native shared
    object linked and the manifest written — when the group is missing or damaged (with one
    warning), or, without a cache, compiled from the text in memory. ``announce()`` is called
    first when the kernel will be compiled, not merely loaded."""
    name = "_".join(part for part in key if part)
    if not CACHE:
        announce()
        namespace = {"__name__": f"_fusedlinear_cpu_{name}"}
        exec(compile(source, f"<fusedlinear kernel {name}>", "exec"), namespace)
        return namespace["kernel"]
    stem = os.path.join(cache_dir(), cpu_cache.kernel_name(*key))
    path, module_name = stem + ".py", f"_fusedlinear_cpu_{os.path.basename(stem)}"
    with cpu_cache.locked(stem):  # one builder per kernel; the others wait, then load what it built
        record, damage = cpu_cache.read_manifest(stem)
        if record is not None and record["files"].get(path) != hashlib.sha256(source.encode()).hexdigest():
            record, damage = None, f"{path} is not this kernel's source"
        state = "is damaged"
        if record is not None and record.get("target") != cpu_cache.cpu_target():
            damage = f"{record.get('target')!r}, not {cpu_cache.cpu_target()!r}"
            record, state = None, "was built for another CPU"
        if record is not None:
            try:
                return _import_module(path, module_name).kernel
            except Exception as exc:  # intact by its digests, yet Numba cannot load it: rebuild
                record, damage = None, f"{type(exc).__name__} while loading it: {exc}"
        if damage is None and os.path.exists(path):
            damage = "a build was left unfinished (no manifest)"
        if damage is not None:
            cpu_cache.warn_rebuild(f"kernel {os.path.basename(stem)}", damage, state)
        cpu_cache.remove([stem + ".json"] + cpu_cache.listed_files(stem) + [stem + ".so"])  # manifest first
        announce()
        cpu_cache.atomic_write(path, source.encode())
        cpu_cache.remove(_stale_numba_files(module_name, path))  # unreadable ones would stop Numba
        kernel = _import_module(path, module_name).kernel
        files = [path] + _numba_files(kernel._cache.cache_path, path)
        native = _build_native(kernel, stem)
        cpu_cache.write_manifest(stem, files + ([native] if native else []), native=native,
                                 symbol=kernel.native_name if native else None, target=cpu_cache.cpu_target(),
                                 compiled_for=_numba_cpu())
        return kernel


def load(wanted) -> list:
    """The compiled kernels for ``wanted``, a list of (phase, activation, dtype): loaded from the
    disk cache or compiled, each once per process. backward_rows is the same kernel for every
    activation. If this takes more than ANNOUNCE_AFTER_S, one line on stderr says so (once per
    process)."""
    keys = [(phase, None if phase == "backward_rows" else activation, dtype) for phase, activation, dtype in wanted]
    for phase, activation, dtype in wanted:
        if phase not in PHASES or dtype not in DTYPES:
            raise ValueError(f"no CPU kernel for phase {phase!r}, dtype {dtype!r}: phases are {', '.join(PHASES)}, "
                             f"dtypes {', '.join(DTYPES)}")
        _acts.check_activation(activation)
    missing = [k for k in keys if k not in _kernels]
    if missing:
        labels = list(dict.fromkeys(f"{a}/{d}" for (_, a, d) in wanted))
        timer = threading.Timer(ANNOUNCE_AFTER_S, _announce, (labels,))
        timer.daemon = True

        def start_timer():  # on the first kernel that compiles; loads from the cache say nothing
            if not timer.is_alive() and not timer.finished.is_set():
                timer.start()

        with _lock:
            try:
                for key in missing:
                    if key not in _kernels:
                        _kernels[key] = _import_generated(key, kernel_source(*key, cache=CACHE), start_timer)
            finally:
                timer.cancel()
    return [_kernels[k] for k in keys]


def loaded() -> list[tuple]:
    """The (phase, activation or None, dtype) of every kernel this process has loaded (through
    Numba or natively, kernels/cpu_cache.py) or compiled."""
    return sorted(set(_kernels) | cpu_cache.LOADED, key=str)


__all__ = ["N_PARAMS", "PHASES", "DTYPES", "load", "loaded", "cache_dir", "kernel_source"]
