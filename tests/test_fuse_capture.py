"""torch_ext/fuse/capture.py, fuse(example_inputs=...) reading forwards torch.fx cannot trace
through TorchDynamo: the pairs it fuses stay exact in train and eval, on branches not taken, and
it says when the example call fails."""

import pytest
import torch
from torch import nn

import fusedlinear
from conftest import Formula

# float64 through every layer: the fused kernels and PyTorch differ in summation order only
# (K <= 64 terms of size O(1): ~1e-15 per layer), and two layers of attention and norms do not
# amplify that beyond 1e-12; 1e-9 leaves a wide margin and still fails any wrong activation.
TOL = dict(atol=1e-9, rtol=1e-9)


class _Scale(nn.Module):
    def forward(self, x, **kwargs):
        return x * kwargs.get("scale", 1.0)


class _KwargsLayer(nn.Module):
    """A forward torch.fx cannot trace: ``**kwargs`` passed on (as Hugging Face layers do)."""

    def __init__(self, shared_act=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(6, 6) for _ in range(4))
        self.act = silu = Formula(lambda x: x * torch.sigmoid(x))  # recognised as silu
        self.act3 = nn.GELU()
        self.inner = _Scale()
        self.shared_act = shared_act
        self.act_again = silu if shared_act else nn.Identity()  # a second call site of it: never fused

    def forward(self, x, **kwargs):
        h = self.act(self.fc1(x))                           # module activation: fused by TorchDynamo
        y = nn.functional.relu(self.fc2(x))                 # functional: this forward cannot change
        k = self.fc3(x)
        z = self.act3(k) + k                                # fc3's output used twice
        extra = self.act_again(x) if self.shared_act else 0  # act also called on another input
        return self.inner(h + y + z + self.fc4(x) + extra, **kwargs)


@pytest.mark.parametrize("shared_act", [False, True], ids=["own-act", "shared-act"])
def test_untraceable_forward_is_read_by_dynamo(shared_act):
    model = _KwargsLayer(shared_act).double()
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, plain = fusedlinear.fuse(model, report=True)
    assert not plain.fused
    assert all("pass example_inputs=" in reason for _, reason in plain.left_alone), str(plain)

    fused, report = fusedlinear.fuse(model, report=True, example_inputs=(x,))
    reasons = dict(report.left_alone)
    if shared_act:
        assert not report.fused and "also called on other inputs" in reasons["fc1"], str(report)
    else:
        (pair,) = report.fused
        assert (pair.linear, pair.activation) == ("fc1", "silu") and "TorchDynamo" in pair.how, str(report)
        assert isinstance(fused.fc1, fusedlinear.FusedLinear) and isinstance(fused.act, fusedlinear.FusedActivation)
    assert "no activation module after it" in reasons["fc2"], str(report)
    assert "used 2 times" in reasons["fc3"], str(report)
    assert "no activation module after it" in reasons["fc4"], str(report)
    assert list(fused.state_dict()) == list(model.state_dict())
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ref, got = model(xs[0], scale=2.0), fused(xs[1], scale=2.0)
    torch.testing.assert_close(got, ref, **TOL)
    ref.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **TOL)
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m: f"{name}: {m}")


class _ModeDependent(nn.Module):
    """fx cannot trace it (a branch on x.dim()), Dynamo can; its activation runs only in eval mode."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        if x.dim() > 5:
            x = x * 2
        h = self.fc(x)
        return self.out(h if self.training else self.act(h))


def test_dynamo_capture_fused_in_eval_stays_exact_in_train():
    torch.manual_seed(0)
    model = _ModeDependent().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    fused = fusedlinear.fuse(model, example_inputs=(x,))
    model.train(), fused.train()
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


class _ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[0] > 3:
            return self.out(self.act(self.fc(x)))
        return self.out(self.fc(x))  # the same Linear, no activation


def test_dynamo_capture_branch_not_taken_keeps_values():
    torch.manual_seed(0)
    model = _ShapeBranch().double()
    fused = fusedlinear.fuse(model, example_inputs=(torch.ones(5, 4, dtype=torch.float64),))
    x = -torch.ones(3, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


class _Straight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    def forward(me, x, *rest):  # noqa: N805 - the first parameter need not be called self
        if x.dim() > 5:
            x = x * 2
        h = me.fc(x)
        h = me.act(h)
        return me.out(h)


def test_dynamo_capture_fuses_a_straight_call_whatever_self_is_called():
    torch.manual_seed(0)
    model = _Straight().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    fused, report = fusedlinear.fuse(model, report=True, example_inputs=(x,))
    assert [(p.linear, p.activation) for p in report.fused] == [("fc", "gelu")], str(report)
    for mode in (True, False):
        model.train(mode), fused.train(mode)
        torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


def test_dynamo_capture_says_when_the_example_call_fails():
    model = _Straight().double()
    with pytest.raises(ValueError, match="calling the model on example_inputs raised RuntimeError"):
        fusedlinear.fuse(model, example_inputs=(torch.randn(5, 3, dtype=torch.float64),))
