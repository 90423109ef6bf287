"""fuse() on models written like real ones (not nn.Sequential): each fused model against the
original in float64, output and every gradient, same state_dict keys (strict loads both ways),
the number of fused pairs, and unfuse back to the original classes."""

import copy
import io
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import BertIntermediate, BertLayer, BertOutput, F64, TOL, Tap, assert_same, autograd_nodes, check_fuse
from fusedlinear import FusedActivation, FusedLinear, FusedSequential
from fusedlinear.mnist import NeuralNetwork







# ---- models written like the real ones ------------------------------------------------------


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, dim, hidden, act_layer=nn.GELU, drop=0.1):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class Attention(nn.Module):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim=12, hidden=20):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


def test_vit_block_in_training_mode():
    torch.manual_seed(0)
    blocks = nn.Sequential(ViTBlock(), ViTBlock())  # dropout p=0.1 active: same masks from the same seed
    fused, report = check_fuse(blocks, torch.randn(2, 5, 12, dtype=F64), pairs=2, rewritten=["0.mlp", "1.mlp"])
    # Mlp's other methods may call self.act: it stays the GELU, forward is rewritten without the call
    assert type(fused[0].mlp.act) is nn.GELU and isinstance(fused[0].mlp, Mlp)
    assert "0.mlp.fc1 + gelu" in str(report)
    assert dict(report.left_alone)["0.attn.qkv"] == "no activation after it (its output goes to .reshape())"








def test_bert_layer_with_functional_gelu():
    torch.manual_seed(0)
    model = BertLayer()
    fused, report = check_fuse(model, torch.randn(3, 4, 12, dtype=F64), pairs=1, rewritten=["intermediate"])
    assert type(fused.intermediate).__name__ == "BertIntermediate" and isinstance(fused.intermediate, BertIntermediate)
    assert type(fused.intermediate) is not BertIntermediate  # a subclass whose forward is the graph


class NeRF(nn.Module):
    """The NeRF MLP: a ModuleList loop with F.relu, a skip concat, heads with and without activations."""

    def __init__(self, depth=4, width=16, in_pts=6, in_views=5, skips=(2,)):
        super().__init__()
        self.skips = skips
        self.pts_linears = nn.ModuleList(
            [nn.Linear(in_pts, width)] + [nn.Linear(width + in_pts if i - 1 in skips else width, width)
                                          for i in range(1, depth)])
        self.views_linears = nn.ModuleList([nn.Linear(in_views + width, width // 2)])
        self.feature_linear = nn.Linear(width, width)
        self.alpha_linear = nn.Linear(width, 1)
        self.rgb_linear = nn.Linear(width // 2, 3)
        self.in_pts = in_pts

    def forward(self, x):
        input_pts, input_views = torch.split(x, [self.in_pts, x.shape[-1] - self.in_pts], dim=-1)
        h = input_pts
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in self.skips:
                h = torch.cat([input_pts, h], -1)
        alpha = self.alpha_linear(h)
        h = torch.cat([self.feature_linear(h), input_views], -1)
        for layer in self.views_linears:
            h = layer(h).relu()
        rgb = torch.sigmoid(self.rgb_linear(h))
        return torch.cat([rgb, alpha], -1)


def test_nerf_mlp():
    torch.manual_seed(0)
    fused, report = check_fuse(NeRF(), torch.randn(7, 11, dtype=F64), pairs=6, rewritten=["(model)"])
    left = dict(report.left_alone)
    assert "feature_linear" in left and "alpha_linear" in left and len(left) == 2


class SwiGLU(nn.Module):
    def __init__(self, dim=10, hidden=16):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_gated_mlp():
    torch.manual_seed(0)
    fused, report = check_fuse(SwiGLU(), torch.randn(4, 3, 10, dtype=F64), pairs=1)
    assert isinstance(fused.gate, fusedlinear.FusedLinearSiLU) and type(fused.up) is nn.Linear


class Residual(nn.Sequential):
    """A Sequential subclass with its own forward."""

    def forward(self, x):
        return x + super().forward(x)




def test_sequential_subclasses_with_their_own_forward():
    torch.manual_seed(0)
    model = nn.Sequential(Residual(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)),
                          Tap(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6)))
    fused, report = check_fuse(model, torch.randn(4, 6, dtype=F64), pairs=1)
    assert isinstance(fused[0], Residual) and type(fused[0][1]) is nn.ReLU and type(fused[1]) is Tap
    assert dict(report.left_alone)["1.0"] == "its output is used 2 times"


def test_a_sequential_subclass_is_not_rewritten_as_the_old_fuse_did():
    """Issue #10: the old fuse swapped Tap's first layer for a fused one (values changed)."""
    model = Tap(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6)).double()
    x = torch.randn(3, 6, dtype=F64)
    fused = fusedlinear.fuse(model)
    assert type(fused[0]) is nn.Linear
    torch.testing.assert_close(fused(x), model(x))


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


def test_mnist_model():
    torch.manual_seed(0)
    fused, _ = check_fuse(NeuralNetwork(), torch.rand(9, 1, 28, 28, dtype=F64), pairs=2, rewritten=[])
    assert type(fused.linear_relu_stack) is FusedSequential


# ---- every activation form --------------------------------------------------------------------


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


# ---- what is and is not exact ------------------------------------------------------------------


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


def test_linear_used_twice_or_shared_activation():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 5)
            self.act = nn.Tanh()

        def forward(self, x):  # self.act also runs on something that is not a Linear's output
            return self.act(self.fc2(self.act(self.fc1(x)))) + self.act(x)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):  # the same layer, both calls followed by relu: fused
            return F.relu(self.fc(F.relu(self.fc(x))))

    class Unequal(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):  # the second call has no activation after it: left alone
            return self.fc(F.relu(self.fc(x)))

    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=F64)
    fused, _ = check_fuse(Shared(), x, pairs=2, rewritten=["(model)"])
    assert isinstance(fused.act, nn.Tanh)  # still called on x, so not replaced
    check_fuse(Twice(), x, pairs=1)
    _, report = check_fuse(Unequal(), x, pairs=0)
    assert "no activation after it" in dict(report.left_alone)["fc"]


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


def test_report_says_what_it_did():
    _, report = fusedlinear.fuse(BertLayer(), report=True)
    text = str(report)
    assert "fused 1 Linear+activation pair(s), left 1 nn.Linear alone" in text
    assert "intermediate.dense + gelu" in text and "output.dense: no activation after it" in text
    assert fusedlinear.fuse(BertLayer()).__class__ is BertLayer  # report=False: just the model


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


def test_fuse_twice_changes_nothing_more():
    torch.manual_seed(0)
    model = NeRF().double()
    once = fusedlinear.fuse(model)
    twice, report = fusedlinear.fuse(once, report=True)
    assert len(report.fused) == 0
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    assert_same(model, twice, torch.randn(4, 11, dtype=F64))


# ---- layers with their own forward, forwards with Python-level behaviour -----------------------


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
