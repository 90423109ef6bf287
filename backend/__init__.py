"""Device dispatch: turns tensors into kernel calls for the tensor's device and dtype.

The table is small on purpose::

    backend   runs on        dtypes              module
    "numba"   CPU tensors    float32, float64    fusedlinear.backend.numba_cpu
    "cupy"    CUDA tensors   float16, bfloat16,  fusedlinear.backend.cupy_cuda
                             float32, float64
    "torch"   any device     any float dtype     fusedlinear.backend.reference  (plain PyTorch ops)

By default a CPU tensor goes to ``"numba"``, a CUDA tensor to ``"cupy"``, anything else to
``"torch"``. What no kernel covers (bfloat16/float16, another device), and CUDA tensors where
CuPy is not installed or sees no GPU, fall back to ``"torch"`` with a one-time warning; empty tensors (a zero-sized dimension) always take ``"torch"``, which
is exact and free there. ``use_backend(name)`` or the environment variable
``FUSEDLINEAR_BACKEND`` force one backend; a forced backend that cannot run the tensor raises.

Every rule above, and every other reason a call runs through ``"torch"`` (layouts, empty tensors,
sizes over BLAS's 32-bit ints, create_graph backward), is one table in :func:`route`. vmap's
batched tensors never reach a backend: the ops' registered vmap rules compute them with torch
ops. No backend is ever given an address that does not outlive the kernel call: see the lifetime
rule in :mod:`fusedlinear.backend.numba_cpu`.

Every backend implements the same two functions (shapes: X (M, K), W (N, K), b (N,))::

    forward(x, w, b, activation, slope) -> (A (M, N), Z (M, N) or empty)
    backward(dA, saved, x, w, activation, slope, mask) -> (dX (M, K), dW (N, K), db (N,))

where ``saved`` is A, Z or empty as the activation table says, and a gradient whose ``mask``
entry is False comes back empty and is not computed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from types import ModuleType

import torch

from .notices import warn_once
from .cpu_runtime import FORK  # noqa: F401  (importing it installs the at-fork hook; numba_cpu reads FORK here)

BACKENDS: dict[str, tuple[str, tuple[str, ...], tuple[torch.dtype, ...]]] = {
    # name: (module, device types it runs on, dtypes it runs)
    "numba": ("numba_cpu", ("cpu",), (torch.float32, torch.float64)),
    "cupy": ("cupy_cuda", ("cuda",), (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
    "torch": ("reference", (), ()),  # () = every device, every floating dtype
}
DEFAULT_FOR_DEVICE = {"cpu": "numba", "cuda": "cupy"}
ENV_VAR = "FUSEDLINEAR_BACKEND"

_forced: str | None = None  # the innermost open use_backend block's choice (the top of _stack)
_stack: list[tuple[object, str]] = []  # (token, name) of every open use_backend block, in entry order
_lock = threading.Lock()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} ({where}); valid backends are {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` (``"numba"``, ``"cupy"`` or ``"torch"``) for every fused call in the block.

    Process-wide, so that autograd's backward threads (which run CUDA backward, and any
    backward called from another thread) see the same choice as the forward; the forward and
    the backward of one call should run under the same choice::

        with fusedlinear.use_backend("torch"):
            loss = model(x).sum()
            loss.backward()

    Blocks nest, also across threads: every open block is one entry of a process-wide stack and
    the entry made last decides; leaving a block removes exactly its own entry, so blocks that
    overlap across threads and exit in any order (or by an exception) leave the choice of the
    blocks still open, and nothing forced once all have exited. The backends compute the same
    values; the choice only picks which code computes them.
    """
    global _forced
    _check_name(name, "use_backend")
    token = object()
    with _lock:
        _stack.append((token, name))
        _forced = name
    try:
        yield name
    finally:
        with _lock:
            _stack[:] = [entry for entry in _stack if entry[0] is not token]
            _forced = _stack[-1][1] if _stack else None


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``FUSEDLINEAR_BACKEND``, if any."""
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV_VAR)
    return _check_name(env, f"environment variable {ENV_VAR}") if env else None


def runs(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether backend ``name`` runs tensors of ``dtype`` on ``device`` (by the table; not whether it is installed)."""
    _, device_types, dtypes = BACKENDS[name]
    return (not device_types or device.type in device_types) and (not dtypes or dtype in dtypes)


# The route's notices name the op's implementation (fusedlinear.torch_ext.ops: select <- route <- the op)
# as their source, not the dispatcher's frame above it, so that a module filter for fusedlinear matches.
_SELECT_FROM_OP = 3


def select(device: torch.device, dtype: torch.dtype) -> str:
    """The backend name a call on (device, dtype) uses now."""
    forced = forced_backend()
    if forced is not None:
        if not runs(forced, device, dtype):
            _, device_types, dtypes = BACKENDS[forced]
            raise RuntimeError(
                f"backend {forced!r} runs {'/'.join(device_types)} tensors of dtype "
                f"{' or '.join(str(d) for d in dtypes)}, not a {device.type} tensor of {dtype}; "
                f"use use_backend('torch') or move the tensors (e.g. .to('{device_types[0]}', {dtypes[0]}))"
            )
        return forced
    name = DEFAULT_FOR_DEVICE.get(device.type, "torch")
    reason = _unavailable(name)
    if reason:
        warn_once(
            ("unavailable", name),
            f"fusedlinear: backend {name!r} cannot run here ({reason}); using plain PyTorch ops "
            f"(backend 'torch') for {device.type} tensors.",
            stacklevel=_SELECT_FROM_OP,
        )
        return "torch"
    if not runs(name, device, dtype):
        warn_once(
            ("dtype", device.type, dtype),
            f"fusedlinear: no fused kernel for {dtype} on {device.type}; using plain PyTorch ops "
            f"(backend 'torch') for these calls. Use float32 or float64 for the fused kernels.",
            stacklevel=_SELECT_FROM_OP,
        )
        return "torch"
    return name


_modules: dict[str, ModuleType] = {}
_unavailable_cache: dict[str, str | None] = {}


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process (None if it can); asked once per process."""
    if name not in _unavailable_cache:
        try:
            _unavailable_cache[name] = getattr(implementation(name), "unavailable_reason", lambda: None)()
        except ImportError as exc:
            _unavailable_cache[name] = f"{type(exc).__name__}: {exc}"
    return _unavailable_cache[name]


def implementation(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use)."""
    module = _modules.get(name)
    if module is None:
        module = importlib.import_module(f"{__name__}.{BACKENDS[_check_name(name, 'implementation')][0]}")
        _modules[name] = module
    return module


_chosen: dict[tuple, ModuleType] = {}  # (forced, device type, dtype) -> a kernel module select() chose
_environ_get = os.environ.get
_STRIDED = torch.strided


# Layouts the torch backend computes exactly (F.linear and the matrix products of backward take them).
TORCH_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)


def _dense(t) -> bool:
    return t.layout is torch.strided and not t.is_nested


def route(x, w, b=None, *, graph: bool = False, front: bool = False) -> ModuleType | None:
    """The backend module that runs a fused call on input ``x`` (M, K), weight ``w`` (N, K), bias
    ``b`` (N,): the one place the route is decided. The first row that holds wins::

        #  condition                                          runs
        1  graph: a backward with create_graph=True           "torch" (differentiable torch ops)
        2  a tensor not dense-strided (sparse, mkldnn,        "torch" (plain torch ops): with ``front``
           nested)                                            any layout, else sparse COO/CSR only;
                                                              other layouts: TypeError naming the fix
        3  a zero-sized dimension                             "torch" (nothing for a kernel to do)
        4  use_backend(name) / FUSEDLINEAR_BACKEND            that backend (RuntimeError if it cannot)
        5  the device's backend cannot run here (no CuPy)     "torch", warned once
        6  a dtype its kernels lack (e.g. bfloat16 on CPU)    "torch", warned once
        7  a size or stride over the backend's SIZE_MAX       "torch", warned once
           (numba: BLAS's 32-bit ints)
        8  otherwise                                          "numba" (CPU), "cupy" (CUDA)

    Who asks: ``fused_linear``/``fused_chain`` on their slow path (``front=True``: rows 1-2 only,
    "torch" meaning the whole call runs as plain torch ops, None that it goes to the fused op;
    the rest is decided where the tensors are real, not traced), the CPU and CUDA implementations
    of the ``fusedlinear::linear_act*`` ops, and the autograd backward (``graph``). Not routed
    here, because the dispatcher routes them: autocast (cast at the entry, as ``F.linear`` is),
    ``torch.func``/``vmap``/forward-mode AD (rules registered on the op and its Function).
    """
    if graph:
        return implementation("torch")
    # Row 2, inline (a call per tensor costs more than the test): strided and not nested.
    if not (x.layout is _STRIDED and w.layout is _STRIDED and not (x.is_nested or w.is_nested)
            and (b is None or (b.layout is _STRIDED and not b.is_nested))):
        if not front:
            for label, t in (("input", x), ("weight", w)):
                if not (_dense(t) or t.layout in TORCH_LAYOUTS):
                    layout = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
                    raise TypeError(f"fusedlinear: the {label} is a {layout} tensor; fused layers take dense "
                                    f"(strided) tensors and sparse COO/CSR ones: convert it with {label}.to_dense()")
        return implementation("torch")
    if front:
        return None  # the call goes to the fused op, whose CPU/CUDA implementation asks again
    x_size, w_size = x.numel(), w.numel()
    if x_size == 0 or w_size == 0:
        return implementation("torch")
    # FUSEDLINEAR_BACKEND is read on every call (tests and users set it mid-process): once per op call.
    device = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
    module = _chosen.get((_forced or _environ_get(ENV_VAR) or None, device, x.dtype))
    if module is None:  # fallbacks (which warn) and refusals (which raise) are not cached
        forced = forced_backend()
        name = select(x.device, x.dtype)
        module = implementation(name)
        if name != "torch" or forced:
            _chosen[(forced, device, x.dtype)] = module
    limit = vars(module).get("SIZE_MAX")  # read per call (tests lower it); getattr of a missing name raises inside
    # The cheap first test holds whenever the exact second one does (no dimension is 0 here: each is at
    # most its tensor's numel), so most calls stop at it.
    if (limit is not None and (x_size > limit or w_size > limit or max(x.stride()) > limit or max(w.stride()) > limit)
            and max(*x.shape, *w.shape, *x.stride(), *w.stride()) > limit):
        warn_once(("too large", module.__name__),
                   f"fusedlinear: a dimension exceeds {module.__name__.rsplit('.', 1)[-1]}'s limit ({limit}, BLAS's "
                   f"32-bit ints); such calls run through plain PyTorch ops (backend 'torch')", stacklevel=2)
        return implementation("torch")
    return module


def forward(x, w, b, activation: str, slope: float):
    return route(x, w, b).forward(x, w, b, activation, slope)


def backward(grad, saved, x, w, activation: str, slope: float, mask):
    return route(x, w).backward(grad, saved, x, w, activation, slope, mask)


def prepare_cpu_kernels(activations, dtype: str) -> None:
    """Load (or, on first use, compile) the CPU kernels of ``activations`` in ``dtype`` ("float32"
    or "float64") now, every phase, rather than inside the first call that needs them."""
    from ..kernels import cpu  # imports Numba (~0.3 s): paid by who prepares kernels, not by every import

    cpu.load([(phase, activation, dtype) for activation in activations for phase in cpu.PHASES])


def cpu_kernel_cache() -> str | None:
    """The directory of the CPU kernels' on-disk cache (None: caching is off)."""
    from ..kernels import cpu  # imports Numba, as above

    return cpu.cache_dir() if cpu.CACHE else None


def available() -> dict[str, str]:
    """Each backend and whether it can run here (``"ok"`` or the reason it cannot)."""
    return {name: _unavailable(name) or "ok" for name in BACKENDS}


__all__ = ["BACKENDS", "DEFAULT_FOR_DEVICE", "use_backend", "select", "runs", "route", "forward", "backward", "available",
           "prepare_cpu_kernels", "cpu_kernel_cache"]
