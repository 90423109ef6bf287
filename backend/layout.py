"""How a tensor reaches a kernel: its dtype's name in the kernels' tables (:data:`DTYPE_NAMES`), and a
2-D tensor without a copy: (tensor, leading dimension, stored transposed?)."""

from __future__ import annotations

import torch

# torch dtype -> the name the kernels' tables (kernels/cpu.py, kernels/cuda.py) use for it
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


def matrix_operand(t: torch.Tensor, transposed_ok: bool = True):
    """(tensor kept alive, leading dimension, stored transposed?) for a 2-D tensor.

    Row-major with padded rows is read in place; so is its transpose (a column-major tensor)
    when the kernel can take it (``transposed_ok``); any other strides (expanded stride-0 rows,
    strided columns) are copied with ``.contiguous()``.
    """
    rows, cols = t.shape
    s0, s1 = t.stride()
    if (s1 == 1 or cols == 1) and (rows == 1 or s0 >= cols):
        return t, max(s0 if rows > 1 else cols, cols, 1), False
    if transposed_ok and (s0 == 1 or rows == 1) and (cols == 1 or s1 >= rows):
        return t, max(s1 if cols > 1 else rows, rows, 1), True
    t = t.contiguous()
    return t, cols, False
