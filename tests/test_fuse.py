"""torch_ext/fuse/__init__.py and plan.py, fuse() as a whole: models written like real ones
(ViT, BERT, NeRF, gated MLPs, the MNIST model) against the original in float64, output and every
gradient, same state_dict keys; what is left alone (hooks, pruning, parametrizations, shared
layers) and that a failure changes nothing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from conftest import F64, BertIntermediate, BertLayer, Tap, assert_same, check_fuse, mnist_mlp
from fusedlinear import FusedLinearGELU, FusedLinearLeakyReLU, FusedLinearReLU, FusedLinearTanh, FusedSequential
from fusedlinear.mnist import NeuralNetwork


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


def test_mnist_model():
    torch.manual_seed(0)
    fused, _ = check_fuse(NeuralNetwork(), torch.rand(9, 1, 28, 28, dtype=F64), pairs=2, rewritten=[])
    assert type(fused.linear_relu_stack) is FusedSequential


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


def test_fuse_twice_changes_nothing_more():
    torch.manual_seed(0)
    model = NeRF().double()
    once = fusedlinear.fuse(model)
    twice, report = fusedlinear.fuse(once, report=True)
    assert len(report.fused) == 0
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    assert_same(model, twice, torch.randn(4, 11, dtype=F64))


def test_fuse_mnist_model_keeps_outputs_and_keys():
    model = mnist_mlp()
    fused = fusedlinear.fuse(model)
    assert isinstance(fused[1], FusedLinearReLU) and isinstance(fused[2], nn.Identity)
    assert isinstance(fused[3], FusedLinearReLU) and type(fused[5]) is nn.Linear  # no activation after it
    assert type(model[1]) is nn.Linear, "fuse must not change the original unless inplace=True"
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.rand(64, 1, 28, 28)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


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


# fuse/unfuse on what they cannot handle: an error naming the module and the fix, and nothing changed.
def test_fuse_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="fuse expects an nn.Module, got list"):
        fusedlinear.fuse([nn.Linear(3, 3), nn.ReLU()])


class _ActUsedByAnotherMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))

    def extra(self, x):  # a public method forward does not call
        return self.act(x)


def test_activation_module_called_from_another_method_keeps_values():
    torch.manual_seed(0)
    model = _ActUsedByAnotherMethod().double()
    fused = fusedlinear.fuse(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused.extra(x), model.extra(x), atol=1e-12, rtol=1e-12)


class _LinearUsedByAnotherMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()
        nn.init.zeros_(self.fc.bias)  # __init__ runs before fuse: fine

    def forward(self, x):
        return self.act(self.fc(x))

    def extra(self, x):  # would get the fused layer's activation too
        return self.fc(x)

    def width(self):  # reading an attribute is fine
        return self.fc.out_features


def test_linear_called_from_another_method_is_left_alone():
    torch.manual_seed(0)
    model = _LinearUsedByAnotherMethod().double()
    fused, report = fusedlinear.fuse(model, report=True)
    assert "extra also uses self.fc" in dict(report.left_alone)["fc"], str(report)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused.extra(x), model.extra(x), atol=1e-12, rtol=1e-12)
