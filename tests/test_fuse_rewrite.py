"""torch_ext/fuse/rewrite.py, forwards rewritten without their functional activation calls:
runs of layers as one chain, other arguments refused, pickling and deep copies, fused-layer
subclasses with their own forward, Sequential subclasses not rewritten."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import F64, BertIntermediate, BertLayer, Tap, assert_same, autograd_nodes, check_fuse
from fusedlinear import FusedSequential


def test_a_sequential_subclass_is_not_rewritten_as_the_old_fuse_did():
    """Issue #10: the old fuse swapped Tap's first layer for a fused one (values changed)."""
    model = Tap(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6)).double()
    x = torch.randn(3, 6, dtype=F64)
    fused = fusedlinear.fuse(model)
    assert type(fused[0]) is nn.Linear
    torch.testing.assert_close(fused(x), model(x))


def test_rewritten_forward_refuses_other_arguments_and_optional_arguments_are_not_rewritten():
    class Optional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=None):
            h = torch.relu(self.fc(x))
            return h if scale is None else h * scale

    _, report = fusedlinear.fuse(Optional(), report=True)
    assert "optional or variable arguments" in dict(report.left_alone)["fc"]
    fused = fusedlinear.fuse(BertIntermediate())
    with pytest.raises(TypeError, match="rewritten by fusedlinear.fuse for tensor arguments.*hidden_states=list"):
        fused([1.0] * 12)


def test_rewritten_model_pickles_and_deep_copies():
    torch.manual_seed(0)
    model = BertLayer().double().eval()  # eval: no dropout draws to line up
    fused = fusedlinear.fuse(model)
    x = torch.randn(2, 12, dtype=F64)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (loaded, copy.deepcopy(fused)):
        assert isinstance(other.intermediate.dense, fusedlinear.FusedLinearGELU)
        torch.testing.assert_close(other(x), model(x))
        assert type(fusedlinear.unfuse(other).intermediate) is BertIntermediate


class TutorialNet(nn.Module):
    """The PyTorch CIFAR tutorial's network, its convolutions left out."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 24)
        self.fc2 = nn.Linear(24, 16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def test_a_rewritten_forward_runs_its_layers_as_one_chain():
    torch.manual_seed(0)
    fused, report = check_fuse(TutorialNet(), torch.randn(6, 5, 8, dtype=F64), pairs=2, rewritten=["(model)"])
    assert report.chains == [["fc1", "fc2", "fc3"]], str(report)
    nodes = autograd_nodes(fused(torch.randn(2, 40, dtype=F64, requires_grad=True)))
    assert nodes.count("FusedChainFunctionBackward") == 1 and "FusedLinearFunctionBackward" not in nodes, nodes
    fused.fc2.register_forward_hook(lambda m, args, out: out * 0)  # a hook added later: layers called one by one
    torch.testing.assert_close(fused(torch.randn(2, 40, dtype=F64)), fused.fc3.bias.expand(2, 10))


class Scaled(fusedlinear.FusedLinearReLU):
    """A fused layer whose class overrides forward: must be called as a module, never chained."""

    def forward(self, x):
        return super().forward(x) * 10


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled, self.fc, self.out = Scaled(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(self.scaled(x))))


def test_a_fused_layer_subclass_with_its_own_forward_is_called_as_a_module():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=F64)
    fs = FusedSequential(Scaled(6, 6), fusedlinear.FusedLinearReLU(6, 3)).double()
    assert_same(nn.Sequential(*fs), fs, x)
    seq = nn.Sequential(Scaled(6, 6), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    assert_same(seq, fusedlinear.fuse(seq), x)
    net = ScaledNet().double()
    fused, report = fusedlinear.fuse(net, report=True)
    assert report.rewritten == ["(model)"] and report.chains == [["fc", "out"]], str(report)
    assert_same(net, fused, x)
