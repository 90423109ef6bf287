"""torch_ext/ops.py's torch.library ops: opcheck, torch.compile(fullgraph=True) against eager, and
eager and compiled calls taking the same op through the dispatcher, and the public Functions'
return values."""

import inspect

import pytest
import torch
from torch import nn

import fusedlinear
from conftest import ACTIVATIONS, make_inputs
from fusedlinear import backend


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_forward_and_backward(activation):
    x, w, b = make_inputs((6,), 5, 4, torch.float64)
    torch.library.opcheck(torch.ops.fusedlinear.linear_act.default, (x, w, b, activation, 0.1))
    a, z = torch.ops.fusedlinear.linear_act(x, w, b, activation, 0.1)
    saved = {"a": a, "z": z, "none": z}[fusedlinear.kernels.ACTIVATIONS[activation].saves]
    grad = torch.randn_like(a)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(
            torch.ops.fusedlinear.linear_act_backward.default, (grad, saved, x, w, activation, 0.1, mask)
        )


def test_opcheck_without_bias():
    x, w, _ = make_inputs((3,), 5, 4, torch.float32)
    torch.library.opcheck(torch.ops.fusedlinear.linear_act.default, (x, w, None, "relu", 0.01))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = fusedlinear.fuse(nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    outs, grads = [], []
    for m in (model, compiled):
        m.zero_grad()
        out = m(x)
        nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compile_fullgraph_under_autocast_matches_eager():
    """Autocast's casts in fused_linear trace without a graph break, and give eager's bfloat16."""
    x, w, b = make_inputs((8,), 16, 4, torch.float32)
    w.requires_grad_()

    def f(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fusedlinear.fused_linear(x, w, b, "gelu")

    got, want = torch.compile(f, fullgraph=True)(x, w, b), f(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)  # the same bfloat16 ops in both: at most a rounding apart
    got.float().sum().backward()
    assert w.grad.dtype == torch.float32


@pytest.mark.slow
def test_compile_reports_the_eager_error():
    """Under torch.compile the op's fake implementation validates: the same message as eager."""
    x, w, _ = make_inputs((8,), 16, 4, torch.float32)
    f = torch.compile(lambda x, w: fusedlinear.FusedLinearFunction.apply(x, w, None, "relu", 0.01), fullgraph=True)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=r"last dimension is 16.*in_features=15"):
        f(x, w[:, :15])


X, W, B = make_inputs((4,), 3, 5, torch.float64, seed=1)


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


@pytest.mark.parametrize("activation", ["gelu", "leaky_relu"])
def test_inference_mode_calls_the_op_without_a_node(activation):
    """Under torch.inference_mode (no autograd, no forward AD) fused_linear and fused_chain call the
    op itself, as compiled code does: same values as plain torch ops, same op (a dispatch mode sees
    it), no autograd.Function in between."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, w, b = make_inputs((2, 3), 5, 4, torch.float64)
    w2 = torch.randn(2, 4, dtype=torch.float64)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    applied = []
    real_apply = fusedlinear.torch_ext.ops._LinearNode.apply
    act = fusedlinear.backend.reference.FORWARD[activation]
    with torch.inference_mode(), Record():
        fusedlinear.torch_ext.ops._LinearNode.apply = lambda *a: applied.append(a) or real_apply(*a)
        try:
            out = fusedlinear.fused_linear(x, w, b, activation, 0.2)
            chain = fusedlinear.fused_chain(x, [(w, b, activation, 0.2), (w2, None, "tanh", 0.0)])
        finally:
            fusedlinear.torch_ext.ops._LinearNode.apply = real_apply
    assert out.is_inference() and applied == []
    assert seen.count("fusedlinear.linear_act.default") == 3, seen
    torch.testing.assert_close(out, act(x @ w.T + b, 0.2), rtol=1e-12, atol=1e-12)  # float64, rounding only
    torch.testing.assert_close(chain, torch.tanh(act(x @ w.T + b, 0.2) @ w2.T), rtol=1e-12, atol=1e-12)
