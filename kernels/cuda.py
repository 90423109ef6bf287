"""CUDA kernels (``fused_linear.cu``) behind launch plans: what to launch, with which grid, on which buffers.

A *plan* is a list of :class:`Launch`. It names buffers symbolically (``"x"``, ``"a"``, ...) and
takes its grid and block sizes from :mod:`fusedlinear.kernels.tiling`. Two executors run plans:

* :func:`run_plan` here — CuPy: compiles ``fused_linear.cu`` with NVRTC (once per device, cached
  in memory and in CuPy's on-disk cache) and launches on a given CUDA stream, with raw device
  pointers supplied by the caller (fusedlinear.backend.cupy_cuda, where PyTorch allocates them);
* ``tests/cuda_emu`` — the same ``.cu`` built with g++ and run on the CPU, plan for plan.

No torch here: pointers are integers.

``fl_activations.cuh`` is generated from the activation table by :func:`activation_header`;
the test suite fails when the checked-in file differs from what the table generates
(``python -m fusedlinear.kernels.cuda`` rewrites it).
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

from . import activations as _acts
from . import tiling

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "fused_linear.cu")
HEADER = os.path.join(HERE, "fl_activations.cuh")

CTYPE = {"float32": "float", "float64": "double"}


def activation_header() -> str:
    """C++ for g and g' of every activation of the table (templates on T, host and device)."""
    lines = [
        "// fl_activations.cuh: GENERATED from kernels/activations.py by `python -m fusedlinear.kernels.cuda`.",
        "// Do not edit; tests/test_cuda_build.py fails when this file and the table disagree.",
        "#pragma once",
        "",
        "template <typename T> __host__ __device__ __forceinline__ T where(bool c, T x, T y) { return c ? x : y; }",
        "template <typename T> __host__ __device__ __forceinline__ T sigmoid(T x) { return T(1.0) / (T(1.0) + exp(-x)); }",
        "",
        "// a = g(z)",
        "template <typename T> __host__ __device__ __forceinline__ T fl_act_forward(int act, T z, T s)",
        "{",
        "    switch (act) {",
    ]
    for i, act in enumerate(_acts.ACTIVATIONS.values()):
        lines.append(f"    case {i}: return {_acts.to_cpp(act.forward)};  // {act.name}")
    lines += [
        "    }",
        "    return z;",
        "}",
        "",
        "// dz = da * g'(.), v being the saved tensor's element (a or z, as the table says)",
        "template <typename T> __host__ __device__ __forceinline__ T fl_act_backward(int act, T da, T v, T s)",
        "{",
        "    switch (act) {",
    ]
    for i, act in enumerate(_acts.ACTIVATIONS.values()):
        bind = f"const T {_acts.saved_name(act)} = v; " if _acts.saved_name(act) else ""
        lines.append(f"    case {i}: {{ {bind}return {_acts.to_cpp(act.backward)}; }}  // {act.name}")
    lines += ["    }", "    return da;", "}", ""]
    return "\n".join(lines)


# ---- launch plans ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One kernel launch. ``args`` are (kind, value): ``("ptr", buffer name or None)``,
    ``("i64", int)``, ``("int", int)`` or ``("T", float)`` (the kernel's scalar type)."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[tuple[str, object], ...]


def gemm_name(dtype: str, ta: bool, tb: bool) -> str:
    return f"fl_gemm<{CTYPE[dtype]}, {str(ta).lower()}, {str(tb).lower()}>"


def kernel_names() -> list[str]:
    """Every template instantiation a plan may launch (the name expressions for NVRTC)."""
    names = []
    for dtype in CTYPE:
        names += [gemm_name(dtype, False, True), gemm_name(dtype, False, False), gemm_name(dtype, True, False)]
        names += [f"fl_grad_z<{CTYPE[dtype]}>", f"fl_column_sum<{CTYPE[dtype]}>"]
    return names


def _ptr(name):
    return ("ptr", name)


def forward_plan(dtype, m, n, k, ldx, ldw, has_bias, activation, slope) -> list[Launch]:
    """A (M, N) = g(X Wᵀ + b); Z written too when the activation saves it.
    Buffers: x (M, ldx), w (N, ldw), b (N) if has_bias; outputs a and, if saved, z (M, N)."""
    act = _acts.ACTIVATIONS[activation]
    grid, block = tiling.cuda_gemm_grid(m, n)
    return [Launch(gemm_name(dtype, False, True), grid, block, (
        _ptr("a"), _ptr("z" if act.saves == "z" else None), _ptr("x"), _ptr("w"), _ptr("b" if has_bias else None),
        ("i64", m), ("i64", n), ("i64", k), ("i64", ldx), ("i64", ldw), ("i64", n),
        ("int", _acts.ACTIVATION_IDS[activation]), ("T", float(slope)),
    ))]


COLUMN_SUM_ROWS = 128  # rows per chunk in db's first pass: M/128 chunks keep the GPU busy at large M


def column_chunks(m: int) -> int:
    return max(1, -(-m // COLUMN_SUM_ROWS))


def backward_plan(dtype, m, n, k, ldx, ldw, activation, slope, mask) -> list[Launch]:
    """dZ, then db, dX, dW as ``mask`` asks. Buffers: da, saved (M, N) (absent for identity),
    x, w; workspaces dz (M, N) and partial (column_chunks(M), N); outputs dx (M, K), dw (N, K), db (N)."""
    act = _acts.ACTIVATIONS[activation]
    c = CTYPE[dtype]
    grid, block = tiling.cuda_elementwise_grid(m * n)
    plan = [Launch(f"fl_grad_z<{c}>", grid, block, (
        _ptr("dz"), _ptr("da"), _ptr("saved" if act.saves != "none" else None), ("i64", m * n),
        ("int", _acts.ACTIVATION_IDS[activation]), ("T", float(slope)),
    ))]
    if mask[2]:
        chunks = column_chunks(m)
        (gx, _, _), block = tiling.cuda_columns_grid(n)
        plan.append(Launch(f"fl_column_sum<{c}>", (gx, chunks, 1), block, (
            _ptr("partial"), _ptr("dz"), ("i64", m), ("i64", n), ("i64", COLUMN_SUM_ROWS))))
        plan.append(Launch(f"fl_column_sum<{c}>", (gx, 1, 1), block, (
            _ptr("db"), _ptr("partial"), ("i64", chunks), ("i64", n), ("i64", chunks))))
    plain = (("int", -1), ("T", 0.0))
    if mask[0]:  # dX (M, K) = dZ (M, N) · W (N, K)
        grid, block = tiling.cuda_gemm_grid(m, k)
        plan.append(Launch(gemm_name(dtype, False, False), grid, block, (
            _ptr("dx"), _ptr(None), _ptr("dz"), _ptr("w"), _ptr(None),
            ("i64", m), ("i64", k), ("i64", n), ("i64", n), ("i64", ldw), ("i64", k)) + plain))
    if mask[1]:  # dW (N, K) = dZᵀ (N, M) · X (M, K)
        grid, block = tiling.cuda_gemm_grid(n, k)
        plan.append(Launch(gemm_name(dtype, True, False), grid, block, (
            _ptr("dw"), _ptr(None), _ptr("dz"), _ptr("x"), _ptr(None),
            ("i64", n), ("i64", k), ("i64", m), ("i64", n), ("i64", ldx), ("i64", k)) + plain))
    return plan


def compile_options() -> tuple[str, ...]:
    return ("-std=c++17", f"-I{HERE}") + tuple(f"-D{k}={v}" for k, v in tiling.cuda_defines().items())


# ---- CuPy executor ---------------------------------------------------------------------------

_modules: dict[int, object] = {}
_modules_lock = threading.Lock()


def _module(device_id: int):
    import cupy

    module = _modules.get(device_id)
    if module is None:
        with _modules_lock:
            module = _modules.get(device_id)
            if module is None:
                with open(SOURCE) as f:
                    code = f.read()
                with cupy.cuda.Device(device_id):
                    module = cupy.RawModule(code=code, options=compile_options(), name_expressions=kernel_names())
                    module.compile()
                _modules[device_id] = module
    return module


def run_plan(plan: list[Launch], dtype: str, pointers: dict[str, int], device_id: int, stream_ptr: int) -> None:
    """Launch ``plan`` on CUDA stream ``stream_ptr`` of device ``device_id``; ``pointers`` maps
    buffer names to device addresses (allocated by the caller)."""
    import cupy
    import numpy as np

    scalar = np.float32 if dtype == "float32" else np.float64
    convert = {
        "ptr": lambda v: np.uint64(pointers[v] if v is not None else 0),
        "i64": np.int64,
        "int": np.int32,
        "T": scalar,
    }
    module = _module(device_id)
    with cupy.cuda.Device(device_id), cupy.cuda.ExternalStream(stream_ptr, device_id):
        for launch in plan:
            kernel = module.get_function(launch.kernel)
            kernel(launch.grid, launch.block, tuple(convert[kind](v) for kind, v in launch.args))


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process (None if they can); asked once, so no CUDA
    call happens inside a stream capture."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: pip install 'fusedlinear[cuda]' (CUDA 12) or 'fusedlinear[cuda13]' (CUDA 13)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device visible to CuPy"
    except Exception as exc:  # no driver, no device
        return f"CuPy sees no usable CUDA device ({type(exc).__name__}: {exc})"
    return None


if __name__ == "__main__":
    with open(HEADER, "w") as f:
        f.write(activation_header())
    print(f"wrote {HEADER}")
