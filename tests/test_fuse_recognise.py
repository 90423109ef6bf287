"""torch_ext/fuse/recognise.py: an activation module recognised by what it computes (formulas
written out), refused where it is not exactly a table entry (cut constants, rank- or
numel-dependent modules)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import Formula
from fusedlinear.torch_ext.fuse.recognise import Refused, recognise


@pytest.mark.parametrize("fn,want", [
    (lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), "gelu_tanh"),
    (lambda x: x * torch.sigmoid(x), "silu"),
    (lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), "gelu"),
    (lambda x: x * torch.tanh(nn.functional.softplus(x)), "mish"),
    (lambda x: x * nn.functional.relu6(x + 3) / 6, "hardswish"),
    (lambda x: torch.where(x > 0, x, 0.2 * x), "leaky_relu"),
    # gelu_tanh's formula with gelu_fast's 10-digit constant is gelu_fast, factored or not
    (lambda x: 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3))), "gelu_fast"),
])
def test_recogniser_accepts_formulas_written_out(fn, want):
    assert recognise(Formula(fn))[0] == want


@pytest.mark.parametrize("fn,why", [
    # sqrt(2/pi) cut to 8 digits: neither gelu_tanh's constant nor gelu_fast's 10 digits
    (lambda x: 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x**3))), "nearest: gelu"),
    (lambda x: x * torch.sigmoid(1.7 * x), "nearest"),  # not quick_gelu's 1.702
    (lambda x: torch.softmax(x, -1), "element-wise"),
    (lambda x: nn.functional.dropout(x, 0.5, True), "again|random"),
    (lambda x: x.float().sigmoid().to(x.dtype), "nearest: sigmoid|element-wise"),  # float32 values; rounding varies with size
    (lambda x: x / x.shape[-1], "element-wise"),
    # relu's values, but clamp's gradient at the bound is 1 where relu's is 0
    (lambda x: torch.clamp(x, min=0.0), "nearest"),
])
def test_recogniser_refuses_what_is_not_exact(fn, why):
    with pytest.raises(Refused, match=why):
        recognise(Formula(fn))


class _DimDependent(nn.Module):
    def forward(self, x):
        return F.gelu(x) if x.dim() < 3 else F.relu(x)


def _assert_fuse_keeps_values(activation):
    """Linear, ``activation``, Linear on a 3-D input: fuse's model computes what the original does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), activation, nn.Linear(16, 4)).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    fused = fusedlinear.fuse(model)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


def test_recogniser_does_not_accept_a_rank_dependent_module():
    _assert_fuse_keeps_values(_DimDependent())


class _NumelDependent(nn.Module):
    def forward(self, x):
        return F.relu(x) if x.numel() > 1000 else torch.tanh(x)


def test_recogniser_does_not_accept_a_numel_dependent_module():
    _assert_fuse_keeps_values(_NumelDependent())
