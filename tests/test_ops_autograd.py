"""torch_ext/ops.py under autograd's other modes: gradcheck and gradgradcheck, second
derivatives, torch.func and vmap (no batched tensor reaches a kernel), forward-mode AD, autocast,
non-strided layouts."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fusedlinear
from conftest import ACTIVATIONS, assert_close, make_inputs, reference
from fusedlinear import FusedLinearFunction, backend, fused_chain, fused_linear
from fusedlinear.backend import numba_cpu
from fusedlinear.torch_ext import FusedChainFunction

SLOPE = 0.2  # leaky_relu with a slope other than the default 0.01, so a slope mix-up shows


# float64 against float64: the fused path and the reference differ only in summation order
# (~K * 1e-16 with K <= 7 here), so 1e-10 leaves a wide margin and still catches any formula error.
EXACT = dict(atol=1e-10, rtol=1e-10)


def _layers(dims, activations, bias=True, seed=0):
    layers = []
    for n, (k, m) in enumerate(zip(dims[:-1], dims[1:])):
        _, w, b = make_inputs((1,), k, m, torch.float64, bias=bias, seed=seed + n)
        layers.append((w.requires_grad_(), None if b is None else b.requires_grad_(), activations[n], SLOPE))
    return layers


def _chain_reference(x, layers):
    for w, b, activation, slope in layers:
        x = reference(x, w, b, activation, slope)
    return x


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_linear_gradcheck_and_gradgradcheck(activation, bias):
    x, w, b = make_inputs((3,), 4, 5, torch.float64, bias=bias, seed=3)
    inputs = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)
    fn = lambda x, w, b=None: fused_linear(x, w, b, activation, SLOPE)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_chain_gradcheck_and_gradgradcheck(activation, bias):
    x, _, _ = make_inputs((3,), 4, 1, torch.float64, seed=5)
    layers = _layers((4, 3, 2), [activation, "tanh" if activation == "relu" else "relu"], bias, seed=7)
    params = [t for w, b, _, _ in layers for t in (w, b) if t is not None]

    def fn(x, *params):
        it, rebuilt = iter(params), []
        for w, b, activation, slope in layers:
            rebuilt.append((next(it), next(it) if b is not None else None, activation, slope))
        return fused_chain(x, rebuilt)

    inputs = (x.requires_grad_(), *params)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


# PyTorch has no double backward for hardsigmoid ("derivative for aten::hardsigmoid_backward is not
# implemented"): there is no autograd oracle; gradgradcheck above covers it (g'' = 0 between kinks).
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "hardsigmoid"])
def test_second_derivatives_equal_autograds(activation):
    """A gradient penalty (the norm of dL/dx, differentiated in W, b and x) equals autograd's on the
    plain layers, for fused_linear, fused_chain and FusedLinearFunction.apply alike."""
    x, w, b = make_inputs((6,), 4, 5, torch.float64, seed=11)
    later = _layers((5, 3), ["sigmoid"], seed=13)

    def penalty(layer):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = layer(*leaves)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), leaves)

    def chain(x, w, b):
        return fused_chain(x, [(w, b, activation, SLOPE), *later])

    want = penalty(lambda x, w, b: _chain_reference(reference(x, w, b, activation, SLOPE), later))
    for got in (penalty(chain),
                penalty(lambda x, w, b: _chain_reference(fused_linear(x, w, b, activation, SLOPE), later)),
                penalty(lambda x, w, b: _chain_reference(FusedLinearFunction.apply(x, w, b, activation, SLOPE)[0], later))):
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, **EXACT)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_second_derivatives_at_the_kink_equal_autograds(activation):
    """Z exactly 0 (x = 0, b = 0): relu's g' is 0 there and leaky_relu's is the slope, as PyTorch
    says, and g'' is 0; the Hessian-vector product in x and the mixed one in W equal autograd's."""
    x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, dtype=torch.float64)
    results = []
    for layer in (fused_linear, reference):
        out = layer(x, w, b, activation, SLOPE)
        (gw,) = torch.autograd.grad(out, w, v, create_graph=True)
        # relu: W reaches (gw*gw) only through a select, which autograd counts as unused (None) where
        # PyTorch's threshold_backward gives zeros: the same derivative, 0
        results.append((gw, *torch.autograd.grad((gw * gw).sum(), (x, w, b), materialize_grads=True)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **EXACT)


def test_first_order_gradients_under_create_graph_equal_the_kernels():
    """create_graph=True computes backward with torch ops; the first derivatives stay those of the
    kernels' own backward (float32: summation order only, 1e-5 for K = 40 terms of O(1))."""
    x, w, b = make_inputs((7,), 40, 9, torch.float32, seed=2)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    out = fused_linear(*leaves, "gelu")
    plain = torch.autograd.grad(out.sum(), leaves, retain_graph=True)
    graphed = torch.autograd.grad(out.sum(), leaves, create_graph=True)
    assert all(g.requires_grad for g in graphed)
    for g, p in zip(graphed, plain):
        torch.testing.assert_close(g, p, atol=1e-5, rtol=1e-5)


def _function_pairs(activation):
    """(fused, plain) pairs of functions of (x, w, b): one layer, and a chain of two."""
    fused = lambda x, w, b: fused_linear(x, w, b, activation, SLOPE)
    plain = lambda x, w, b: reference(x, w, b, activation, SLOPE)
    chain = lambda x, w, b: fused_chain(x, [(w, b, activation, SLOPE), (w.T, None, "sigmoid", 0.01)])
    chain_plain = lambda x, w, b: reference(plain(x, w, b), w.T, None, "sigmoid")
    return (fused, plain), (chain, chain_plain)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_jacobian_vectorized(activation):
    x, w, b = make_inputs((3,), 4, 5, torch.float64, seed=17)
    for fused, plain in _function_pairs(activation):
        got = torch.autograd.functional.jacobian(fused, (x, w, b), vectorize=True)
        want = torch.autograd.functional.jacobian(plain, (x, w, b))
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_is_grads_batched(activation):
    x, w, b = make_inputs((3,), 4, 5, torch.float64, seed=19)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    grads = torch.randn(6, 3, 5, dtype=torch.float64)
    got = torch.autograd.grad(fused_linear(*leaves, activation, SLOPE), leaves, grads, is_grads_batched=True)
    want = torch.autograd.grad(reference(*leaves, activation, SLOPE), leaves, grads, is_grads_batched=True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **EXACT)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_func_vmap_grad_jacrev(activation):
    x, w, b = make_inputs((6,), 4, 5, torch.float64, seed=23)
    for f, p in _function_pairs(activation):
        pairs = [
            (torch.func.vmap(f, in_dims=(0, None, None)), torch.func.vmap(p, in_dims=(0, None, None))),
            (torch.func.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)),
             torch.func.grad(lambda *a: p(*a).sum(), argnums=(0, 1, 2))),
            (torch.func.jacrev(f, argnums=(1, 2)), torch.func.jacrev(p, argnums=(1, 2))),
            (torch.func.jacfwd(f, argnums=0), torch.func.jacfwd(p, argnums=0)),
        ]
        for got_fn, want_fn in pairs:
            torch.testing.assert_close(got_fn(x, w, b), want_fn(x, w, b), **EXACT)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_mode_ad(activation):
    """Dual tensors (torch.autograd.forward_ad) and jacobian(strategy="forward-mode")."""
    x, w, b = make_inputs((3,), 4, 5, torch.float64, seed=41)
    tangents = [torch.randn_like(t) for t in (x, w, b)]
    for fused, plain in _function_pairs(activation):
        results = []
        for fn in (fused, plain):
            with fwAD.dual_level():
                out = fn(*(fwAD.make_dual(t, d) for t, d in zip((x, w, b), tangents)))
                results.append(fwAD.unpack_dual(out))
            results.append(torch.autograd.functional.jacobian(fn, (x, w, b), strategy="forward-mode", vectorize=True))
        torch.testing.assert_close(results[0], results[2], **EXACT)
        torch.testing.assert_close(results[1], results[3], **EXACT)


def test_per_sample_gradients_of_a_module():
    """The torch.func recipe for per-sample gradients (functional_call + vmap(grad)) on fused models:
    one fused layer per nn.Linear, and fuse()'s FusedSequential (one fused_chain node)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3), nn.Tanh()).double()
    per_layer = nn.Sequential(fusedlinear.FusedLinearGELU.from_linear(plain[0]),
                              fusedlinear.FusedLinearTanh.from_linear(plain[2]))
    x = torch.randn(5, 4, dtype=torch.float64)

    def per_sample_grads(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        loss = lambda p, xi: torch.func.functional_call(model, p, (xi[None],)).pow(2).sum()
        return list(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x).values())

    want = per_sample_grads(plain)
    for model in (per_layer, fusedlinear.fuse(plain)):
        got = per_sample_grads(model)
        assert [g.shape for g in got] == [r.shape for r in want]
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, **EXACT)


# Under autocast both the fused layer and nn.Linear compute in bfloat16 (8-bit mantissa: one
# rounding is a relative step of 2**-8 ~ 0.004). They run the same casts and the same F.linear
# (the fused layer takes backend 'torch' for bfloat16), but the activation's backward is rounded
# once more or less (the table's formula in float32, then bfloat16): a few bfloat16 steps.
BF16 = dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autocast_computes_in_the_autocast_dtype(activation):
    x, w, b = make_inputs((8,), 32, 16, torch.float32, seed=29)
    results = []
    for layer in (fused_linear, reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(*leaves, activation, SLOPE)
        out.float().pow(2).sum().backward()
        results.append((out, *(t.grad for t in leaves)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype  # bfloat16 out, float32 gradients (the leaves' dtype)
        torch.testing.assert_close(got, want, **BF16)
    assert results[0][0].dtype == torch.bfloat16


def test_autocast_model_mixing_linear_and_fused_layers():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 8), nn.Tanh(),
                          nn.Linear(8, 4))
    mixed = nn.Sequential(plain[0], plain[1], fusedlinear.FusedLinearSiLU.from_linear(plain[2]), *plain[4:])
    x = torch.randn(5, 12)
    for model in (mixed, fusedlinear.fuse(plain)):  # per-layer calls, and one fused_chain node
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = model(x), plain(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, **BF16)
        got.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_autocast_leaves_float64_alone():
    """Autocast does not cast float64 (nor does it for nn.Linear): float64 stays exact."""
    x, w, b = make_inputs((3,), 4, 5, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear(x, w, b, "tanh")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(x, w, b, "tanh"), **EXACT)


def _njt(rows, k):
    return torch.nested.nested_tensor([torch.randn(r, k, dtype=torch.float64) for r in rows], layout=torch.jagged)


LAYOUTS = {
    # name: (input, weight) builders from dense float64 x (4, 3) and w (5, 3)
    "sparse_coo input": lambda x, w: (x.to_sparse(), w),
    "sparse_csr input": lambda x, w: (x.to_sparse_csr(), w),
    "sparse_csr weight": lambda x, w: (x, w.to_sparse_csr()),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_non_strided_layouts_give_plain_torch_results(layout, activation):
    x, w, b = make_inputs((4,), 3, 5, torch.float64, seed=31)
    want = reference(x, w, b, activation, SLOPE)
    xs, ws = LAYOUTS[layout](x, w)
    torch.testing.assert_close(fused_linear(xs, ws, b, activation, SLOPE), want, **EXACT)
    torch.testing.assert_close(fused_chain(xs, [(ws, b, activation, SLOPE)]), want, **EXACT)


def test_mkldnn_and_nested_inputs_give_plain_torch_results():
    x, w, b = make_inputs((4,), 3, 5, torch.float32, seed=37)
    got = fused_linear(x.to_mkldnn(), w, b, "sigmoid")
    assert got.is_mkldnn  # what nn.Linear gives an mkldnn input
    torch.testing.assert_close(got.to_dense(), reference(x, w, b, "sigmoid"))  # float32 both: ulps
    njt = _njt((2, 3), 3)
    for got in (fused_linear(njt, w.double(), b.double(), "gelu"),
                fusedlinear.FusedLinearGELU(3, 5).double().requires_grad_(False)(njt)):
        assert got.is_nested and got.layout == torch.jagged
    layer = fusedlinear.FusedLinearGELU(3, 5).double()
    for part, out in zip(njt.unbind(), layer(njt).unbind()):
        torch.testing.assert_close(out, reference(part, layer.weight, layer.bias, "gelu"), **EXACT)


def test_layout_torch_cannot_run_names_the_layout_and_fix():
    x, w, b = make_inputs((4,), 3, 5, torch.float32)
    with pytest.raises(RuntimeError) as info:
        fused_linear(x, w.to_sparse(), b)
    message = str(info.value)  # in the message itself, not only a note a traceback shows
    assert "weight is layout torch.sparse_coo" in message and "weight.to_dense()" in message


def test_empty_chain_returns_its_input_like_an_empty_sequential():
    x = torch.randn(3, 4)
    assert fused_chain(x, []) is x is nn.Sequential()(x)
    assert FusedChainFunction.apply(x, ()) is x


def test_integer_slope_is_the_same_as_float():
    x, w, b = make_inputs((3,), 4, 5, torch.float64)
    torch.testing.assert_close(fused_linear(x, w, b, "leaky_relu", 1), fused_linear(x, w, b, "leaky_relu", 1.0), **EXACT)
    torch.testing.assert_close(fused_linear(x, w, b, "leaky_relu", 1), reference(x, w, b, "leaky_relu", 1.0), **EXACT)


def test_batched_gradients_never_reach_a_kernel_address(monkeypatch):
    """vmap's batched tensors have no storage: the ops' registered vmap rules compute them with
    torch ops, so no kernel is handed a batched tensor's address (here: a kernel call fails)."""
    x, w, b = make_inputs((5,), 6, 3, torch.float64, seed=7)
    with torch.no_grad():
        a, z = numba_cpu.forward(x, w, b, "gelu", 0.01)

    def refuse(*args):
        raise AssertionError("a batched tensor reached the numba backend")

    monkeypatch.setattr(numba_cpu, "forward", refuse)
    monkeypatch.setattr(numba_cpu, "backward", refuse)
    grads = torch.randn(4, 5, 3, dtype=torch.float64)
    got = torch.vmap(lambda g: torch.ops.fusedlinear.linear_act_backward(g, z, x, w, "gelu", 0.01, [True] * 3))(grads)
    want = [backend.implementation("torch").backward(g, z, x, w, "gelu", 0.01, (True, True, True)) for g in grads]
    for i, name in enumerate(("dX", "dW", "db")):
        assert_close(got[i], torch.stack([v[i] for v in want]), torch.float64, name)
    xs = torch.randn(4, 5, 6, dtype=torch.float64)
    got = torch.vmap(lambda xi: torch.ops.fusedlinear.linear_act(xi, w, b, "gelu", 0.01)[0])(xs)
    assert_close(got, F.gelu(F.linear(xs, w, b)), torch.float64, "vmap forward")
