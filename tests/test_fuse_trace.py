"""torch_ext/fuse/trace.py, reading a forward as a torch.fx graph: forwards a graph would
misrepresent (control flow, training mode, random numbers, set attributes, other tracers) are
left as they are, and fuse leaves the RNG streams alone."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import F64, assert_same, check_fuse
from fusedlinear import FusedSequential


class Dynamic(nn.Module):
    """Data-dependent control flow: untraceable; its child Sequential is still fused inside it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.SiLU())
        self.head = nn.Linear(8, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:
            return self.act(self.head(h))
        return self.head(h)


def test_dynamic_control_flow_falls_back_and_says_why():
    torch.manual_seed(0)
    fused, report = check_fuse(Dynamic(), torch.randn(5, 6, dtype=F64), pairs=2)
    assert "(model)" in report.untraceable and "TraceError" in report.untraceable["(model)"]
    assert "control flow" in dict(report.left_alone)["head"]
    assert type(fused.body) is FusedSequential


def test_forward_depending_on_training_mode():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            h = F.silu(self.fc(x))
            if self.training:
                h = h * 2
            return h

    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(3, 5, dtype=F64)
    fused = check_fuse(model, x, pairs=1)[0]
    model.eval()
    fused.eval()
    assert_same(model, fused, x)


class StochasticDepth(nn.Module):
    def __init__(self, draw):
        super().__init__()
        self.fc, self.draw = nn.Linear(6, 6), draw

    def forward(self, x):
        if self.draw() < 0.5:
            return x
        return F.relu(self.fc(x))


_CALLS = [0]


def _every_other_call():
    _CALLS[0] += 1
    return _CALLS[0] % 2


@pytest.mark.parametrize("draw", [random.random, lambda: float(torch.rand(())), _every_other_call],
                         ids=["random", "torch.rand", "global-counter"])
@pytest.mark.parametrize("seed", range(4))
def test_a_forward_drawing_random_numbers_is_not_frozen(draw, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    model = StochasticDepth(draw).double()
    fused, report = fusedlinear.fuse(model, report=True)
    assert type(fused) is StochasticDepth and type(fused.fc) is nn.Linear and not report.fused, str(report)
    assert "(model)" in report.untraceable, str(report)
    assert ("random" in report.untraceable["(model)"] if draw is not _every_other_call
            else "two different graphs" in report.untraceable["(model)"]), str(report)
    x = torch.randn(4, 6, dtype=F64)
    for call in range(6):  # both branches, the same draws for both models
        outs = []
        for m in (model, fused):
            random.seed(call)
            torch.manual_seed(call)
            _CALLS[0] = call
            outs.append(m(x))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)  # same module, same code: exact


def test_fuse_leaves_the_rng_streams_as_they_were():
    model = StochasticDepth(random.random)
    random.seed(3)
    torch.manual_seed(3)
    fusedlinear.fuse(model)
    after = random.random(), torch.rand(())
    random.seed(3)
    torch.manual_seed(3)
    assert after == (random.random(), torch.rand(()))


class Stash(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out, self.n = nn.Linear(6, 6), nn.Linear(6, 2), 0

    def forward(self, x):
        h = F.relu(self.fc(x))
        self.last_hidden = h
        return self.out(h)


class Counter(Stash):
    def forward(self, x):
        self.n += 1
        return self.out(F.relu(self.fc(x)))


@pytest.mark.parametrize("cls, attribute", [(Stash, "last_hidden"), (Counter, "n")])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_forward_setting_attributes_is_not_rewritten(cls, attribute, inplace):
    torch.manual_seed(0)
    model = cls().double()
    reference = copy.deepcopy(model)
    fused, report = fusedlinear.fuse(model, inplace=inplace, report=True)
    assert type(fused) is cls and type(fused.fc) is nn.Linear and not report.fused, str(report)
    assert f"{cls.__name__}.{attribute}" in report.untraceable["(model)"], str(report)
    assert vars(fused).keys() == vars(reference).keys() and fused.n == 0  # tracing set nothing, no Proxy left
    x = torch.randn(3, 6, dtype=F64)
    assert_same(reference, fused, x)
    assert fused.n == reference.n and (attribute == "n" or torch.equal(fused.last_hidden, reference.last_hidden))


_SKIP = {"on": False}


class Switch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x if _SKIP["on"] else F.relu(self.fc(x))


def test_a_forward_tracing_otherwise_when_installed_is_left_unchanged(monkeypatch):
    """Between planning and installing, the forward's graph changes (a global flag flips): fuse
    leaves the module as it was and says why, instead of a KeyError or a half-applied plan."""
    import importlib
    fuse_module = importlib.import_module("fusedlinear.torch_ext.fuse.plan")  # where _plan looks it up
    original = fuse_module._rewritten_class

    def flip_then_build(*args):
        _SKIP["on"] = True
        return original(*args)

    monkeypatch.setattr(fuse_module, "_rewritten_class", flip_then_build)
    monkeypatch.setitem(_SKIP, "on", False)
    model = Switch().double()
    fused, report = fusedlinear.fuse(model, report=True)
    assert type(fused) is Switch and type(fused.fc) is nn.Linear and not report.fused, str(report)
    assert "another graph" in report.untraceable["(model)"], str(report)
    _SKIP["on"] = False
    assert_same(model, fused, torch.randn(3, 6, dtype=F64))
