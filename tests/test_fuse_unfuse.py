"""torch_ext/fuse/unfuse.py: unfuse gives the original modules back, and refuses (changing
nothing) what it cannot undo or what would change the state_dict keys."""

import pytest
from torch import nn

import fusedlinear
from fusedlinear import FusedLinearReLU


def test_unfuse_refuses_what_would_change_keys():
    model = nn.Sequential(FusedLinearReLU(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="nn.Identity"):
        fusedlinear.unfuse(model)


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


@pytest.mark.parametrize("build,pattern", [
    # a fused layer last in its Sequential: no nn.Identity to take the activation back
    (lambda: nn.Sequential(nn.Linear(3, 3), fusedlinear.FusedLinearSigmoid(3, 2)), r"fused layer 1 \(sigmoid\) has no nn.Identity after it"),
    # followed by something other than the nn.Identity that fuse leaves
    (lambda: nn.Sequential(fusedlinear.FusedLinearReLU(3, 3), nn.Dropout(), nn.Linear(3, 2)), r"fused layer 0 \(relu\) has no nn.Identity after it"),
    # a fused layer that is not inside any nn.Sequential
    (lambda: _Holder(fusedlinear.FusedLinearTanh(3, 2)), r"fused layer layer \(tanh\) has no nn.Identity after it in an nn.Sequential"),
], ids=["last", "not-identity", "outside-sequential"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_unfuse_refuses_what_it_cannot_undo_and_changes_nothing(build, pattern, inplace):
    model = build()
    before = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match=pattern):
        fusedlinear.unfuse(model, inplace=inplace)
    assert [(name, type(m)) for name, m in model.named_modules()] == before


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
