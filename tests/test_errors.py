"""Bad input raises the right exception with a message naming the bad value and the fix."""

import pytest
import torch

import fusedlinear
from fusedlinear import FusedLinear, fused_linear

X, W, B = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)

CASES = [
    # (description, call, exception, message pattern)
    ("K mismatch", lambda: fused_linear(torch.randn(4, 2), W, B), ValueError, r"last dimension is 2.*in_features=3"),
    ("bias length", lambda: fused_linear(X, W, torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
    ("bias 2-D", lambda: fused_linear(X, W, torch.randn(1, 5)), ValueError, r"bias must have shape"),
    ("weight 1-D", lambda: fused_linear(X, torch.randn(3), B), ValueError, r"weight must be 2-D"),
    ("0-d input", lambda: fused_linear(torch.tensor(1.0), W, B), ValueError, r"at least 1 dimension"),
    ("int input", lambda: fused_linear(torch.ones(4, 3, dtype=torch.int64), W, B), TypeError, r"input has dtype torch.int64.*float\(\)"),
    ("bool weight", lambda: fused_linear(X, torch.ones(5, 3, dtype=torch.bool), B), TypeError, r"weight has dtype torch.bool"),
    ("complex input", lambda: fused_linear(torch.randn(4, 3, dtype=torch.complex64), W, B), TypeError, r"complex64"),
    ("mixed dtypes", lambda: fused_linear(X.double(), W, B), TypeError, r"input is torch.float64 but weight is torch.float32"),
    ("bias dtype", lambda: fused_linear(X, W, B.double()), TypeError, r"bias is torch.float64"),
    ("mixed devices", lambda: fused_linear(X, W.to("meta"), B), RuntimeError, r"input is on cpu but weight is on meta"),
    ("unknown activation", lambda: fused_linear(X, W, B, "swish"), ValueError, r"unknown activation 'swish'.*relu"),
    ("non-tensor input", lambda: fused_linear([[1.0, 2.0, 3.0]], W, B), TypeError, r"input must be a torch.Tensor"),
    ("bad slope", lambda: fused_linear(X, W, B, "leaky_relu", "0.1"), TypeError, r"negative_slope must be a real number"),
    ("module activation", lambda: FusedLinear(3, 5, activation="softmax"), ValueError, r"unknown activation 'softmax'"),
    ("module input", lambda: FusedLinear(3, 5)(torch.randn(2, 4)), ValueError, r"last dimension is 4"),
    ("unknown backend", lambda: fusedlinear.use_backend("triton").__enter__(), ValueError, r"unknown backend 'triton'.*numba, cupy, torch"),
    ("backend for device", lambda: _with_backend("cupy", lambda: fused_linear(X, W, B)), RuntimeError, r"backend 'cupy' runs cuda tensors"),
    ("GELU approximate", lambda: fusedlinear.FusedLinearGELU(3, 5, approximate="fast"), ValueError, r"approximate must be"),
    ("from_linear type", lambda: fusedlinear.FusedLinearReLU.from_linear(torch.nn.Conv1d(1, 1, 1)), TypeError, r"nn.Linear"),
]


def _with_backend(name, fn):
    with fusedlinear.use_backend(name):
        return fn()


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_env_var_names_the_variable(monkeypatch):
    monkeypatch.setenv("FUSEDLINEAR_BACKEND", "nope")
    with pytest.raises(ValueError, match="FUSEDLINEAR_BACKEND.*numba, cupy, torch"):
        fused_linear(X, W, B)
    monkeypatch.setenv("FUSEDLINEAR_BACKEND", "torch")
    torch.testing.assert_close(fused_linear(X, W, B), torch.relu(torch.nn.functional.linear(X, W, B)))


def test_backends_report_why_they_cannot_run():
    report = fusedlinear.available_backends()
    assert report["numba"] == "ok" and report["torch"] == "ok"
    if not __import__("conftest").has_cuda_and_cupy():
        assert report["cupy"] != "ok" and ("fusedlinear[cuda]" in report["cupy"] or "device" in report["cupy"])
