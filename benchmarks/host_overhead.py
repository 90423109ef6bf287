"""Host (Python) time per layer of the CUDA path, measured on the CPU with the CuPy launch stubbed
(``--backend cupy``, the default); ``--backend numba`` times the CPU path as it runs.

The CUDA backend's own code runs as on a GPU — ``fused_linear`` → autograd Function →
the ``fusedlinear::linear_act*`` ops → ``backend.route`` → ``backend.cupy_cuda`` (engine
``vendor``: PyTorch's addmm/mm, our element-wise launches) → ``kernels.cuda.run_plan`` — on tiny
CPU tensors (4 x 16 -> 16, so the arithmetic is negligible and what is timed is the Python and
PyTorch-dispatch work), with these stand-ins, and nothing else changed:

* CuPy itself: each kernel is a no-op callable taking (grid, block, args, stream=) like a CuPy
  function; the CuPy stream wrapper is a plain object. CuPy's own launch cost is NOT counted
  (nor is PyTorch's CUDA launch cost in eager: both sides lose their driver launches);
* what a CPU build of PyTorch lacks: ``torch.cuda.current_device``/``device_count`` (one visible
  GPU), ``torch.cuda.current_stream`` (a stand-in object with ``cuda_stream = 0``; the real one
  builds a ``torch.cuda.Stream`` per call, a few µs more on a GPU build) and CuPy's availability
  check;
* routing: the CPU (device, dtype) is mapped to the CUDA module in ``backend.route``'s cache, so
  the real ``route`` runs and finds it.

``--cuda-valid``: for trees up to 5053f95, whose fast validation ``_valid`` took CPU tensors only
(CUDA calls went through ``_prepare``/``_check``): makes ``_valid`` refuse tensors, as it did
CUDA ones there, so those trees are timed as a GPU runs them. Later trees' ``_valid`` takes CUDA
tensors as it takes CPU ones: nothing to emulate.

Eager on the same harness: ``relu(F.linear(x, w, b))`` and its backward on the same tensors.
Prints the median (p20-p80) of per-call µs of the thread's CPU time over ``--rounds`` rounds of
``--inner`` calls each, and the Python and C function calls of one call (load-independent).

    python benchmarks/host_overhead.py [--backend cupy|numba] [--rounds 15] [--inner 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fusedlinear
from fusedlinear import backend
from fusedlinear.backend import cupy_cuda
from fusedlinear.kernels import cuda
from fusedlinear.torch_ext import ops


class _NoKernel:
    """A CuPy function's call signature, doing nothing."""

    def __call__(self, grid, block, args, stream=None, shared_mem=0):
        return None


class _StubStream:
    """What backend.cupy_cuda reads of ``torch.cuda.current_stream(device)``."""

    cuda_stream = 0


def install_stubs(cuda_valid: bool) -> None:
    device = torch.device("cpu")
    stub = _NoKernel()
    for module in cuda.SOURCES:
        cuda._functions[(device.index, module)] = {name: stub for name in cuda.kernel_names(module)}
    cuda._stream = lambda device_id, stream_ptr: object()
    cuda.unavailable_reason = lambda: None
    torch.cuda.current_stream = lambda device=None: _StubStream()
    torch.cuda.current_device = lambda: None  # device.index of a CPU tensor: the "same device" branch
    torch.cuda.device_count = lambda: 1  # the GPU machine's: one visible device
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        backend._chosen[(None, "cpu", dtype)] = cupy_cuda
    if cuda_valid:
        real_valid = ops._valid
        ops._valid = lambda *args, **kwargs: False if args and isinstance(args[0], torch.Tensor) else real_valid(*args, **kwargs)


def measure(fn, inner: int, rounds: int) -> tuple[float, float, float]:
    """Median (p20, p80) µs per call of this thread's CPU time (time.thread_time: on a shared,
    loaded machine, wall time mostly measures the other processes)."""
    for _ in range(200):
        fn()
    per_call = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        per_call.append((time.thread_time() - t0) / inner * 1e6)
    q = statistics.quantiles(per_call, n=5) if rounds > 1 else per_call
    return statistics.median(per_call), q[0], q[-1]


def python_calls(fn) -> tuple[int, int]:
    """(Python function calls, C function calls) one call of ``fn`` makes: a count that no load
    can blur (autograd's backward of CPU tensors runs on the calling thread, so it is counted)."""
    counts = {"call": 0, "c_call": 0}

    def hook(frame, event, arg):
        if event in counts:
            counts[event] += 1

    fn()
    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts["call"] - 1, counts["c_call"]  # less the call of fn itself


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=2000)
    p.add_argument("--cuda-valid", action="store_true", help="emulate trees whose _valid took CPU tensors only")
    p.add_argument("--backend", choices=("cupy", "numba"), default="cupy",
                   help="cupy (default): the CUDA path, launches stubbed; numba: the CPU path as it runs, kernels included")
    args = p.parse_args()
    torch.set_num_threads(1)
    calls = []
    if args.backend == "cupy":
        install_stubs(args.cuda_valid)
        module, attr = cuda, "run_plan"
    else:
        from fusedlinear.backend import numba_cpu as module
        attr = "_launch"
    real_run = getattr(module, attr)

    def counting(plan, *a):
        calls.append(len(plan) if args.backend == "cupy" else 1)
        return real_run(plan, *a)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g)
    w = torch.randn(16, 16, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    grad = torch.randn(4, 16, generator=g)

    def fused_fwd():
        with torch.no_grad():
            fusedlinear.fused_linear(x, w, b, "relu")

    def fused_step():
        fusedlinear.fused_linear(x, w, b, "relu").backward(grad)

    def eager_fwd():
        with torch.no_grad():
            F.relu(F.linear(x, w, b))

    def eager_step():
        F.relu(F.linear(x, w, b)).backward(grad)

    fused_step()  # the CPU path compiles or loads its kernels and times its choices on a first call
    setattr(module, attr, counting)
    fused_step()
    assert calls, f"the {args.backend} path did not launch: the harness would time something else"
    launches = sum(calls)
    setattr(module, attr, real_run)
    print(f"fusedlinear from {fusedlinear.__file__}")
    what = (f"backend cupy, launches stubbed{', _valid refusing tensors (--cuda-valid)' if args.cuda_valid else ''}"
            if args.backend == "cupy" else "backend numba, kernels run")
    print(f"host time per call, µs, median (p20-p80) of {args.rounds} x {args.inner}; 4x16->16 relu, float32; "
          f"{what}; our launches per fwd+bwd: {launches}")
    for name, fn in (("eager forward", eager_fwd), ("fused forward", fused_fwd),
                     ("eager forward+backward", eager_step), ("fused forward+backward", fused_step)):
        med, lo, hi = measure(fn, args.inner, args.rounds)
        py, c = python_calls(fn)
        print(f"  {name:24s} {med:7.2f} ({lo:.2f}-{hi:.2f}) µs CPU   {py:4d} Python calls, {c:4d} C calls")


if __name__ == "__main__":
    main()
