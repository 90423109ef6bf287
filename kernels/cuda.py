"""CUDA kernels (``fl_elementwise.cu``, ``fused_linear.cu``) behind launch plans: what to launch, with which grid, on which buffers.

A *plan* is a tuple of :class:`Launch`. It names buffers symbolically (``"a"``, ``"dz"``, ...) and
takes its grid and block sizes from :mod:`fusedlinear.kernels.tiling`. Plans are cached per
shape. Two executors run them:

* :func:`run_plan` here — CuPy: compiles each module with NVRTC once per device (and CuPy's disk
  cache across processes), fetches every kernel of it right after compiling (so nothing loads
  later, e.g. during a CUDA-graph capture), and launches on the caller's CUDA stream with raw
  device pointers from the caller (fusedlinear.backend.cupy_cuda, where PyTorch allocates them);
* ``tests/emulator.py`` + ``tests/cuda_emu`` — the same ``.cu`` built with g++ and run on the CPU,
  plan for plan, with the same grid-limit check.

No torch here: pointers are integers. Every kernel argument is a pointer, a 64-bit integer or a
double, so CuPy passes plain Python ints and floats as they are (int -> int64, float -> double).

Module sources are handed to NVRTC with their ``#include "..."`` files inlined, so CuPy's
disk-cache key (source text + options) covers everything compiled; the options carry the
activation table's digest as well. CuPy appends ``-ftz=true`` to every NVRTC compile: float32
arithmetic in these kernels flushes subnormal inputs and results to zero (float16 values are
never subnormal as floats; float64 is unaffected).

``fl_activations.cuh`` is generated from the activation table by :func:`activation_header`;
the test suite fails when the checked-in file differs from what the table generates
(``python -m fusedlinear.kernels.cuda`` rewrites it).
"""

from __future__ import annotations

import functools
import os
import re
import threading
import warnings
from dataclasses import dataclass

from . import activations as _acts
from . import tiling

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "fl_activations.cuh")
# The two modules: element-wise kernels (both engines) and the own engine's GEMMs.
SOURCES = {"elementwise": os.path.join(HERE, "fl_elementwise.cu"), "gemm": os.path.join(HERE, "fused_linear.cu")}

# dtype name -> kernel-name tag; the element-wise kernels take every float dtype, the own GEMM two.
TAGS = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}
GEMM_DTYPES = ("float32", "float64")
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}  # bytes per element (16-byte loads: tiling.cuda_vector)
# The compute (and db partial-sum) type of each storage dtype: float for the 16-bit types, as PyTorch.
COMPUTE_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}


def activation_header() -> str:
    """C++ for g and g' of every activation of the table (templates on the activation id and the
    compute type, host and device), and the list of activations for the kernel instances."""
    acts = list(_acts.ACTIVATIONS.values())
    lines = [
        "// fl_activations.cuh: GENERATED from kernels/activations.py by `python -m fusedlinear.kernels.cuda`.",
        "// Do not edit; tests/test_cuda_build.py fails when this file and the table disagree.",
        f"// Activation table digest: {_acts.table_digest()}",
        "#pragma once",
        "",
        "template <typename T> __host__ __device__ __forceinline__ T where(bool c, T x, T y) { return c ? x : y; }",
        "template <typename T> __host__ __device__ __forceinline__ T sigmoid(T x) { return T(1.0) / (T(1.0) + exp(-x)); }",
        "",
        "// a = g_ACT(z); ACT is a compile-time constant, so each instance holds one formula",
        "template <int ACT, typename T> __host__ __device__ __forceinline__ T fl_act_forward(T z, T s)",
        "{",
        "    switch (ACT) {",
    ]
    for i, act in enumerate(acts):
        lines.append(f"    case {i}: return {_acts.to_cpp(act.forward)};  // {act.name}")
    lines += [
        "    }",
        "    return z;",
        "}",
        "",
        "// dz = da * g_ACT'(.), v being the saved tensor's element (a or z, as the table says)",
        "template <int ACT, typename T> __host__ __device__ __forceinline__ T fl_act_backward(T da, T v, T s)",
        "{",
        "    switch (ACT) {",
    ]
    for i, act in enumerate(acts):
        bind = f"const T {_acts.saved_name(act)} = v; " if _acts.saved_name(act) else ""
        lines.append(f"    case {i}: {{ {bind}return {_acts.to_cpp(act.backward)}; }}  // {act.name}")
    lines += ["    }", "    return da;", "}", "",
              "// X(activation id, activation name, S, TAG) for every activation of the table",
              "#define FL_FOR_EACH_ACTIVATION(X, S, TAG) \\"]
    cont = " \\"
    lines += [f"    X({i}, {act.name}, S, TAG){cont if i + 1 < len(acts) else ''}" for i, act in enumerate(acts)]
    return "\n".join(lines) + "\n"


_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


def module_source(module: str) -> str:
    """The module's source with its local ``#include "..."`` files inlined (each once), so that
    the text NVRTC compiles, and CuPy keys its disk cache on, is everything compiled."""
    seen = set()

    def expand(path):
        with open(path) as f:
            text = f.read()

        def include(match):
            name = os.path.join(HERE, match.group(1))
            if name in seen:
                return ""
            seen.add(name)
            return expand(name)

        return _INCLUDE.sub(include, text)

    return expand(SOURCES[module])


def compile_options() -> tuple[str, ...]:
    """NVRTC/nvcc options: C++17, the tile sizes, and the activation table's digest (so a changed
    table is a different cache key even if a header were not inlined)."""
    return ("-std=c++17", f"-DFL_TABLE_DIGEST=0x{_acts.table_digest()}") + tuple(
        f"-D{k}={v}" for k, v in tiling.cuda_defines().items())


# ---- kernel names -----------------------------------------------------------------------------


def act_forward_name(activation: str, dtype: str) -> str:
    return f"fl_act_forward_{activation}_{TAGS[dtype]}"


def grad_name(activation: str, dtype: str) -> str:
    return f"fl_grad_{activation}_{TAGS[dtype]}"


def gemm_forward_name(activation: str, dtype: str) -> str:
    return f"fl_gemm_forward_{activation}_{TAGS[dtype]}"


def gemm_name(dtype: str, transpose_a: bool) -> str:
    return f"fl_gemm_{'tn' if transpose_a else 'nn'}_{TAGS[dtype]}"


def kernel_names(module: str) -> list[str]:
    """Every kernel of ``module`` (all are fetched right after compiling)."""
    if module == "elementwise":
        return [n for d in TAGS for a in _acts.NAMES for n in (act_forward_name(a, d), grad_name(a, d))]
    return ([gemm_forward_name(a, d) for d in GEMM_DTYPES for a in _acts.NAMES]
            + [gemm_name(d, t) for d in GEMM_DTYPES for t in (False, True)])


# ---- launch plans -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One kernel launch. ``args`` are (kind, value): ``("ptr", buffer name or None)``, ``("i64", int)``
    or ``("f64", float)``. Construction checks the grid against CUDA's limits."""

    module: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[tuple[str, object], ...]

    def __post_init__(self):
        tiling.cuda_check_launch(self.grid, self.block)


def _ptr(name):
    return ("ptr", name)


class Plan(tuple):
    """A tuple of :class:`Launch`, plus what :func:`run_plan` prebuilds for it once per device:
    each launch's kernel function and argument block, with the slots its buffers' addresses go
    in (so a call fills a few slots instead of rebuilding and converting every argument)."""

    def __init__(self, launches=()):
        self.ready: dict = {}  # device id -> [(function, grid, block, argument template, ((slot, buffer name), ...))]


@functools.lru_cache(maxsize=4096)
def act_forward_plan(dtype: str, count: int, activation: str, slope: float) -> tuple[Launch, ...]:
    """a = g(z) over ``count`` contiguous elements (buffers "a" and "z"; they may be one buffer).
    The identity needs no launch."""
    if activation == "identity":
        return Plan()
    grid, block = tiling.cuda_elementwise_grid(count, tiling.cuda_vector(ITEMSIZE[dtype]))
    return Plan((Launch("elementwise", act_forward_name(activation, dtype), grid, block,
                        (_ptr("a"), _ptr("z"), ("i64", count), ("f64", float(slope)))),))


@functools.lru_cache(maxsize=4096)
def grad_plan(dtype: str, m: int, n: int, da_strides: tuple[int, int], activation: str, slope: float,
              want_dz: bool, want_db: bool) -> tuple[Launch, ...]:
    """dZ = dA ⊙ g'(saved) (buffer "dz", (m, n) contiguous) and db = Σ_rows dZ ("db", (n,)) in one
    launch and one pass over "da" ((m, n) with element strides ``da_strides``, 0 allowed) and
    "saved" ((m, n) contiguous; absent for the identity). Launches nothing when neither output
    is wanted."""
    if not (want_dz or want_db):
        return Plan()
    grid, block = tiling.cuda_grad_grid(m, n, tiling.CUDA_GRAD_THREADS_F64 if dtype == "float64" else tiling.CUDA_GRAD_THREADS,
                                        tiling.cuda_vector(ITEMSIZE[dtype]))
    saves = _acts.ACTIVATIONS[activation].saves != "none"
    return Plan((Launch("elementwise", grad_name(activation, dtype), grid, block, (
        _ptr("dz" if want_dz else None), _ptr("db" if want_db else None), _ptr("da"),
        _ptr("saved" if saves else None), ("i64", m), ("i64", n), ("i64", da_strides[0]),
        ("i64", da_strides[1]), ("f64", float(slope)))),))


@functools.lru_cache(maxsize=4096)
def gemm_forward_plan(dtype, m, n, k, ldx, ldw, has_bias, activation, slope) -> tuple[Launch, ...]:
    """Own engine: A (M, N) = g(X Wᵀ + b), Z written too when the activation saves it.
    Buffers: x (M, ldx), w (N, ldw), b (N) if has_bias; outputs a and, if saved, z (M, N)."""
    act = _acts.ACTIVATIONS[activation]
    grid, block = tiling.cuda_gemm_grid(m, n)
    return Plan((Launch("gemm", gemm_forward_name(activation, dtype), grid, block, (
        _ptr("a"), _ptr("z" if act.keeps_z else None), _ptr("x"), _ptr("w"), _ptr("b" if has_bias else None),
        ("i64", m), ("i64", n), ("i64", k), ("i64", ldx), ("i64", ldw), ("i64", n), ("f64", float(slope)))),))


@functools.lru_cache(maxsize=4096)
def gemm_backward_plan(dtype, m, n, k, ldx, ldw, ld_dz, want_dx, want_dw) -> tuple[Launch, ...]:
    """Own engine, after dZ: dX (M, K) = dZ (M, N) · W (N, K) and dW (N, K) = dZᵀ (N, M) · X (M, K).
    Buffers: dz (M, ld_dz), w (N, ldw), x (M, ldx); outputs dx, dw (contiguous)."""
    plan = []
    if want_dx:
        grid, block = tiling.cuda_gemm_grid(m, k)
        plan.append(Launch("gemm", gemm_name(dtype, False), grid, block, (
            _ptr("dx"), _ptr("dz"), _ptr("w"), ("i64", m), ("i64", k), ("i64", n), ("i64", ld_dz), ("i64", ldw),
            ("i64", k))))
    if want_dw:
        grid, block = tiling.cuda_gemm_grid(n, k)
        plan.append(Launch("gemm", gemm_name(dtype, True), grid, block, (
            _ptr("dw"), _ptr("dz"), _ptr("x"), ("i64", n), ("i64", k), ("i64", m), ("i64", ld_dz), ("i64", ldx),
            ("i64", k))))
    return Plan(plan)


# ---- CuPy executor ---------------------------------------------------------------------------

_functions: dict[tuple[int, str], dict] = {}  # (device, module) -> kernel name -> cupy Function
_streams: dict[tuple[int, int], object] = {}  # (device, stream pointer) -> cupy ExternalStream
_lock = threading.Lock()


def load(device_id: int, module: str) -> dict:
    """Compile ``module`` for device ``device_id`` (once per process; CuPy's disk cache makes later
    processes skip NVRTC) and fetch every kernel of it now."""
    functions = _functions.get((device_id, module))
    if functions is None:
        import cupy

        with _lock:
            functions = _functions.get((device_id, module))
            if functions is None:
                with cupy.cuda.Device(device_id):
                    raw = cupy.RawModule(code=module_source(module), options=compile_options())
                    functions = {name: raw.get_function(name).kernel for name in kernel_names(module)}
                _functions[(device_id, module)] = functions
    return functions


def _stream(device_id: int, stream_ptr: int):
    stream = _streams.get((device_id, stream_ptr))
    if stream is None:
        import cupy

        if len(_streams) >= 64:  # streams come and go (each graph capture has its own): keep the map small
            _streams.clear()

        with warnings.catch_warnings():  # deprecated from CuPy 14 (for Stream.from_external), kept: 13.x has only this
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _streams[(device_id, stream_ptr)] = cupy.cuda.ExternalStream(stream_ptr, device_id)
    return stream


def _prepare(plan, device_id: int) -> list:
    """``plan``'s launches ready to go on device ``device_id``: the kernel functions fetched and
    the argument blocks built (see :class:`Plan`); once per (plan, device)."""
    ready = []
    for launch in plan:
        tiling.cuda_check_launch(launch.grid, launch.block)  # plans check on construction; this guards edits
        function = load(device_id, launch.module)[launch.kernel]
        template = [0 if kind == "ptr" else value for kind, value in launch.args]
        slots = tuple((i, value) for i, (kind, value) in enumerate(launch.args) if kind == "ptr" and value is not None)
        ready.append((function, launch.grid, launch.block, template, slots))
    plan.ready[device_id] = ready
    return ready


def run_plan(plan, buffers: dict, device_id: int, stream_ptr: int) -> None:
    """Launch ``plan`` on CUDA stream ``stream_ptr`` of device ``device_id`` (the current device);
    ``buffers`` maps buffer names to objects whose ``data_ptr()`` is a device address (allocated
    by the caller). Asynchronous: no synchronisation, no allocation."""
    ready = plan.ready.get(device_id) or _prepare(plan, device_id)
    stream = _streams.get((device_id, stream_ptr)) or _stream(device_id, stream_ptr)
    for function, grid, block, template, slots in ready:
        args = template.copy()
        for i, name in slots:
            args[i] = buffers[name].data_ptr()
        function(grid, block, tuple(args), stream=stream)


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process (None if they can); asked once, so no CUDA
    call happens inside a stream capture. Checks CuPy, a visible device, and NVRTC (which CuPy
    needs to compile the kernels; a CuPy wheel finds it in the CUDA runtime or the
    nvidia-cuda-nvrtc wheel)."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: pip install 'fusedlinear[cuda]' (CUDA 12) or 'fusedlinear[cuda13]' (CUDA 13)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device visible to CuPy"
    except Exception as exc:  # CUDARuntimeError without a driver; its class differs across CuPy versions
        return f"CuPy sees no usable CUDA device ({type(exc).__name__}: {exc})"
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:  # missing libnvrtc: ImportError, OSError or NVRTCError, by CuPy version
        return (f"CuPy cannot load NVRTC, which compiles the kernels ({type(exc).__name__}: {exc}); "
                "install the CUDA runtime's NVRTC (e.g. pip install nvidia-cuda-nvrtc-cu12)")
    return None


if __name__ == "__main__":
    with open(HEADER, "w") as f:
        f.write(activation_header())
    print(f"wrote {HEADER}")
