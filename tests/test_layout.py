"""backend/layout.py: how a 2-D tensor reaches a kernel without a copy (padded rows, padded
columns, transposed) or with one (strided, expanded): output and every gradient as float64 PyTorch."""

import pytest
import torch

import fusedlinear
from conftest import LAYOUTS, check_against_reference, make_inputs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed", "row-padded", "col-padded", "strided-cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_non_contiguous_inputs(layout, weight_layout, dtype):
    x, w, b = make_inputs((33,), 20, 11, dtype)
    assert LAYOUTS[layout](x).shape == (33, 20) and LAYOUTS[layout](x).stride() != x.stride()
    check_against_reference(
        lambda x, w, b: fusedlinear.fused_linear(x, w, b, "tanh"), x, w, b, "tanh", layout=LAYOUTS[layout],
        w_layout=LAYOUTS.get(weight_layout, lambda t: t),
    )
