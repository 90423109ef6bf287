"""torch_ext/fuse/patterns.py, what a pair is: every form of each activation (module, function,
method), calls that are not activations, dropout between a Linear and its activation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import F64, check_fuse

FORMS = {
    "nn.ReLU": (lambda: nn.ReLU(), None, "relu"),
    "nn.ReLU(inplace)": (lambda: nn.ReLU(inplace=True), None, "relu"),
    "nn.GELU(tanh)": (lambda: nn.GELU(approximate="tanh"), None, "gelu_tanh"),
    "nn.SiLU": (lambda: nn.SiLU(), None, "silu"),
    "nn.Sigmoid": (lambda: nn.Sigmoid(), None, "sigmoid"),
    "nn.Tanh": (lambda: nn.Tanh(), None, "tanh"),
    "nn.LeakyReLU": (lambda: nn.LeakyReLU(0.3, inplace=True), None, "leaky_relu"),
    "F.relu": (None, lambda h: F.relu(h), "relu"),
    "F.relu(inplace)": (None, lambda h: F.relu(h, inplace=True), "relu"),
    "F.relu_": (None, lambda h: F.relu_(h), "relu"),
    "F.gelu": (None, lambda h: F.gelu(h), "gelu"),
    "F.gelu(tanh)": (None, lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh"),
    "F.silu": (None, lambda h: F.silu(h), "silu"),
    "F.leaky_relu": (None, lambda h: F.leaky_relu(h, 0.2), "leaky_relu"),
    "F.leaky_relu(kw)": (None, lambda h: F.leaky_relu(h, negative_slope=0.2, inplace=True), "leaky_relu"),
    "torch.relu": (None, lambda h: torch.relu(h), "relu"),
    "torch.sigmoid": (None, lambda h: torch.sigmoid(h), "sigmoid"),
    "torch.tanh": (None, lambda h: torch.tanh(h), "tanh"),
    "F.sigmoid": (None, lambda h: F.sigmoid(h), "sigmoid"),
    "F.tanh": (None, lambda h: F.tanh(h), "tanh"),
    ".relu()": (None, lambda h: h.relu(), "relu"),
    ".relu_()": (None, lambda h: h.relu_(), "relu"),
    ".sigmoid()": (None, lambda h: h.sigmoid(), "sigmoid"),
    ".tanh()": (None, lambda h: h.tanh(), "tanh"),
    "nn.ReLU6": (lambda: nn.ReLU6(), None, "relu6"),
    "nn.Hardswish": (lambda: nn.Hardswish(), None, "hardswish"),
    "nn.Hardsigmoid": (lambda: nn.Hardsigmoid(), None, "hardsigmoid"),
    "nn.Mish": (lambda: nn.Mish(), None, "mish"),
    "nn.Softplus": (lambda: nn.Softplus(), None, "softplus"),
    "F.relu6": (None, lambda h: F.relu6(h), "relu6"),
    "F.hardswish": (None, lambda h: F.hardswish(h), "hardswish"),
    "F.hardsigmoid": (None, lambda h: F.hardsigmoid(h), "hardsigmoid"),
    "F.mish": (None, lambda h: F.mish(h), "mish"),
    "F.softplus": (None, lambda h: F.softplus(h), "softplus"),
}


class OneLayer(nn.Module):
    def __init__(self, act_module, act_fn):
        super().__init__()
        self.fc = nn.Linear(7, 9)
        if act_module is not None:
            self.act = act_module
        self.act_fn = act_fn

    def forward(self, x):
        h = self.fc(x)
        return (self.act(h) if self.act_fn is None else self.act_fn(h)) * 2


@pytest.mark.parametrize("form", list(FORMS))
def test_every_activation_form(form):
    make, fn, activation = FORMS[form]
    torch.manual_seed(0)
    fused, _ = check_fuse(OneLayer(make() if make else None, fn), torch.randn(5, 7, dtype=F64), pairs=1)
    assert fused.fc.activation == activation


def test_unknown_calls_and_non_constant_arguments_are_left_alone():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            # softplus with beta 2 is no table entry (the table's is F.softplus's defaults)
            return F.softplus(self.a(x), beta=2.0) + F.leaky_relu(self.b(x), x.shape[0] * 0.1) + torch.relu(self.c(x), out=None)

    fused, report = fusedlinear.fuse(Model(), report=True)
    assert len(report.fused) == 0 and len(report.left_alone) == 3, str(report)


class DropBetween(nn.Module):
    def __init__(self, act, p):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(p)
        self.act = act

    def forward(self, x):
        return self.act(self.drop(self.fc(x)))


def test_dropout_between_linear_and_activation():
    torch.manual_seed(0)
    x = torch.randn(8, 6, dtype=F64)
    # ReLU commutes with dropout (relu(m z) = m relu(z) for m >= 0): fused in training mode too
    check_fuse(DropBetween(nn.ReLU(), 0.5), x, pairs=1)
    check_fuse(DropBetween(nn.GELU(), 0.0), x, pairs=1)  # p = 0: dropout is the identity
    # GELU does not commute: in training mode with p > 0 fusing would change values
    fused, report = fusedlinear.fuse(DropBetween(nn.GELU(), 0.5), report=True)
    assert len(report.fused) == 0 and "dropout (p=0.5) in training mode" in dict(report.left_alone)["fc"]
    # in eval mode it is exact; training the fused model later refuses instead of changing values
    model = DropBetween(nn.GELU(), 0.5).double().eval()
    fused, report = check_fuse(model, x, pairs=1)
    with pytest.raises(RuntimeError, match="eval mode only"):
        fused.train()(x)
    assert not fusedlinear.unfuse(fused).drop._forward_pre_hooks  # unfuse takes the guard away
