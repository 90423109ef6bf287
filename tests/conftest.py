"""Shared test helpers, the one module for them: the plain-PyTorch float64 oracle every kernel is
compared with, memory layouts, fresh-process runners, the fuse checks and the models several
test files fuse, the MNIST IDX writer. (The CUDA emulator, the 16-bit error model and the
spawned DDP worker live in emulator.py, lowp_model.py and distributed_helpers.py.)"""

import contextlib
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from fusedlinear import FusedActivation, FusedLinear, mnist

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


def seeded(*shape, dtype=torch.float32, seed=0, fill=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if fill is not None:
        x.view(-1)[::3] = fill
    return x


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def row_padded(t):
    """The same values, rows padded: leading dimension cols + 3 > cols; read in place."""
    return torch.cat([t, t[:, :3]], dim=1)[:, : t.shape[1]]


LAYOUTS = {
    # name: a 2-D tensor rebuilt with the same values in that memory layout
    "transposed": lambda t: t.t().contiguous().t(),  # column-major: read in place, BLAS transposes
    "row-padded": row_padded,  # row-major, ld = cols + 3 > cols: read in place
    "col-padded": lambda t: row_padded(t.t()).t(),  # column-major, ld = rows + 3 > rows: read in place
    "strided-cols": lambda t: torch.stack([t, t], dim=2).reshape(t.shape[0], 2 * t.shape[1])[:, ::2],  # copied
    "expanded": lambda t: t[:1].expand(t.shape),  # stride-0 rows: copied
}


F64 = torch.float64


def assert_same(model, fused, *inputs, seed=0):
    """Output and every gradient (inputs and parameters, by name) of ``fused`` equal ``model``'s.
    Both run from the same RNG state, so dropout draws the same masks."""
    results = []
    for m in (model, fused):
        m.zero_grad(set_to_none=True)
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        torch.manual_seed(seed)
        out = m(*leaves)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        out.backward(grad)
        results.append((out, [t.grad for t in leaves], {n: p.grad for n, p in m.named_parameters()}))
    (out, dx, dp), (fout, fdx, fdp) = results
    torch.testing.assert_close(fout, out, **TOL[F64])
    for got, want in zip(fdx, dx):
        if want is not None:
            torch.testing.assert_close(got, want, **TOL[F64])
    assert fdp.keys() == dp.keys()
    for name in dp:
        assert (dp[name] is None) == (fdp[name] is None), name
        if dp[name] is not None:
            torch.testing.assert_close(fdp[name], dp[name], **TOL[F64], msg=lambda m: f"grad of {name}: {m}")


def check_fuse(model, *inputs, pairs, rewritten=None):
    """fuse a copy; check values, gradients, keys, strict loading and the report; unfuse it back."""
    model = model.double()
    fused, report = fusedlinear.fuse(model, report=True)
    assert len(report.fused) == pairs, str(report)
    assert sum(isinstance(m, FusedLinear) for m in fused.modules()) == pairs, str(report)
    if rewritten is not None:
        assert report.rewritten == rewritten, str(report)
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(model.state_dict(), strict=True)
    copy.deepcopy(model).load_state_dict(fused.state_dict(), strict=True)
    assert_same(model, fused, *inputs)
    plain = fusedlinear.unfuse(fused)
    assert not any(isinstance(m, (FusedLinear, FusedActivation)) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert list(plain.state_dict()) == list(model.state_dict())
    assert_same(model, plain, *inputs)
    return fused, report


class BertIntermediate(nn.Module):
    def __init__(self, hidden=12, intermediate=24):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, hidden_states):
        return F.gelu(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, hidden=12, intermediate=24):
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.intermediate = BertIntermediate()
        self.output = BertOutput()

    def forward(self, x):
        return self.output(self.intermediate(x), x)


class Tap(nn.Sequential):
    """A Sequential subclass whose forward uses the first layer's output twice: not fusable."""

    def forward(self, x):
        h = self[0](x)
        return self[2](self[1](h)) + h.sum(-1, keepdim=True)


class Formula(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def write_idx_set(directory, n_train=20, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    sfx = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        mnist.write_idx(os.path.join(directory, name + sfx), arr)
    return arrays


def fusedlinear_cli(*args, cwd=None, env=None, timeout=600):
    """``python -m fusedlinear *args`` in a fresh process (``env``: variables added to this one's)."""
    return subprocess.run([sys.executable, "-m", "fusedlinear", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=None if env is None else {**os.environ, **env})


def mnist_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
