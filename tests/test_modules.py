"""torch_ext/modules.py: FusedLinear and its subclasses as drop-in nn.Linear + activation
(initialisation, keys, from_linear, training, checkpoints both ways, built on meta)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import mnist_mlp
from fusedlinear import (
    FusedLinear, FusedLinearGELU, FusedLinearLeakyReLU, FusedLinearReLU, FusedLinearSigmoid, FusedLinearSiLU,
    FusedLinearTanh,
)


def test_same_initialisation_and_keys_as_linear():
    torch.manual_seed(1)
    ref = nn.Linear(30, 20)
    torch.manual_seed(1)
    fused = FusedLinearReLU(30, 20)
    assert list(fused.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert torch.equal(fused.weight, ref.weight) and torch.equal(fused.bias, ref.bias)
    assert FusedLinear(3, 2, bias=False).bias is None
    assert "activation=relu" in repr(fused)
    assert "negative_slope=0.3" in repr(FusedLinearLeakyReLU(3, 2, negative_slope=0.3))


@pytest.mark.parametrize("cls,act,kwargs", [
    (FusedLinearReLU, nn.ReLU(), {}),
    (FusedLinearSigmoid, nn.Sigmoid(), {}),
    (FusedLinearTanh, nn.Tanh(), {}),
    (FusedLinearSiLU, nn.SiLU(), {}),
    (FusedLinearGELU, nn.GELU(), {}),
    (FusedLinearGELU, nn.GELU(approximate="tanh"), {"approximate": "tanh"}),
    (FusedLinearLeakyReLU, nn.LeakyReLU(0.2), {"negative_slope": 0.2}),
])
def test_from_linear_equals_linear_then_activation(cls, act, kwargs):
    linear = nn.Linear(12, 7).double()
    fused = cls.from_linear(linear, **kwargs)
    assert fused.weight.data_ptr() != linear.weight.data_ptr()  # a copy
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(fused(x), act(linear(x)))
    assert fused.weight.dtype == torch.float64


def test_base_from_linear_takes_the_activation():
    linear = nn.Linear(4, 3)
    fused = FusedLinear.from_linear(linear, activation="leaky_relu", negative_slope=0.5)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fused(x), nn.functional.leaky_relu(linear(x), 0.5))


def test_checkpoints_load_strictly_both_ways(tmp_path):
    eager, fused = mnist_mlp(), fusedlinear.fuse(nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)))
    torch.save(fused.state_dict(), tmp_path / "fused.pt")
    eager.load_state_dict(torch.load(tmp_path / "fused.pt"), strict=True)
    torch.save(eager.state_dict(), tmp_path / "eager.pt")
    fused.load_state_dict(torch.load(tmp_path / "eager.pt"), strict=True)
    x = torch.rand(3, 784)
    torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


def test_module_trains_like_linear_relu():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)).double()
    fused = fusedlinear.fuse(eager)
    x, y = torch.randn(32, 10, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    for model in (eager, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("activation", [a for a in fusedlinear.ACTIVATIONS if a != "identity"])
def test_every_activation_of_the_table_has_its_class_and_is_fused_and_unfused(activation):
    """The registry names each entry's fused class and nn module: from_linear equals the module after
    the Linear, fuse finds the pair in an nn.Sequential, unfuse puts the same kind of module back."""
    from fusedlinear.backend.activations import REGISTRY
    from fusedlinear.torch_ext.modules import fused_class

    cls, kwargs = fused_class(activation, 0.2)
    assert cls.__name__ == REGISTRY[activation].fused_class and hasattr(fusedlinear, cls.__name__)
    linear, act = nn.Linear(12, 7).double(), REGISTRY[activation].module(0.2)
    x = torch.randn(5, 12, dtype=torch.float64) * 4  # past hardswish's and relu6's bends
    fused_layer = cls.from_linear(linear, **kwargs)
    assert fused_layer.activation == activation
    torch.testing.assert_close(fused_layer(x), act(linear(x)))
    model = nn.Sequential(linear, act)
    fused, report = fusedlinear.fuse(model, report=True)
    described = "leaky_relu(0.2)" if activation == "leaky_relu" else activation
    assert [(p.linear, p.activation) for p in report.fused] == [("0", described)], str(report)
    torch.testing.assert_close(fused(x), model(x))
    back = fusedlinear.unfuse(fused)
    assert type(back[0]) is nn.Linear and type(back[1]) is type(act)


def test_module_built_on_meta_then_to_empty_computes_like_linear():
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = fusedlinear.FusedLinearReLU(4, 5)
        seq = fusedlinear.fuse(nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)))
    x = torch.randn(3, 4, device="meta")
    assert layer(x).shape == (3, 5) and seq(x).shape == (3, 3)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 4)), layer.bias.copy_(torch.randn(5))
    xc = torch.randn(3, 4)
    torch.testing.assert_close(layer(xc), F.relu(F.linear(xc, layer.weight, layer.bias)))
