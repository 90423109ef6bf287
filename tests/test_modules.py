"""Modules, fuse/unfuse and checkpoints in both directions."""

import pytest
import torch
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


def test_fuse_mnist_model_keeps_outputs_and_keys():
    model = mnist_mlp()
    fused = fusedlinear.fuse(model)
    assert isinstance(fused[1], FusedLinearReLU) and isinstance(fused[2], nn.Identity)
    assert isinstance(fused[3], FusedLinearReLU) and type(fused[5]) is nn.Linear  # no activation after it
    assert type(model[1]) is nn.Linear, "fuse must not change the original unless inplace=True"
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.rand(64, 1, 28, 28)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_checkpoints_load_strictly_both_ways(tmp_path):
    eager, fused = mnist_mlp(), fusedlinear.fuse(nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)))
    torch.save(fused.state_dict(), tmp_path / "fused.pt")
    eager.load_state_dict(torch.load(tmp_path / "fused.pt"), strict=True)
    torch.save(eager.state_dict(), tmp_path / "eager.pt")
    fused.load_state_dict(torch.load(tmp_path / "eager.pt"), strict=True)
    x = torch.rand(3, 784)
    torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


def test_fuse_nested_and_inplace_and_unfuse():
    inner = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 4), nn.LeakyReLU(0.3))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), inner, nn.Sigmoid())
    x = torch.randn(5, 6)
    expected = model(x)
    params = {id(p) for p in model.parameters()}
    same = fusedlinear.fuse(model, inplace=True)
    assert same is model and {id(p) for p in model.parameters()} == params  # optimizer state stays valid
    assert isinstance(model[0], FusedLinearTanh)
    assert isinstance(inner[0], FusedLinearGELU) and inner[0].approximate == "tanh"
    assert isinstance(inner[2], FusedLinearLeakyReLU) and inner[2].negative_slope == 0.3
    torch.testing.assert_close(model(x), expected)
    plain = fusedlinear.unfuse(model)
    assert type(plain[0]) is nn.Linear and isinstance(plain[1], nn.Tanh)
    assert isinstance(plain[2][1], nn.GELU) and plain[2][1].approximate == "tanh"
    assert isinstance(plain[2][3], nn.LeakyReLU) and plain[2][3].negative_slope == 0.3
    assert list(plain.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(plain(x), expected)


def test_unfuse_refuses_what_would_change_keys():
    model = nn.Sequential(FusedLinearReLU(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="nn.Identity"):
        fusedlinear.unfuse(model)


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


# ---- issue #10: fuse keeps what nn.Linear + activation does -----------------------------------


def _pair_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh()).double()


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_a_hooked_linear_is_left_alone_and_its_hook_still_acts(kind):
    """The old fuse replaced the hooked Linear and its hook was gone (values changed)."""
    model = _pair_model()
    seen = []
    hook = {"forward": lambda m, args, out: out * 2,
            "forward_pre": lambda m, args: (args[0] * 3,),
            "full_backward": lambda m, gin, gout: seen.append(gout[0].shape)}[kind]
    getattr(model[0], f"register_{kind}_hook")(hook)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    expected = model(x)
    fused, report = fusedlinear.fuse(model, report=True)
    assert type(fused[0]) is nn.Linear and isinstance(fused[2], FusedLinearTanh)
    assert "hook registered on it" in dict(report.left_alone)["0"]
    torch.testing.assert_close(fused(x), expected)
    fused(x).sum().backward()
    assert seen == ([torch.Size([3, 5])] * 1 if kind == "full_backward" else [])


def test_a_hooked_activation_is_left_alone():
    model = _pair_model()
    model[1].register_forward_hook(lambda m, args, out: out + 1)
    x = torch.randn(3, 6, dtype=torch.float64)
    fused, report = fusedlinear.fuse(model, report=True)
    assert type(fused[0]) is nn.Linear and "has a hook" in dict(report.left_alone)["0"]
    torch.testing.assert_close(fused(x), model(x))


def test_pruned_linear_is_left_alone_and_fuse_inplace_does_not_fail_half_way():
    """The old fuse(inplace=True) fused layer 0, then failed on the pruned layer 2 (TypeError)."""
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh()).double()
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    keys = list(model.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x)
    same, report = fusedlinear.fuse(model, inplace=True, report=True)
    assert same is model and isinstance(model[0], FusedLinearReLU) and type(model[2]) is nn.Linear
    assert "pruned" in dict(report.left_alone)["2"]
    assert list(model.state_dict()) == keys  # weight_orig, weight_mask stay
    torch.testing.assert_close(model(x), expected)


def test_parametrized_linear_is_left_alone():
    from torch.nn.utils import parametrizations

    model = _pair_model()
    parametrizations.weight_norm(model[0])
    x = torch.randn(3, 6, dtype=torch.float64)
    fused, report = fusedlinear.fuse(model, report=True)
    assert "parametrized" in dict(report.left_alone)["0"] and isinstance(fused[2], FusedLinearTanh)
    assert list(fused.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_is_atomic(monkeypatch):
    """A failure while fuse builds its plan leaves an inplace model exactly as it was."""
    import importlib

    fuse_module = importlib.import_module("fusedlinear.torch_ext.fuse.plan")  # the phase that builds the layers

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh())
    before = [(name, type(m)) for name, m in model.named_modules()]
    built = []
    real = fuse_module._layer_for

    def failing(linear, spec):
        if built:
            raise RuntimeError("planned failure")
        built.append(linear)
        return real(linear, spec)

    monkeypatch.setattr(fuse_module, "_layer_for", failing)
    with pytest.raises(RuntimeError, match="planned failure"):
        fusedlinear.fuse(model, inplace=True)
    assert [(name, type(m)) for name, m in model.named_modules()] == before


@pytest.mark.parametrize("call,match", [
    (lambda: fusedlinear.fuse(42), "fuse expects an nn.Module, got int"),
    (lambda: fusedlinear.fuse(nn.Linear), "got the class Linear; pass an instance"),
    (lambda: fusedlinear.fuse(nn.Linear(2, 2), inplace="yes"), "inplace must be True or False, got 'yes'"),
    (lambda: fusedlinear.fuse(nn.Linear(2, 2), report=1), "report must be True or False, got 1"),
    (lambda: fusedlinear.unfuse([nn.Linear(2, 2)]), "unfuse expects an nn.Module, got list"),
    (lambda: fusedlinear.unfuse(nn.Linear(2, 2), inplace=None), "inplace must be True or False, got None"),
])
def test_fuse_and_unfuse_bad_arguments(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_unfuse_refuses_before_changing_anything():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), FusedLinearReLU(3, 3))
    fusedlinear.fuse(model, inplace=True)
    with pytest.raises(ValueError, match="fused layer 1 .relu. has no nn.Identity after it"):
        fusedlinear.unfuse(model, inplace=True)
    assert isinstance(model[0][0], FusedLinearReLU)  # the first one was not unfused either


def test_unfuse_restores_the_original_activation_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 3), nn.LeakyReLU(0.25))
    plain = fusedlinear.unfuse(fusedlinear.fuse(model))
    assert repr(plain) == repr(model)


def test_one_activation_module_used_after_several_layers():
    """``act = nn.ReLU()`` placed twice in one Sequential: both pairs fused, the module swapped once."""
    torch.manual_seed(0)
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 6), act, nn.Linear(6, 2)).double()
    model[0].tag = "first"  # a user attribute on the layer goes with it, and comes back
    fused, report = fusedlinear.fuse(model, report=True)
    assert len(report.fused) == 2 and fused[1] is fused[3] and isinstance(fused[1], fusedlinear.FusedActivation)
    assert fused[0].tag == "first"
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x))
    plain = fusedlinear.unfuse(fused.eval())
    assert plain[1] is plain[3] and type(plain[1]) is nn.ReLU and not plain[1].training
    assert plain[0].tag == "first" and not hasattr(plain[0], "activation")


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
