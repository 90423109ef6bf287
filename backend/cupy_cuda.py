"""Backend "cupy": CUDA tensors, float32/float64, through the raw-CUDA kernels of fusedlinear.kernels.cuda.

* Launches go to PyTorch's *current* CUDA stream of the tensor's device, so they order with the
  surrounding torch ops, work on non-default streams and are captured by CUDA graphs.
* Every output and workspace (dZ, db's partial sums) is allocated by PyTorch on the tensor's
  device (its caching allocator, its graph pools) and handed to the kernels by pointer; CuPy's
  memory pool is never used.
* Operands must be row-major with a leading dimension (rows may be padded); other layouts
  (transposed, expanded) are copied with ``.contiguous()`` first.
* The compiled module is cached per device in memory and by CuPy on disk (CUPY_CACHE_DIR).
* No atomics anywhere: results are deterministic, including under
  ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import torch

from ..kernels import activations as _acts
from ..kernels import cuda as _cuda
from .layout import matrix_operand

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _run(plan, dtype, device, pointers):
    reason = _cuda.unavailable_reason()
    if reason:
        raise RuntimeError(f"fusedlinear backend 'cupy': {reason}; or use use_backend('torch')")
    index = device.index if device.index is not None else torch.cuda.current_device()
    _cuda.run_plan(plan, _DTYPES[dtype], pointers, index, torch.cuda.current_stream(device).cuda_stream)


def forward(x, w, b, activation, slope):
    (m, k), n = x.shape, w.shape[0]
    act = _acts.ACTIVATIONS[activation]
    xk, ldx, _ = matrix_operand(x.detach(), transposed_ok=False)
    wk, ldw, _ = matrix_operand(w.detach(), transposed_ok=False)
    a = x.new_empty((m, n))
    z = x.new_empty((m, n)) if act.saves == "z" else x.new_empty(0)
    bias = b.detach().contiguous() if b is not None else None
    pointers = {"a": a.data_ptr(), "z": z.data_ptr(), "x": xk.data_ptr(), "w": wk.data_ptr()}
    if bias is not None:
        pointers["b"] = bias.data_ptr()
    _run(_cuda.forward_plan(_DTYPES[x.dtype], m, n, k, ldx, ldw, bias is not None, activation, slope),
         x.dtype, x.device, pointers)
    return a, z


def backward(grad, saved, x, w, activation, slope, mask):
    (m, k), n = x.shape, w.shape[0]
    xk, ldx, _ = matrix_operand(x.detach(), transposed_ok=False)
    wk, ldw, _ = matrix_operand(w.detach(), transposed_ok=False)
    grad = grad.detach().contiguous()
    saved = saved.detach().contiguous()
    dz = x.new_empty((m, n))
    partial = x.new_empty((_cuda.column_chunks(m), n)) if mask[2] else x.new_empty(0)
    dx = x.new_empty((m, k)) if mask[0] else x.new_empty(0)
    dw = x.new_empty((n, k)) if mask[1] else x.new_empty(0)
    db = x.new_empty(n) if mask[2] else x.new_empty(0)
    pointers = {"dz": dz.data_ptr(), "da": grad.data_ptr(), "saved": saved.data_ptr(), "x": xk.data_ptr(),
                "w": wk.data_ptr(), "partial": partial.data_ptr(), "dx": dx.data_ptr(), "dw": dw.data_ptr(),
                "db": db.data_ptr()}
    _run(_cuda.backward_plan(_DTYPES[x.dtype], m, n, k, ldx, ldw, activation, slope, mask),
         x.dtype, x.device, pointers)
    return dx, dw, db


def unavailable_reason() -> str | None:
    return _cuda.unavailable_reason()
