"""Each activation of the table at its ties and limits, on every CPU backend: values and dZ equal
autograd's through the registry's torch function (the derivative conventions at the kinks of
relu, relu6, hardswish, hardsigmoid, the softplus threshold, overflow in mish/softplus/silu).

Z is made exact: W is the identity and b = 0, so Z = X bit for bit and the points below reach
g and g' unrounded. Within 64·u·(|ref| + 1 + |z|): libm's exp/log1p/tanh vs PyTorch's vectorised
ones, and g' read from A where A → 1 (sigmoid's (1 - a)·a cancels: 2.4e-5 relative at z = 6 in
float32); a convention mistake at a tie is off by O(1). Inf and NaN where autograd has them."""

import math

import pytest
import torch

import fusedlinear
from fusedlinear.backend.activations import REGISTRY
from conftest import ACTIVATIONS

POINTS = [0.0, -0.0, 1e-300, -1e-300, 5e-324, 1.0, -1.0, 3.0, -3.0, 3.0 + 2**-51, -3.0 - 2**-51, 6.0, 6.0 - 2**-50,
          6.0 + 2**-50, 20.0, 20.0 + 2**-48, 20.0 - 2**-48, 30.0, -30.0, 88.8, -88.8, 710.0, -710.0, 1e4, -1e4,
          1e150, -1e150]


def _exact(values, dtype):
    x = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(-1, 1)
    return x, torch.ones(1, 1, dtype=dtype), torch.zeros(1, dtype=dtype)


def _close(got, want, z, dtype):
    u = torch.finfo(dtype).eps
    bound = 64 * u * (want.abs() + 1 + z.abs())
    same_special = torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(
        got[torch.isinf(want)], want[torch.isinf(want)])
    finite = torch.isfinite(want)
    return same_special and bool(((got - want).abs()[finite] <= bound[finite]).all())


def _fused_and_autograd(x, w, b, activation, backend):
    """(what, fused, autograd's) for the value and dZ of ``activation`` at the rows of ``x`` (W = I, b = 0)."""
    x = x.detach().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    with fusedlinear.use_backend(backend):
        out = fusedlinear.fused_linear(x, w, b, activation, 0.1)
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    ref = REGISTRY[activation].torch(ref_x, 0.1)
    (ref_dx,) = torch.autograd.grad(ref, ref_x, torch.ones_like(ref))
    return ("value", out.detach(), ref.detach()), ("dZ", dx, ref_dx)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ties_and_limits_match_autograd(activation, dtype, backend):
    points = [p for p in POINTS if dtype == torch.float64 or abs(p) < 3e38]
    x, w, b = _exact(points, dtype)
    z = x.detach()
    for what, got, want in _fused_and_autograd(x, w, b, activation, backend):
        ok = _close(got, want, z, dtype)
        bad = [(p, g, r) for p, g, r in zip(z.flatten().tolist(), got.flatten().tolist(), want.flatten().tolist())
               if not (g == r or (math.isnan(g) and math.isnan(r)) or abs(g - r) <= 64 * torch.finfo(dtype).eps * (abs(r) + 1 + abs(p)))]
        assert ok, f"{activation} {what} on {backend}: (z, got, autograd) {bad[:5]}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_infinite_incoming_gradient_where_g_prime_is_zero(activation):
    """dA = inf where g' = 0 gives 0 like autograd's selects (not inf * 0 = NaN), for the entries whose
    backward selects; the product forms give what autograd's products give."""
    x, w, b = _exact([-5.0, -4.0, 7.0, 8.0], torch.float64)
    x.requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    grad = torch.full((4, 1), math.inf, dtype=torch.float64)
    with fusedlinear.use_backend("numba"):
        out = fusedlinear.fused_linear(x, w, b, activation, 0.1)
        (dx,) = torch.autograd.grad(out, x, grad)
    ref = REGISTRY[activation].torch(ref_x, 0.1)
    (ref_dx,) = torch.autograd.grad(ref, ref_x, grad)
    if activation in ("relu", "relu6", "relu2", "hardswish", "hardsigmoid"):
        assert torch.equal(dx, ref_dx), (dx.flatten().tolist(), ref_dx.flatten().tolist())


# Numba's float32 kernels evaluate the table's float literals as float64 (kernels/cpu.py writes them
# as Python floats), so z³ or 6z does not overflow where PyTorch's float32 does: the limit (g' = 1 or
# 0, A = z) instead of PyTorch's NaN/inf. Fixed by typing the literals as the kernel's dtype there.
_NUMBA_F32_WIDENS = {"gelu", "gelu_tanh", "gelu_fast", "hardswish"}


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float_max_and_non_finite_match_autograd(activation, dtype, backend, request):
    """At ±max (where 1.702·z, z³ overflow: quick_gelu's g' was inf·0 = NaN), ±inf and NaN."""
    if backend == "numba" and dtype == torch.float32 and activation in _NUMBA_F32_WIDENS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="Numba float32 kernels compute in float64"))
    big = torch.finfo(dtype).max
    x = torch.tensor([big, -big, big / 2, -big / 2, math.inf, -math.inf, math.nan], dtype=dtype).reshape(-1, 1)
    w, b = torch.ones(1, 1, dtype=dtype), torch.zeros(1, dtype=dtype)
    for what, got, want in _fused_and_autograd(x, w, b, activation, backend):
        z = torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0)  # a bound in |z| only where z is finite
        assert _close(got, want, z, dtype), f"{activation} {what} on {backend}: {got.flatten().tolist()} " \
                                                     f"vs autograd {want.flatten().tolist()}"
