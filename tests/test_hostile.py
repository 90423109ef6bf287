"""Hostile inputs, table-driven: each case gives PyTorch's result or a clear error, never a crash or hang."""

import math

import pytest
import torch
from torch import nn

import fusedlinear
from conftest import reference

F32 = torch.float32


def t(*shape, dtype=F32, seed=0, fill=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if fill is not None:
        x.view(-1)[::3] = fill
    return x


X, W, B = t(6, 5), t(4, 5, seed=1) / 3, t(4, seed=2)

# (id, input, weight, bias, activation, slope, expected exception type or None, message pattern)
CASES = [
    ("int64-input", X.long(), W, B, "relu", 0.01, TypeError, "torch.int64"),
    ("int32-weight", X, W.int(), B, "relu", 0.01, TypeError, "torch.int32"),
    ("uint8-bias", X, W, B.to(torch.uint8), "relu", 0.01, TypeError, "torch.uint8"),
    ("bool-input", X.bool(), W, B, "relu", 0.01, TypeError, "torch.bool"),
    ("complex-input", X.to(torch.complex64), W, B, "relu", 0.01, TypeError, "complex64"),
    ("complex-weight", X, W.to(torch.complex128), B, "relu", 0.01, TypeError, "complex128"),
    ("float16-cpu", X.half(), W.half(), B.half(), "gelu", 0.01, None, None),
    ("bfloat16-cpu", X.bfloat16(), W.bfloat16(), B.bfloat16(), "silu", 0.01, None, None),
    ("mixed-dtypes", X.double(), W, B, "relu", 0.01, TypeError, "float64 but weight"),
    ("mixed-devices", X, W.to("meta"), B, "relu", 0.01, RuntimeError, "on meta"),
    ("k-mismatch", t(6, 4), W, B, "relu", 0.01, ValueError, "in_features=5"),
    ("bias-length", X, W, t(3), "relu", 0.01, ValueError, r"bias must have shape \(4,\)"),
    ("weight-3d", X, t(1, 4, 5), B, "relu", 0.01, ValueError, "weight must be 2-D"),
    ("scalar-input", torch.tensor(1.0), W, B, "relu", 0.01, ValueError, "at least 1 dimension"),
    ("unknown-activation", X, W, B, "swish", 0.01, ValueError, "unknown activation 'swish'"),
    ("batch-0", t(0, 5), W, B, "tanh", 0.01, None, None),
    ("batch-0-4d", t(0, 3, 2, 5), W, B, "sigmoid", 0.01, None, None),
    ("k-0-gives-bias", t(6, 0), t(4, 0), B, "gelu", 0.01, None, None),
    ("n-0", X, t(0, 5), t(0), "relu", 0.01, None, None),
    ("nan-relu", t(6, 5, fill=math.nan), W, B, "relu", 0.01, None, None),
    ("nan-gelu", t(6, 5, fill=math.nan), W, B, "gelu", 0.01, None, None),
    ("inf-relu", t(6, 5, fill=math.inf), W, B, "relu", 0.01, None, None),
    ("neg-inf-sigmoid", t(6, 5, fill=-math.inf), W, B, "sigmoid", 0.01, None, None),
    ("big-sigmoid", t(6, 5) * 1e4, W, B, "sigmoid", 0.01, None, None),
    ("big-tanh", t(6, 5) * 1e4, W, B, "tanh", 0.01, None, None),
    ("big-silu", t(6, 5) * 1e4, W, B, "silu", 0.01, None, None),
    ("big-gelu", t(6, 5) * 1e4, W, B, "gelu", 0.01, None, None),
    ("big-gelu-tanh", t(6, 5) * 1e4, W, B, "gelu_tanh", 0.01, None, None),
    ("non-contiguous", t(6, 10)[:, ::2], W, B, "leaky_relu", 0.2, None, None),
    ("expanded-stride-0", t(1, 5).expand(6, 5), W, B, "silu", 0.01, None, None),
    ("transposed-both", t(5, 6).t(), t(5, 4, seed=1).t(), B, "tanh", 0.01, None, None),
    ("nan-slope", X, W, B, "leaky_relu", math.nan, None, None),
    ("string-slope", X, W, B, "leaky_relu", "0.1", TypeError, "negative_slope"),
]


@pytest.mark.parametrize("x,w,b,act,slope,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input(x, w, b, act, slope, exc, pattern):
    if exc is not None:
        with pytest.raises(exc, match=pattern):
            fusedlinear.fused_linear(x, w, b, act, slope)
        return
    leaves = [v.clone().requires_grad_(v.is_floating_point()) if v is not None else None for v in (x, w, b)]
    # the reference: float64 PyTorch on the same values (never the fused code's own dtype and path)
    refs = [v.detach().double().requires_grad_(True) if v is not None else None for v in (x, w, b)]
    with _maybe_warns(x.dtype):
        out = fusedlinear.fused_linear(*leaves, act, slope)
    ref = reference(*refs, act, slope)
    # float16/bfloat16: a few roundings to 11/8 significant bits of O(1) values (see test_parity's
    # half-precision test); float32: summation order over K = 5 terms, relative to values up to 1e4
    tol = dict(atol=3e-2, rtol=3e-2) if x.dtype in (torch.float16, torch.bfloat16) else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.double(), ref, equal_nan=True, **tol)
    grad = torch.ones_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for got, want in zip(leaves, refs):
        if got is not None and got.grad is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, equal_nan=True, **tol)


def _maybe_warns(dtype):
    import contextlib

    from fusedlinear import backend

    if dtype in (torch.float16, torch.bfloat16):
        backend.notices._warned.clear()
        return pytest.warns(RuntimeWarning, match="no fused kernel")
    return contextlib.nullcontext()


def test_wrong_checkpoints_are_refused_and_change_nothing(tmp_path):
    """Checkpoints written by the project (`train.save_state_dict`, what `--save` writes) load into the
    fused model and the plain one with strict=True; a wrong-shaped or incomplete one raises naming the
    key and leaves the fused model as it was."""
    from fusedlinear import mnist, train

    fused = fusedlinear.fuse(mnist.NeuralNetwork())
    path = str(tmp_path / "ok.pt")
    train.save_state_dict(fused, path)
    plain = mnist.NeuralNetwork()
    plain.load_state_dict(torch.load(path), strict=True)
    x = t(3, 1, 28, 28)
    torch.testing.assert_close(plain(x), fused(x), atol=1e-5, rtol=1e-5)  # float32, K = 784: summation order
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    wrong = dict(before, **{"linear_relu_stack.2.weight": torch.zeros(3, 512)})
    with pytest.raises(RuntimeError, match=r"size mismatch for linear_relu_stack\.2\.weight"):
        fused.load_state_dict(wrong, strict=True)
    missing = {k: v for k, v in before.items() if k != "linear_relu_stack.0.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*linear_relu_stack\.0\.bias"):
        fused.load_state_dict(missing, strict=True)
    for k, v in fused.state_dict().items():  # nothing of the wrong checkpoints got in
        assert torch.equal(v, before[k]), k


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from fusedlinear import train

    path = str(tmp_path / "model.pt")
    model = fusedlinear.FusedLinearReLU(5, 4)
    train.save_state_dict(model, path)
    before = (tmp_path / "model.pt").read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_state_dict(fusedlinear.FusedLinearReLU(5, 4), path)
    assert (tmp_path / "model.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


# fuse/unfuse on what they cannot handle: an error naming the module and the fix, and nothing changed.
def test_fuse_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="fuse expects an nn.Module, got list"):
        fusedlinear.fuse([nn.Linear(3, 3), nn.ReLU()])


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
