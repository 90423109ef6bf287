"""Shared test helpers: the plain-PyTorch float64 oracle every kernel is compared with."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fusedlinear.backend.activations import REGISTRY
from fusedlinear.kernels import NAMES

ACTIVATIONS = list(NAMES)

# Tolerances, compared as |got - ref| <= atol + rtol * |ref| against a float64 reference:
# - float64: the kernels and the reference differ only in summation order (BLAS blocking vs
#   PyTorch's GEMM); with K <= 784 terms of size O(1) the difference is ~K * 1e-16, far below 1e-9.
# - float32: one rounding per product and a K-term fp32 accumulation: error ~ sqrt(K) * 6e-8 * sum|terms|,
#   about 2e-6 * sum|terms| at K = 784; sum|terms| <= ~30 with these inputs, so 1e-4 abs leaves margin,
#   and libm exp/erf/tanh differ from PyTorch's vectorised versions by a few ulp (1e-6 rel).
TOL = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def reference(x, w, b, activation, negative_slope=0.01):
    """activation(F.linear(x, w, b)) in plain PyTorch ops (the registry's torch function)."""
    return REGISTRY[activation].torch(F.linear(x, w, b), negative_slope)


def make_inputs(lead, k, n, dtype, bias=True, seed=0, device="cpu"):
    """x (*lead, k) ~ N(0, 1); w, b ~ U(-1/sqrt(k), 1/sqrt(k)) like nn.Linear, so Z stays O(1)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / max(k, 1) ** 0.5
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = (torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * bound if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(w), cast(b)


def assert_close(got, ref, dtype, what="", tol=None):
    tol = tol or TOL[dtype]
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), **tol, msg=lambda m: f"{what}: {m}")


def check_against_reference(fn, x, w, b, activation, slope=0.01, grad_seed=1, layout=lambda t: t,
                            w_layout=lambda t: t, tol=None):
    """Run fn(layout(x), w_layout(w), b) and the float64 reference; compare output and every gradient.
    ``layout``/``w_layout`` rebuild x/w with another memory layout (same values) inside the autograd
    graph, so the gradients still reach the plain leaves. ``tol``: instead of TOL[dtype] (give the reason)."""
    dtype = x.dtype
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    refs = [t.detach().double().cpu().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = fn(layout(leaves[0]), w_layout(leaves[1]), leaves[2])
    ref = reference(layout(refs[0]), w_layout(refs[1]), refs[2], activation, slope)
    assert_close(out, ref, dtype, "output", tol)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(grad.to(dtype=dtype, device=out.device))
    ref.backward(grad)
    for name, got, want in zip(("dX", "dW", "db"), leaves, refs):
        if got is not None:
            assert_close(got.grad, want.grad, dtype, name, tol)


def autograd_nodes(out):
    """The class names of every node in ``out``'s autograd graph."""
    nodes, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    return nodes


def has_cuda_and_cupy():
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=ACTIVATIONS)
def activation(request):
    return request.param


@pytest.fixture
def backends_ran(monkeypatch):
    """The backends that ran each fused call, as a list of (backend name, "forward" | "backward"),
    recorded by wrapping every backend module's ``forward``/``backward`` (the dispatch contract
    of fusedlinear.backend): a test asserts which backend ran instead of trusting a setting."""
    from fusedlinear import backend

    calls = []
    for name in backend.BACKENDS:
        try:
            module = backend.implementation(name)
        except ImportError:  # cupy's module may need CuPy; nothing of it can run then
            continue
        for what in ("forward", "backward"):
            original = getattr(module, what)

            def spy(*args, _original=original, _call=(name, what), **kwargs):
                calls.append(_call)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, what, spy)
    return calls


@contextlib.contextmanager
def torch_threads(n):
    """torch.set_num_threads(n) for the block (the fused CPU kernels run on that many threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
