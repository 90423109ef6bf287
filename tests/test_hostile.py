"""Hostile inputs, table-driven: each case gives PyTorch's result or a clear error, never a crash or hang."""

import math

import pytest
import torch

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
    ("unknown-activation", X, W, B, "mish", 0.01, ValueError, "unknown activation 'mish'"),
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


def _outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # the test below checks which exception
        return None, exc


@pytest.mark.parametrize("x,w,b,act,slope,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input(x, w, b, act, slope, exc, pattern):
    if exc is not None:
        with pytest.raises(exc, match=pattern):
            fusedlinear.fused_linear(x, w, b, act, slope)
        return
    leaves = [v.clone().requires_grad_(v.is_floating_point()) if v is not None else None for v in (x, w, b)]
    refs = [v.clone().requires_grad_(v.is_floating_point()) if v is not None else None for v in (x, w, b)]
    with _maybe_warns(x.dtype):
        out = fusedlinear.fused_linear(*leaves, act, slope)
    ref = reference(*refs, act, slope)
    tol = dict(atol=1e-2, rtol=1e-2) if x.dtype in (torch.float16, torch.bfloat16) else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, equal_nan=True, **tol)
    grad = torch.ones_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for got, want in zip(leaves, refs):
        if got is not None and got.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, equal_nan=True, **tol)


def _maybe_warns(dtype):
    import contextlib

    from fusedlinear import backend

    if dtype in (torch.float16, torch.bfloat16):
        backend._warned.clear()
        return pytest.warns(RuntimeWarning, match="no fused kernel")
    return contextlib.nullcontext()


def test_at_least_25_cases():
    assert len(CASES) >= 25


def test_corrupt_checkpoints_raise_clearly(tmp_path):
    model = fusedlinear.FusedLinearReLU(5, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        torch.load(tmp_path / "truncated.pt")
    wrong = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(wrong, strict=True)
    for k, v in model.state_dict().items():  # nothing of the wrong-shaped checkpoint got in
        assert torch.equal(v, before[k])
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"weight": torch.zeros(4, 5)}, strict=True)


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
