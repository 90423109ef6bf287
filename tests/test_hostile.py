"""Hostile inputs, table-driven: each case gives PyTorch's result or a clear error, never a crash or hang."""

import math

import pytest
import torch
from torch import nn

import fusedlinear
from conftest import reference, seeded

F32 = torch.float32




HX, HW, HB = seeded(6, 5), seeded(4, 5, seed=1) / 3, seeded(4, seed=2)

# (id, input, weight, bias, activation, slope, expected exception type or None, message pattern)
HOSTILE_CASES = [
    ("int64-input", HX.long(), HW, HB, "relu", 0.01, TypeError, "torch.int64"),
    ("int32-weight", HX, HW.int(), HB, "relu", 0.01, TypeError, "torch.int32"),
    ("uint8-bias", HX, HW, HB.to(torch.uint8), "relu", 0.01, TypeError, "torch.uint8"),
    ("bool-input", HX.bool(), HW, HB, "relu", 0.01, TypeError, "torch.bool"),
    ("complex-input", HX.to(torch.complex64), HW, HB, "relu", 0.01, TypeError, "complex64"),
    ("complex-weight", HX, HW.to(torch.complex128), HB, "relu", 0.01, TypeError, "complex128"),
    ("float16-cpu", HX.half(), HW.half(), HB.half(), "gelu", 0.01, None, None),
    ("bfloat16-cpu", HX.bfloat16(), HW.bfloat16(), HB.bfloat16(), "silu", 0.01, None, None),
    ("mixed-dtypes", HX.double(), HW, HB, "relu", 0.01, TypeError, "float64 but weight"),
    ("mixed-devices", HX, HW.to("meta"), HB, "relu", 0.01, RuntimeError, "on meta"),
    ("k-mismatch", seeded(6, 4), HW, HB, "relu", 0.01, ValueError, "in_features=5"),
    ("bias-length", HX, HW, seeded(3), "relu", 0.01, ValueError, r"bias must have shape \(4,\)"),
    ("weight-3d", HX, seeded(1, 4, 5), HB, "relu", 0.01, ValueError, "weight must be 2-D"),
    ("scalar-input", torch.tensor(1.0), HW, HB, "relu", 0.01, ValueError, "at least 1 dimension"),
    ("unknown-activation", HX, HW, HB, "swish", 0.01, ValueError, "unknown activation 'swish'"),
    ("batch-0", seeded(0, 5), HW, HB, "tanh", 0.01, None, None),
    ("batch-0-4d", seeded(0, 3, 2, 5), HW, HB, "sigmoid", 0.01, None, None),
    ("k-0-gives-bias", seeded(6, 0), seeded(4, 0), HB, "gelu", 0.01, None, None),
    ("n-0", HX, seeded(0, 5), seeded(0), "relu", 0.01, None, None),
    ("nan-relu", seeded(6, 5, fill=math.nan), HW, HB, "relu", 0.01, None, None),
    ("nan-gelu", seeded(6, 5, fill=math.nan), HW, HB, "gelu", 0.01, None, None),
    ("inf-relu", seeded(6, 5, fill=math.inf), HW, HB, "relu", 0.01, None, None),
    ("neg-inf-sigmoid", seeded(6, 5, fill=-math.inf), HW, HB, "sigmoid", 0.01, None, None),
    ("big-sigmoid", seeded(6, 5) * 1e4, HW, HB, "sigmoid", 0.01, None, None),
    ("big-tanh", seeded(6, 5) * 1e4, HW, HB, "tanh", 0.01, None, None),
    ("big-silu", seeded(6, 5) * 1e4, HW, HB, "silu", 0.01, None, None),
    ("big-gelu", seeded(6, 5) * 1e4, HW, HB, "gelu", 0.01, None, None),
    ("big-gelu-tanh", seeded(6, 5) * 1e4, HW, HB, "gelu_tanh", 0.01, None, None),
    ("non-contiguous", seeded(6, 10)[:, ::2], HW, HB, "leaky_relu", 0.2, None, None),
    ("expanded-stride-0", seeded(1, 5).expand(6, 5), HW, HB, "silu", 0.01, None, None),
    ("transposed-both", seeded(5, 6).t(), seeded(5, 4, seed=1).t(), HB, "tanh", 0.01, None, None),
    ("nan-slope", HX, HW, HB, "leaky_relu", math.nan, None, None),
    ("string-slope", HX, HW, HB, "leaky_relu", "0.1", TypeError, "negative_slope"),
]


@pytest.mark.parametrize("x,w,b,act,slope,exc,pattern", [c[1:] for c in HOSTILE_CASES], ids=[c[0] for c in HOSTILE_CASES])
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
        backend._warned.clear()
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
    x = seeded(3, 1, 28, 28)
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
