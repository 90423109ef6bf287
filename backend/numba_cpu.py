"""Backend "numba": CPU tensors, float32/float64, through the Numba kernels in fusedlinear.kernels.cpu.

Tensors reach the kernels without copies where their layout allows: X and W go to BLAS as
(address, leading dimension, transposed?) whenever either their rows or their columns are
contiguous (a transposed tensor is read in place); only other strides (e.g. expanded, stride-0
rows) are copied. Outputs are allocated by PyTorch and written in place through numpy views.

Threads: the kernels use min(torch.get_num_threads(), Numba's thread count), so
``torch.set_num_threads(1)`` (as DataLoader workers do) applies to the fused path too.
"""

from __future__ import annotations

import threading

import numba
import torch

from ..kernels import activations as _acts
from ..kernels import cpu as _cpu
from ..kernels import tiling

_serial = threading.Lock()  # used only when Numba runs on its workqueue layer (not thread-safe)


def _blas_operand(t: torch.Tensor):
    """(tensor kept alive, leading dimension, stored transposed?) for a 2-D tensor."""
    rows, cols = t.shape
    s0, s1 = t.stride()
    if (s1 == 1 or cols == 1) and (rows == 1 or s0 >= cols):
        return t, max(s0 if rows > 1 else cols, cols, 1), False
    if (s0 == 1 or rows == 1) and (cols == 1 or s1 >= rows):
        return t, max(s1 if cols > 1 else rows, rows, 1), True
    t = t.contiguous()
    return t, cols, False


def _threads() -> int:
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def _array(t: torch.Tensor):
    return t.detach().numpy()


def _empty2d(like: torch.Tensor):
    return _array(like.new_empty((0, 0)))


def _run(kernel, *args) -> None:
    _cpu.ensure_runtime()
    if numba.threading_layer() == "workqueue":
        with _serial:
            status = kernel(*args)
    else:
        status = kernel(*args)
    if status != 0:
        raise RuntimeError(f"fusedlinear: a BLAS call in {kernel.__name__} failed (status {status})")


def _check_dims(*dims: int) -> None:
    if max(dims) >= 2**31:
        raise RuntimeError(
            f"fusedlinear: dimension {max(dims)} exceeds BLAS's 32-bit limit; use use_backend('torch')"
        )


def forward(x, w, b, activation, slope):
    (m, k), n = x.shape, w.shape[0]
    _check_dims(m, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1))
    act = _acts.ACTIVATIONS[activation]
    a = x.new_empty((m, n))
    z = x.new_empty((m, n)) if act.saves == "z" else x.new_empty(0)
    bias = b.detach().contiguous() if b is not None else x.new_zeros(n)
    xk, ldx, tx = _blas_operand(x.detach())
    wk, ldw, tw = _blas_operand(w.detach())
    tm, tn = tiling.cpu_tiles(m, n, _threads())
    _run(
        _cpu.linear_act_forward,
        xk.data_ptr(), ldx, tx, wk.data_ptr(), ldw, tw, k,
        _array(bias), _array(a), _array(z) if act.saves == "z" else _empty2d(x),
        _acts.ACTIVATION_IDS[activation], float(slope), tm, tn,
    )
    return a, z


def backward(grad, saved, x, w, activation, slope, mask):
    (m, k), n = x.shape, w.shape[0]
    grad = grad.detach().contiguous()
    saved = saved.detach().contiguous() if saved.numel() else saved.detach().new_empty((0, 0))
    xk, ldx, tx = _blas_operand(x.detach())
    wk, ldw, tw = _blas_operand(w.detach())
    dx = x.new_empty((m, k)) if mask[0] else x.new_empty(0)
    dw = x.new_empty((n, k)) if mask[1] else x.new_empty(0)
    db = x.new_empty(n) if mask[2] else x.new_empty(0)
    threads = _threads()
    tm, tk = tiling.cpu_tiles(m, k, threads)
    _run(
        _cpu.linear_act_backward,
        _array(grad), _array(saved), xk.data_ptr(), ldx, tx, wk.data_ptr(), ldw, tw, k,
        _acts.ACTIVATION_IDS[activation], float(slope),
        _array(dx) if mask[0] else _empty2d(x),
        _array(dw) if mask[1] else _empty2d(x),
        _array(db) if mask[2] else _array(x.new_empty(0)),
        tiling.cpu_column_block(n, threads), tm, tk,
    )
    return dx, dw, db


def unavailable_reason() -> str | None:
    return None
