"""Recognise an activation module by what it computes, not by its class.

Model libraries build activations their own way: Hugging Face's ``ACT2FN`` gives
``GELUActivation``, ``NewGELUActivation``, ``SiLUActivation``, ... (wrappers of ``F.gelu`` or
formulas written out), timm has its own registry, users write ``x * torch.sigmoid(x)``. A
module is taken for a table entry when it has no parameters or buffers and, called on float64
(and float32) tensors, gives the entry's values and gradients everywhere this probe looks:

* the grid: 4001 points on [-12, 12], the ties and limits of the table (0, ±3, 6, 20 and their
  neighbours), magnitudes 1e-300 ... 1e300 of both signs, the subnormal 5e-324, ±max float,
  ±inf and NaN;
* values within ``64·u·(|g| + |z|)`` and gradients (``ones`` as dA) within
  ``64·u·(|g'| + 1 + |z|)``, u = 2⁻⁵³ (2⁻²⁴ for the float32 values, at the finite points float32 holds: inf and NaN are judged in float64, since ``F.gelu`` itself
  gives NaN at float32 inf where its float64 and the erf formula give inf). Why: every entry is
  ``z·h(z)`` or a bounded ``h(z)`` computed from terms no larger than ``max(1, |z|)`` times a
  factor that is itself O(1) (for g') or O(|z|²) where it is multiplied by ``1 - tanh²`` that
  vanishes below 2⁻⁵³ first; one rounding in a term moves the result by ``u`` times that term, so
  two correct ways of writing one function differ by a few such roundings. 64 leaves room for
  a dozen of them and still tells ``gelu_fast`` (``sqrt(2/pi)`` cut to 0.7978845608) from
  ``gelu_tanh``: they differ by ~1e-12 near z = 1, 1000 times the bound;
* NaN exactly where the entry gives NaN, infinities equal;
* element by element: the same values for the grid reshaped to (n/4, 4) and transposed, to 3-D
  and 4-D shapes, one point at a time, and repeated 64 times (276,224 points, 4-D) (a softmax or a
  norm computes something else from the same points; a module may branch on ``x.dim()`` or
  ``x.numel()``);
* in train and in eval mode, without setting attributes or drawing random numbers.

A wrong guess would change a model silently; a refusal only leaves a pair unfused. So anything
short of that is refused, and :func:`recognise` says why.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from .trace import _changed, _state  # the attribute check fuse's tracing uses
from ...backend import activations as _registry

_U64, _U32 = 2.0**-53, 2.0**-24
_FACTOR = 64


def _grid() -> torch.Tensor:
    dense = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64)
    ties = torch.tensor([0.0, -0.0, 3.0, -3.0, 6.0, 20.0, 1.0, -1.0], dtype=torch.float64)
    near = torch.cat([ties + d for d in (1e-9, -1e-9, 1e-6, -1e-6, 0.5, -0.5)])
    mags = torch.logspace(-300, 300, 121, dtype=torch.float64)
    special = torch.tensor([5e-324, -5e-324, 2.2250738585072014e-308, 1e-8, -1e-8, 25.0, -25.0, 40.0, -40.0, 100.0,
                            -100.0, 1e4, -1e4, 1.7976931348623157e308, -1.7976931348623157e308,
                            math.inf, -math.inf, math.nan], dtype=torch.float64)
    points = torch.cat([dense, ties, near, mags, -mags, special])
    return points[: points.numel() // 4 * 4]  # a multiple of 4, for the element-by-element check


_GRID = _grid()
# What else the probe calls the module on, the same points each time: 3-D and 4-D tensors (a module
# may branch on x.dim()), one point at a time and the grid 64 times over (or on numel).
_SHAPES = [(4, -1, 83), (2, 2, 83, -1), (1, -1, 1, 4)]
_LARGE = 64


class Refused(Exception):
    """The module is not taken for an activation of the table; the message says why."""


def _call(module, z):
    out = module(z)
    if not isinstance(out, torch.Tensor):
        raise Refused(f"returns {type(out).__name__}, not a tensor")
    if out.shape != z.shape or out.dtype != z.dtype:
        raise Refused(f"maps a {z.dtype} tensor of shape {tuple(z.shape)} to {out.dtype} {tuple(out.shape)}: "
                      "not an element-wise activation")
    return out


def _values_and_grads(fn, z):
    """fn(z) and d(sum fn(z))/dz, both detached."""
    z = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(z)
        if not out.requires_grad:
            return out.detach(), torch.zeros_like(z)
        (grad,) = torch.autograd.grad(out, z, torch.ones_like(out), allow_unused=True)
    return out.detach(), torch.zeros_like(z) if grad is None else grad


def _worst(got, want, bound, z):
    """The largest excess of |got - want| over ``bound`` (finite points) and the point, or a mismatch
    in NaN or infinity; None when everything agrees."""
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    if not torch.equal(nan_got, nan_want):
        i = int(torch.nonzero(nan_got != nan_want)[0])
        return f"gives {want[i].item():g} at z = {z[i].item():g}, the module {got[i].item():g}"
    inf = torch.isinf(want) | torch.isinf(got)
    if not torch.equal(got[inf], want[inf]):
        i = int(torch.nonzero(inf & (got != want))[0])
        return f"gives {want[i].item():g} at z = {z[i].item():g}, the module {got[i].item():g}"
    finite = ~(nan_want | inf)
    diff = torch.where(finite, (got - want).abs(), 0.0)
    excess = torch.where(finite, diff - bound, -1.0)
    excess = torch.where(torch.isnan(excess), 0.0, excess)  # a bound of inf * 0: no constraint
    if excess.max() <= 0:
        return None
    i = int(excess.argmax())
    return (f"differs by {diff[i].item():.3g} at z = {z[i].item():g} (bound {bound[i].item():.3g}: "
            f"{_FACTOR} roundings of its terms)")


def _compare(module, name, s, probe64, probe32):
    """None if ``module`` computes table entry ``name`` (slope ``s``), else why not."""
    entry = _registry.REGISTRY[name]
    z = _GRID
    want, want_grad = _values_and_grads(lambda t: entry.torch(t, s), z)
    got, got_grad = probe64
    with torch.no_grad():
        az = z.abs()
        bad = _worst(got, want, _FACTOR * _U64 * (want.abs() + az), z)
        if bad is None:
            bad = _worst(got_grad, want_grad, _FACTOR * _U64 * (want_grad.abs() + 1.0 + az), z)
            bad = bad and f"(gradient) {bad}"
        if bad is None:
            z32 = z.float()
            finite = torch.isfinite(z32)  # inf and NaN conventions are float64's to judge
            want32 = entry.torch(z32, s).double()[finite]
            bad = _worst(probe32.double()[finite], want32, _FACTOR * _U32 * (want32.abs() + z32.abs().double()[finite]),
                         z[finite])
            bad = bad and f"(float32) {bad}"
    return bad


def _leaky_slope(got):
    """The slope a leaky ReLU with these values would have, from g(-1) (grid point)."""
    at = torch.nonzero(_GRID == -1.0)[0]
    return float(-got[at])


def _probe(module: nn.Module):
    """(float64 values, float64 gradients, float32 values) of ``module`` on the grid, checking it is
    stateless, deterministic and element-wise in both modes; raises :class:`Refused`."""

    was = [(m, m.training) for m in module.modules()]
    rng, torch_rng = random.getstate(), torch.random.get_rng_state()
    set_attrs = []
    try:
        results = []
        for training in (True, False):
            for m, _ in was:
                object.__setattr__(m, "training", training)
            before = _state(module)
            try:
                got, grad = _values_and_grads(lambda t: _call(module, t), _GRID)
                with torch.no_grad():
                    again = _call(module, _GRID.clone())
                    square = _call(module, _GRID.clone().reshape(-1, 4).t().contiguous()).t().reshape(-1)
                    shaped = [_call(module, _GRID.clone().reshape(shape)).reshape(-1) for shape in _SHAPES]
                    single = torch.cat([_call(module, z) for z in _GRID.clone().split(1)])
                    large = _call(module, _GRID.repeat(_LARGE).reshape(_LARGE, 2, 2, -1))
                    large = large.reshape(_LARGE, -1)
                    got32 = _call(module, _GRID.float())
            finally:
                set_attrs += _changed(before)
            if set_attrs:
                raise Refused(f"sets {', '.join(set_attrs)} when called")
            same = lambda a, b: torch.equal(torch.isnan(a), torch.isnan(b)) and bool(  # noqa: E731
                ((a - b).abs() <= _FACTOR * _U64 * (a.abs() + _GRID.abs())).logical_or(a == b)
                .logical_or(torch.isnan(a)).all())
            if not same(got, again):
                raise Refused("gives other values when called again on the same tensor")
            if not (same(got, square) and all(same(got, t) for t in shaped + [single])
                    and all(same(got, row) for row in large)):
                raise Refused("is not element-wise: a point's value depends on the tensor's shape, size or its "
                              "other elements")
            results.append((got, grad, got32))
        if not all(bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all()) for a, b in zip(results[0], results[1])):
            raise Refused("computes something else in train and in eval mode")
    except Refused:
        raise
    except Exception as error:  # noqa: BLE001 - the probe runs user code; any failure is a refusal
        raise Refused(f"raised {type(error).__name__} when called on a float64 tensor: "
                      f"{str(error).strip().splitlines()[0][:120] if str(error).strip() else ''}") from None
    finally:
        drew = random.getstate() != rng or not torch.equal(torch.random.get_rng_state(), torch_rng)
        random.setstate(rng)
        torch.random.set_rng_state(torch_rng)
        for m, training in was:
            object.__setattr__(m, "training", training)
    if drew:
        raise Refused("draws random numbers when called")
    return results[0]


def recognise(module: nn.Module):
    """``(name, s)``: the table entry (and leaky-ReLU slope) ``module`` computes; raises
    :class:`Refused` with the reason where it is not taken for one. ``torch.nn``'s own activation
    modules are matched by class and settings, anything else by the probe above."""
    exact = _registry.match_module(module)
    if exact is not None:
        return exact
    cls = type(module)
    if cls.__module__.startswith("torch.nn."):
        raise Refused(f"{cls.__name__} with these settings ({module.extra_repr() or 'defaults'}) is not an "
                      f"activation of the table")
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        raise Refused("has parameters or buffers (a learned or stored activation is not in the table)")
    if any((m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
           for m in module.modules()):
        raise Refused("has hooks registered on it")
    got, grad, got32 = _probe(module)
    tried = []
    for name in _registry.REGISTRY:
        s = _leaky_slope(got) if name == "leaky_relu" else 0.0
        why = _compare(module, name, s, (got, grad), got32)
        if why is None:
            return name, s
        with torch.no_grad():  # how far off on [-12, 12]: the nearest entry is the one the report names
            off = (got[:4001] - _registry.REGISTRY[name].torch(_GRID[:4001], s)).abs().nan_to_num(math.inf).mean()
        tried.append((float(off), name, why))
    off, name, why = min(tried)
    raise Refused(f"computes no activation of the table within rounding (nearest: {name}, which {why})")
