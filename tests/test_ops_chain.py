"""torch_ext/ops.py's fused_chain (and FusedSequential, which runs it): several layers as one
autograd node, equal to layer-by-layer PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import ACTIVATIONS, TOL, assert_close, autograd_nodes, make_inputs, reference
from fusedlinear import FusedLinearReLU, FusedSequential


def _layers(widths, activations, dtype, bias=True, seed=0):
    layers = []
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        _, w, b = make_inputs((1,), k, n, dtype, bias=bias, seed=seed + i)
        layers.append((w, b, activations[i % len(activations)], 0.2))
    return layers


def _check_chain(x, layers, needs=None):
    """fused_chain against the float64 reference, layer by layer; every gradient that is asked for."""
    dtype = x.dtype
    needs = needs or [True] * (1 + 2 * len(layers))
    leaves = [x] + [t for w, b, _, _ in layers for t in (w, b)]
    got = [t.detach().clone().requires_grad_(need) if t is not None else None for t, need in zip(leaves, needs)]
    ref = [t.detach().double().requires_grad_(need) if t is not None else None for t, need in zip(leaves, needs)]
    out = fusedlinear.fused_chain(got[0], [(got[1 + 2 * i], got[2 + 2 * i], act, s)
                                           for i, (_, _, act, s) in enumerate(layers)])
    h = ref[0]
    for i, (_, _, act, s) in enumerate(layers):
        h = reference(h, ref[1 + 2 * i], ref[2 + 2 * i], act, s)
    assert_close(out, h, dtype, "output")
    if not any(needs):
        return
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad.to(dtype))
    h.backward(grad)
    for i, (g, r) in enumerate(zip(got, ref)):
        if g is None:
            continue
        if r.requires_grad:
            assert_close(g.grad, r.grad, dtype, f"gradient of leaf {i}")
        else:
            assert g.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("widths,lead", [((13, 1, 7), (5,)), ((37, 65, 3, 129), (2, 3)), ((784, 512, 512, 10), (17,))])
@pytest.mark.parametrize("bias", [True, False])
def test_chain_matches_pytorch_float64(widths, lead, dtype, bias):
    for first in range(0, len(ACTIVATIONS), len(widths) - 1):  # every activation somewhere in a chain
        acts = [ACTIVATIONS[(first + i) % len(ACTIVATIONS)] for i in range(len(widths) - 1)]
        x, _, _ = make_inputs(lead, widths[0], 1, dtype, seed=9)
        _check_chain(x, _layers(widths, acts, dtype, bias=bias, seed=first))


@pytest.mark.parametrize("needs", [
    [False, True, True, True, True, True, True],     # input needs none (the MNIST case)
    [True, False, False, True, True, False, False],  # frozen first and last layers
    [False, False, False, False, False, True, True],  # only the last layer: backward stops early
    [True, True, True, False, False, False, False],
])
def test_chain_requires_grad_subsets(needs):
    x, _, _ = make_inputs((11,), 9, 1, torch.float64)
    _check_chain(x, _layers((9, 8, 7, 5), ["relu", "gelu", "identity"], torch.float64), needs)


def test_chain_gradcheck():
    x, _, _ = make_inputs((4,), 5, 1, torch.float64)
    layers = _layers((5, 6, 3), ["tanh", "silu"], torch.float64)
    leaves = [x.requires_grad_()] + [t.requires_grad_() for w, b, _, _ in layers for t in (w, b)]

    def fn(x, w0, b0, w1, b1):
        return fusedlinear.fused_chain(x, [(w0, b0, "tanh", 0.0), (w1, b1, "silu", 0.0)])

    assert torch.autograd.gradcheck(fn, leaves)


def test_chain_error_names_the_layer():
    x = torch.randn(2, 4)
    layers = [(torch.randn(3, 4), None, "relu", 0.0), (torch.randn(2, 5), None, "relu", 0.0)]
    with pytest.raises(ValueError, match="layer 1: its input has 3 features.*in_features=5.*in_features=3"):
        fusedlinear.fused_chain(x, layers)
    with pytest.raises(TypeError, match="layer 1: input is torch.float32 but weight is torch.float64"):
        fusedlinear.fused_chain(x, [layers[0], (torch.randn(2, 3, dtype=torch.float64), None, "relu", 0.0)])


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Dropout(0.0), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3)).to(dtype)


def test_fuse_makes_a_fused_sequential_with_the_same_keys_values_and_gradients():
    eager = _mlp(torch.float64)
    fused = fusedlinear.fuse(eager)
    assert type(fused) is FusedSequential and type(eager) is nn.Sequential
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    for model in (eager, fused):
        model.zero_grad()
        model(x).square().sum().backward()
    torch.testing.assert_close(fused(x), eager(x), **TOL[torch.float64])
    for p, q in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64])
    plain = fusedlinear.unfuse(fused)
    assert type(plain) is nn.Sequential and list(plain.state_dict()) == list(eager.state_dict())


def test_fused_sequential_runs_each_run_of_layers_as_one_node():
    fused = fusedlinear.fuse(_mlp())
    nodes = autograd_nodes(fused(torch.randn(4, 20)))
    # Linear+ReLU, Linear+Tanh | Dropout | Linear+GELU, Linear: two chains
    assert nodes.count("FusedChainFunctionBackward") == 2, nodes
    assert "FusedLinearFunctionBackward" not in nodes


def test_a_hook_on_a_layer_still_fires():
    fused = fusedlinear.fuse(_mlp())
    calls = []
    fused[3].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    x = torch.randn(4, 20)
    out = fused(x)
    assert calls == [torch.Size([4, 16])]
    torch.testing.assert_close(out, _mlp()(x), atol=1e-5, rtol=1e-5)


def test_hand_built_fused_sequential():
    torch.manual_seed(0)
    model = FusedSequential(FusedLinearReLU(7, 5), nn.Linear(5, 2))
    eager = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2))
    eager[0].load_state_dict(model[0].state_dict())
    eager[2].load_state_dict(model[1].state_dict())
    x = torch.randn(3, 7)
    torch.testing.assert_close(model(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("blas", ["auto", "mkl", "openblas"])
def test_chain_every_thread_count_and_blas(threads, blas, monkeypatch):
    """Chains over column tiles, the whole-matrix MKL path and row bands, on 1-3 threads."""
    from fusedlinear.backend import numba_cpu

    if blas == "mkl" and "mkl" not in numba_cpu.blas_libraries():
        pytest.skip("this PyTorch has no MKL")
    monkeypatch.setattr(numba_cpu, "BLAS_CHOICE", blas)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (40, 300, 1031):
            x, _, _ = make_inputs((rows,), 190, 1, torch.float64, seed=rows)
            _check_chain(x, _layers((190, 170, 230, 9), ["silu", "relu", "identity"], torch.float64))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("rows,widths", [(0, (5, 4, 3)), (6, (5, 0, 3)), (6, (0, 4, 3))])
def test_chain_with_zero_sized_dimensions(rows, widths):
    """An empty batch or a zero-width layer anywhere in a chain: like nn.Linear (K=0 gives the bias)."""
    x, _, _ = make_inputs((rows,), widths[0], 1, torch.float64)
    _check_chain(x, _layers(widths, ["relu", "sigmoid"], torch.float64))


class _Scale(nn.Module):
    """A custom parametrization: weight = 1.5 * original."""

    def forward(self, weight):
        return weight * 1.5


@pytest.mark.parametrize("parametrize", ["weight_norm", "spectral_norm", "orthogonal", "custom"])
def test_fused_sequential_with_a_parametrized_layer(parametrize):
    """Issue #10: the chain read _parameters["weight"], which a parametrized layer does not have (KeyError)."""
    from torch.nn.utils import parametrizations
    from torch.nn.utils.parametrize import register_parametrization

    torch.manual_seed(0)
    model = FusedSequential(FusedLinearReLU(7, 5), fusedlinear.FusedLinearTanh(5, 5), nn.Linear(5, 3)).double()
    {"weight_norm": lambda m: parametrizations.weight_norm(m),
     "spectral_norm": lambda m: parametrizations.spectral_norm(m),
     "orthogonal": lambda m: parametrizations.orthogonal(m),
     "custom": lambda m: register_parametrization(m, "weight", _Scale())}[parametrize](model[1])
    model.eval()  # spectral_norm: no power iteration per call, so both runs see one weight
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    grads = []
    for run in ("fused", "reference"):
        model.zero_grad(set_to_none=True)
        x.grad = None
        if run == "fused":
            out = model(x)
        else:  # plain PyTorch ops on the same (parametrized) weights
            h = torch.relu(F.linear(x, model[0].weight, model[0].bias))
            h = torch.tanh(F.linear(h, model[1].weight, model[1].bias))
            out = F.linear(h, model[2].weight, model[2].bias)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        grads.append((out, x.grad, {n: p.grad for n, p in model.named_parameters()}))
    (out, dx, dp), (ref, rdx, rdp) = grads
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(dx, rdx, **TOL[torch.float64])
    for name in rdp:
        torch.testing.assert_close(dp[name], rdp[name], **TOL[torch.float64], msg=lambda m: f"{name}: {m}")


def test_global_full_backward_hook_fires_per_layer():
    """Issue #10: with a global full backward hook the chain ran as one node, so the hook never saw
    the layers. Now every module is called as a module: each fused layer's hook sees the same input
    gradient (dX) as the plain model's Linear at that place."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fused = fusedlinear.fuse(eager)
    assert type(fused) is FusedSequential
    seen = {}

    def hook(module, grad_input, grad_output):
        seen.setdefault(run, []).append((type(module).__name__, grad_input[0]))

    handle = torch.nn.modules.module.register_module_full_backward_hook(hook)
    try:
        for run, model in (("eager", eager), ("fused", fused)):
            x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
            model(x).sum().backward()
    finally:
        handle.remove()
    linear_inputs = lambda calls, names: [g for name, g in calls if name in names]
    eager_dx = linear_inputs(seen["eager"], {"Linear"})
    fused_dx = linear_inputs(seen["fused"], {"Linear", "FusedLinearReLU", "FusedLinearTanh"})
    assert len(eager_dx) == len(fused_dx) == 3, seen
    for got, want in zip(fused_dx, eager_dx):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
