"""The route: one function (fusedlinear.backend.route) decides which implementation runs a call;
eager and compiled code reach the kernels through the same torch.library op; the package touches
no private torch name."""

import inspect
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

import fusedlinear
from fusedlinear import backend
from fusedlinear.backend import numba_cpu, reference
from conftest import make_inputs

X, W, B = make_inputs((4,), 3, 5, torch.float64, seed=1)


def _nested(x):
    return torch.nested.nested_tensor([x, x[:2]], layout=torch.jagged)


# (row of route's table, call, implementation it must pick: a backend name, None = "the op", or an exception)
ROUTES = [
    ("1 create_graph backward", lambda: backend.route(X, W, graph=True), "torch"),
    ("2 sparse COO input", lambda: backend.route(X.to_sparse(), W), "torch"),
    ("2 sparse CSR weight", lambda: backend.route(X, W.to_sparse_csr()), "torch"),
    ("2 sparse bias", lambda: backend.route(X, W, B.to_sparse()), "torch"),
    ("2 mkldnn input", lambda: backend.route(X.float().to_mkldnn(), W.float()), TypeError),
    ("2 mkldnn input at the entry", lambda: backend.route(X.float().to_mkldnn(), W.float(), front=True), "torch"),
    ("2 nested input at the entry", lambda: backend.route(_nested(X), W, front=True), "torch"),
    ("2 dense input at the entry: the op decides", lambda: backend.route(X, W, B, front=True), None),
    ("3 zero rows", lambda: backend.route(X[:0], W), "torch"),
    ("3 zero in_features", lambda: backend.route(X[:, :0], W[:, :0]), "torch"),
    ("4 forced torch", lambda: _forced("torch", X, W), "torch"),
    ("4 forced cupy on a CPU tensor", lambda: _forced("cupy", X, W), RuntimeError),
    ("6 bfloat16 on CPU", lambda: backend.route(X.bfloat16(), W.bfloat16()), "torch"),
    ("7 over numba's SIZE_MAX", lambda: _limit(4, X, W), "torch"),
    ("8 float64 on CPU", lambda: backend.route(X, W, B), "numba"),
    ("8 float32, transposed weight", lambda: backend.route(X.float(), W.float().T.contiguous().T), "numba"),
]


def _forced(name, x, w):
    with fusedlinear.use_backend(name):
        return backend.route(x, w)


def _limit(size, x, w):
    saved = numba_cpu.SIZE_MAX
    numba_cpu.SIZE_MAX = size
    try:
        return backend.route(x, w)
    finally:
        numba_cpu.SIZE_MAX = saved


@pytest.mark.parametrize("call, want", [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
def test_route_table(call, want):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows 5-7 warn once per process
        if isinstance(want, type):
            with pytest.raises(want):
                call()
            return
        got = call()
    assert got is (None if want is None else backend.implementation(want))


def test_route_docstring_lists_every_row():
    """The table a reader finds in a minute: eight numbered rows in route's docstring."""
    doc = inspect.getdoc(backend.route)
    assert [int(n) for n in re.findall(r"^\s*(\d)\s{2}", doc, re.M)] == list(range(1, 9))


def test_nothing_else_routes():
    """The backends and the autograd layer ask route(); the old deciders are gone."""
    from fusedlinear.torch_ext import ops

    for gone in ("_needs_plain_ops", "_direct", "_chain_op", "_base_apply", "_apply"):
        assert not hasattr(ops, gone), gone
    assert not hasattr(backend, "for_call") and not hasattr(numba_cpu, "_too_large")


# ---------------------------------------------------------------- one door, eager and compiled


def _count_kernel_calls(monkeypatch):
    """Counts route() calls from the ops' CPU implementations (the only door to a kernel)."""
    calls = {"_linear_act": 0, "_linear_act_backward": 0}
    route = backend.route

    def counting(*args, **kwargs):
        caller = inspect.currentframe().f_back.f_code.co_name
        if caller in calls:
            calls[caller] += 1
        return route(*args, **kwargs)

    monkeypatch.setattr(backend, "route", counting)
    return calls


def _mnist_like():
    torch.manual_seed(0)
    return fusedlinear.fuse(nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(),
                                          nn.Linear(16, 4)))


@pytest.mark.slow
def test_eager_and_compiled_take_the_same_op(monkeypatch):
    """Three fused layers: a training step calls the op's CPU implementation three times forward
    and three times backward, eager (one FusedChainFunction node) and compiled alike."""
    model = _mnist_like()
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(5, 1, 4, 5), torch.randint(0, 4, (5,))
    nn.functional.cross_entropy(compiled(x), y).backward()  # compile outside the count
    grads = []
    for run in (model, compiled):
        calls = _count_kernel_calls(monkeypatch)
        model.zero_grad()
        nn.functional.cross_entropy(run(x), y).backward()
        assert calls == {"_linear_act": 3, "_linear_act_backward": 3}, (run, calls)
        grads.append([p.grad.clone() for p in model.parameters()])
        monkeypatch.undo()
    for g_compiled, g_eager in zip(*grads[::-1]):
        torch.testing.assert_close(g_compiled, g_eager, atol=1e-6, rtol=1e-5)


def test_eager_calls_go_through_the_dispatcher():
    """Under a TorchDispatchMode (as FlopCounterMode and make_fx see them) eager calls show the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    w = W.clone().requires_grad_()
    with Record():
        fusedlinear.fused_linear(X, w, B, "tanh").sum().backward()
    assert "fusedlinear.linear_act.default" in seen and "fusedlinear.linear_act_backward.default" in seen, seen


# ---------------------------------------------------------------- public API only


PACKAGE = pathlib.Path(fusedlinear.__file__).resolve().parents[2]  # the repository root
PRIVATE = re.compile(r"torch\._C\b|_current_level|_functorch|_len_torch_dispatch_stack|_is_any_autocast_enabled"
                     r"|_are_functorch_transforms_active|_has_storage|_cuda_getCurrentRawStream|\.__func__"
                     r"|torch\._dynamo|torch\._library|_AutoDispatchBelowAutograd")


def test_sources_use_public_torch_api_only():
    """Private torch names break with the next release (torch 2.14 made Function.apply a builtin,
    which has no __func__): none in the package's code (comments aside)."""
    found = []
    for folder in ("torch_ext", "backend", "kernels", "src/fusedlinear"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if PRIVATE.search(code):
                    found.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert found == [], "\n".join(found)


def test_public_functions_keep_their_api():
    """FusedLinearFunction.apply -> (A, Z-or-empty); FusedChainFunction.apply -> h_L alone (its node
    returns the intermediates too, for setup_context), one FusedChainFunctionBackward node, eager
    and under torch.func.grad alike."""
    from fusedlinear import FusedLinearFunction
    from fusedlinear.torch_ext import FusedChainFunction

    w2 = torch.randn(2, 5, dtype=torch.float64)
    a, z = FusedLinearFunction.apply(X, W, B, "gelu", 0.01)
    torch.testing.assert_close(a, torch.nn.functional.gelu(X @ W.T + B))
    torch.testing.assert_close(z, X @ W.T + B)  # gelu keeps Z
    spec = (("gelu", 0.01, True), ("tanh", 0.01, False))
    w = W.clone().requires_grad_()
    out = FusedChainFunction.apply(X, spec, w, B, w2)
    want = fusedlinear.fused_chain(X, [(W, B, "gelu", 0.01), (w2, None, "tanh", 0.01)])
    assert isinstance(out, torch.Tensor) and type(out.grad_fn).__name__ == "FusedChainFunctionBackward"
    torch.testing.assert_close(out, want)
    grad = torch.func.grad(lambda w: FusedChainFunction.apply(X, spec, w, B, w2).sum())(W)
    want_grad = torch.func.grad(lambda w: torch.tanh(torch.nn.functional.gelu(X @ w.T + B) @ w2.T).sum())(W)
    torch.testing.assert_close(grad, want_grad)
