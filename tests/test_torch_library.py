"""The registered torch.library ops: opcheck, and torch.compile(fullgraph=True) without graph breaks."""

import pytest
import torch
from torch import nn

import fusedlinear
from conftest import ACTIVATIONS, make_inputs


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
