"""The compatibility selection: what must hold on every torch the package declares.

`.ci/run` runs this file again in fresh venvs holding the oldest and the newest supported torch,
with the package installed by `pip install .` (not editable), so each of these checks also proves
the installed package. It is part of the main suite too (a few seconds plus one compile).

Every activation of the table (``fusedlinear.kernels.activations.ACTIVATIONS``, so one added
later is covered) is compared with float64 plain PyTorch (``conftest.reference``): output and
every gradient, float32 and float64, with the tolerances of ``conftest.TOL``."""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fusedlinear
from conftest import TOL, assert_close, check_against_reference, make_inputs, reference
from fusedlinear import fused_chain, fused_linear, mnist
from fusedlinear.kernels.activations import ACTIVATIONS

pytestmark = pytest.mark.compat

SLOPE = 0.2  # leaky_relu's slope other than the default 0.01, so a dropped slope shows
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]
# float64 against float64 on tiny shapes (K <= 6): summation order only, ~1e-16; 1e-10 catches any formula error.
EXACT = dict(atol=1e-10, rtol=1e-10)


def _version(text):
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:2])


def test_import_and_torch_within_the_declared_range():
    """The running torch is one the installed package declares (`torch>=X.Y` in its metadata)."""
    requirement = next(r for r in importlib.metadata.requires("fusedlinear") if re.match(r"torch\b", r))
    minimum = re.search(r">=\s*([\d.]+)", requirement)
    assert minimum, f"the torch requirement {requirement!r} states no minimum"
    assert _version(torch.__version__) >= _version(minimum.group(1)), (torch.__version__, requirement)
    assert tuple(fusedlinear.ACTIVATIONS) == tuple(ACTIVATIONS)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_every_activation_output_and_gradients(activation, dtype, backends_ran):
    """fused_linear (2-D and 3-D input, bias and none) and a two-layer fused_chain against float64
    PyTorch; the CPU kernels (numba) ran forward and backward, not a plain-torch fallback."""
    layer = lambda x, w, b: fused_linear(x, w, b, activation, SLOPE)
    check_against_reference(layer, *make_inputs((7,), 13, 5, dtype, seed=1), activation, SLOPE)
    check_against_reference(layer, *make_inputs((2, 3), 6, 4, dtype, bias=False, seed=2), activation, SLOPE)
    assert {"numba"} == {name for name, _ in backends_ran}
    assert {"forward", "backward"} <= {what for _, what in backends_ran}

    x, w1, b1 = make_inputs((5,), 9, 6, dtype, seed=3)
    _, w2, b2 = make_inputs((1,), 6, 3, dtype, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    out = fused_chain(leaves[0], [(leaves[1], leaves[2], activation, SLOPE), (leaves[3], leaves[4], "tanh", 0.01)])
    want = reference(reference(refs[0], refs[1], refs[2], activation, SLOPE), refs[3], refs[4], "tanh")
    assert_close(out, want, dtype, "chain output")
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out.backward(grad.to(dtype))
    want.backward(grad)
    for name, got, ref in zip(("dX", "dW1", "db1", "dW2", "db2"), leaves, refs):
        assert_close(got.grad, ref.grad, dtype, f"chain {name}")


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_modules_from_linear_and_state_dict(activation):
    """FusedLinear.from_linear equals nn.Linear + the layer's own activation_module(); the public
    FusedLinear* classes are subclasses with the activation fixed; keys are nn.Linear's."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 7).double()
    fused = fusedlinear.FusedLinear.from_linear(linear, activation=activation, negative_slope=SLOPE)
    assert list(fused.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(fused(x), fused.activation_module()(linear(x)), **EXACT)
    torch.testing.assert_close(fused(x), reference(x, linear.weight, linear.bias, activation, SLOPE), **EXACT)
    fresh = fusedlinear.FusedLinear(12, 7, activation=activation, negative_slope=SLOPE, dtype=torch.float64)
    fresh.load_state_dict(linear.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), fused(x), atol=0, rtol=0)


def test_every_public_layer_class_runs_its_activation():
    classes = [c for c in (getattr(fusedlinear, n) for n in fusedlinear.__all__)
               if isinstance(c, type) and issubclass(c, fusedlinear.FusedLinear)]
    assert len(classes) > 1
    x = torch.randn(4, 6, dtype=torch.float64)
    for cls in classes:
        layer = cls(6, 3, dtype=torch.float64)
        assert layer.activation in ACTIVATIONS, cls
        torch.testing.assert_close(layer(x), layer.activation_module()(layer.to_linear()(x)), **EXACT)


def test_fuse_the_mnist_model():
    """fuse() on the CLI's model: same keys, checkpoints load both ways, same output and gradients."""
    torch.manual_seed(0)
    model = mnist.NeuralNetwork()
    fused = fusedlinear.fuse(model)
    assert isinstance(fused.linear_relu_stack[0], fusedlinear.FusedLinearReLU)
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(fused.state_dict(), strict=True)
    x = torch.rand(16, 1, 28, 28)
    plain64 = mnist.NeuralNetwork().double()
    plain64.load_state_dict(model.state_dict())
    out, want = fused(x), plain64(x.double())
    assert_close(out, want, torch.float32, "output")
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, got), ref in zip(fused.named_parameters(), plain64.parameters()):
        # float32 through three layers (K up to 784) against float64: TOL's float32 bound, scaled by
        # the sum of squares' gradient (|out| up to ~1, 160 outputs): 1e-3 absolute.
        assert_close(got.grad, ref.grad, torch.float32, name, tol=dict(atol=1e-3, rtol=1e-3))
    assert type(fusedlinear.unfuse(fused).linear_relu_stack[0]) is nn.Linear


def test_compile_fullgraph():
    """One torch.compile(fullgraph=True) of a fused model with two activations (a graph break
    raises); output and gradients against float64 PyTorch."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 3))
    fused = fusedlinear.fuse(plain)
    compiled = torch.compile(fused, fullgraph=True)
    plain64 = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 3)).double()
    plain64.load_state_dict(plain.state_dict())
    x = torch.randn(8, 20)
    out, want = compiled(x), plain64(x.double())
    assert_close(out, want, torch.float32, "compiled output")
    out.sum().backward()
    want.sum().backward()
    for (name, got), ref in zip(fused.named_parameters(), plain64.parameters()):
        assert_close(got.grad, ref.grad, torch.float32, f"compiled {name}")


# Under autocast both sides compute in bfloat16 (8-bit mantissa: a relative step of 2**-8 ~ 0.004);
# the activation's backward may be rounded once more or less: a few bfloat16 steps.
BF16 = dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_autocast_bfloat16(activation):
    x, w, b = make_inputs((8,), 32, 16, torch.float32, seed=6)
    results = []
    for layer in (fused_linear, reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(*leaves, activation, SLOPE)
        out.float().square().sum().backward()
        results.append((out, *(t.grad for t in leaves)))
    assert results[0][0].dtype == torch.bfloat16
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **BF16)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_double_backward(activation):
    x, w, b = make_inputs((3,), 4, 5, torch.float64, seed=7)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: fused_linear(x, w, b, activation, SLOPE)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_torch_func(activation):
    """vmap, grad, jacrev and jacfwd (forward mode) give what they give on plain PyTorch."""
    x, w, b = make_inputs((6,), 4, 5, torch.float64, seed=8)
    fused = lambda x, w, b: fused_linear(x, w, b, activation, SLOPE)
    plain = lambda x, w, b: reference(x, w, b, activation, SLOPE)
    for transform in (lambda f: torch.func.vmap(f, in_dims=(0, None, None)),
                      lambda f: torch.func.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)),
                      lambda f: torch.func.jacrev(f, argnums=(1, 2)),
                      lambda f: torch.func.jacfwd(f, argnums=0)):
        torch.testing.assert_close(transform(fused)(x, w, b), transform(plain)(x, w, b), **EXACT)


def _cli():
    """The installed console script (pip writes it beside the interpreter), else `python -m`."""
    script = Path(sys.executable).with_name("fusedlinear")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fusedlinear"]


@pytest.mark.slow
def test_cli_train_one_epoch(tmp_path):
    """`fusedlinear train --epochs 1` on the bundled digits. One epoch reaches 0.903 at seed 0
    (torch 2.13.0); 0.85 leaves room for another torch's RNG and kernels, while a wrong gradient
    stays near chance (0.1). The saved state_dict loads into the plain model with strict=True."""
    out = subprocess.run([*_cli(), "train", "--epochs", "1", "--no-progress", "--json", str(tmp_path / "run.json"),
                          "--save", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["epochs"] == 1 and summary["device"] == "cpu" and summary["backend"] == "numba"
    assert summary["torch"] == torch.__version__
    assert summary["test_accuracy"] >= 0.85, summary["test_accuracy"]
    mnist.NeuralNetwork().load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
