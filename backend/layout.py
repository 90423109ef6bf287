"""How a 2-D tensor reaches a kernel without a copy: (tensor, leading dimension, stored transposed?)."""

from __future__ import annotations

import torch


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
