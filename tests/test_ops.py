"""torch_ext/ops.py, fused_linear and its entry points: bad input raises a clear error naming the
value and the fix (table-driven hostile inputs too), requires_grad subsets, no_grad and inference
mode, zero-sized and 1-D inputs, meta tensors, FUSEDLINEAR_BACKEND named when wrong."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedlinear
from conftest import check_against_reference, make_inputs, reference, seeded
from fusedlinear import FusedLinear, fused_chain, fused_linear
from fusedlinear.torch_ext import FusedChainFunction


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_requires_grad_subsets(needs):
    x, w, b = make_inputs((9,), 8, 7, torch.float64)
    leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, b), needs)]
    out = fusedlinear.fused_linear(*leaves, activation="silu")
    out.sum().backward()
    refs = [t.clone().requires_grad_(r) for t, r in zip((x, w, b), needs)]
    from conftest import reference

    reference(*refs, "silu").sum().backward()
    for got, want, r in zip(leaves, refs, needs):
        assert (got.grad is None) == (not r)
        if r:
            torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=1e-12)


def test_no_grad_and_inference_mode():
    x, w, b = make_inputs((5,), 4, 3, torch.float32)
    w.requires_grad_(True)
    from conftest import reference

    with torch.no_grad():
        out = fusedlinear.fused_linear(x, w, b, "relu")
    assert out.grad_fn is None
    with torch.inference_mode():
        out2 = fusedlinear.fused_linear(x, w, b, "relu")
    assert out2.is_inference()
    torch.testing.assert_close(out, reference(x, w.detach(), b, "relu"))
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("lead,k,n", [((0,), 5, 3), ((2, 0), 5, 3), ((4,), 0, 3), ((4,), 5, 0)])
def test_zero_sized_dimensions(lead, k, n):
    x, w, b = make_inputs(lead, k, n, torch.float64)
    check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "sigmoid"), x, w, b, "sigmoid")


def test_one_dimensional_input():
    x, w, b = make_inputs((), 6, 4, torch.float64)
    out = fusedlinear.fused_linear(x, w, b, "gelu")
    assert out.shape == (4,)
    check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "gelu"), x, w, b, "gelu")


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
    ("chain layer of 3", lambda: fused_chain(X, [(W, B, "relu")]), TypeError,
     r"layer 0 is a tuple of 3 items; layers must be \[\(weight, bias or None, activation, negative_slope\), \.\.\.\]"),
    ("chain later layer", lambda: fused_chain(X, [(W, B, "relu", 0.0), None]), TypeError, r"layer 1 is NoneType; layers must be \["),
    ("chain bare tuple", lambda: fused_chain(X, (W, B, "relu", 0.0)), TypeError,
     r"layer 0 is a tensor of shape \(5, 3\) \(a bare tuple\? wrap one layer in a list"),
    # PyTorch refuses these layouts in F.linear: the message itself (not only a note) names the layout and the fix.
    ("sparse weight", lambda: fused_linear(X, W.to_sparse(), B), RuntimeError,
     r"^fusedlinear: weight is layout torch.sparse_coo.*weight.to_dense\(\)"),
    ("sparse bias", lambda: fused_linear(X, W, B.to_sparse()), RuntimeError,
     r"^fusedlinear: bias is layout torch.sparse_coo.*bias.to_dense\(\)"),
    ("float8 input", lambda: fused_linear(X.to(torch.float8_e4m3fn), W.to(torch.float8_e4m3fn)), TypeError,
     r"input has dtype torch.float8_e4m3fn; fused layers compute in float32, float64, float16 or bfloat16"),
    ("float8 chain", lambda: fused_chain(X, [(W, B, "relu", 0.0), (torch.ones(2, 5, dtype=torch.float8_e5m2), None, "relu", 0.0)]),
     TypeError, r"layer 1: weight has dtype torch.float8_e5m2; .*weight.float\(\)"),
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


# Every entry point validates: the autograd Functions and the torch.library ops (eager, and their
# fake implementations, which torch.compile runs) raise what fused_linear raises, instead of
# reading a float64 weight as float32, a short bias past its end, or a narrower/wider weight as K.
_APPLY = lambda *a: fusedlinear.FusedLinearFunction.apply(*a)
_OP = lambda *a: torch.ops.fusedlinear.linear_act(*a)
_CHAIN = lambda x, w, b, act, slope: FusedChainFunction.apply(x, ((act, slope, b is not None),), *[t for t in (w, b) if t is not None])

ENTRY_CASES = [
    ("float64 weight", (X, W.double(), B, "relu", 0.01), TypeError, r"input is torch.float32 but weight is torch.float64"),
    ("short bias", (X, W, torch.randn(4), "relu", 0.01), ValueError, r"bias must have shape \(5,\)"),
    ("narrower weight", (X, torch.randn(5, 2), B, "relu", 0.01), ValueError, r"last dimension is 3.*in_features=2"),
    ("wider weight", (X, torch.randn(5, 4), B, "relu", 0.01), ValueError, r"last dimension is 3.*in_features=4"),
    ("unknown activation", (X, W, B, "swish", 0.01), ValueError, r"unknown activation 'swish'.*relu"),
    ("3-D input", (X[None], W, B, "relu", 0.01), ValueError, r"input must be 2-D.*fused_linear"),
    ("int input", (X.long(), W, B, "relu", 0.01), TypeError, r"input has dtype torch.int64"),
    ("sparse input", (X.to_sparse(), W, B, "relu", 0.01), ValueError, r"input is layout torch.sparse_coo.*input.to_dense\(\)"),
    ("meta weight", (X, W.to("meta"), B, "relu", 0.01), RuntimeError, r"input is on cpu but weight is on meta"),
    # float8 is a floating dtype no kernel (and no torch activation) computes in: named, with the fix.
    ("float8 input", (X.to(torch.float8_e4m3fn), W.to(torch.float8_e4m3fn), None, "relu", 0.01), TypeError,
     r"input has dtype torch.float8_e4m3fn; fused layers compute in float32.*input.float\(\)"),
    ("float8 weight", (X, W.to(torch.float8_e5m2), B, "relu", 0.01), TypeError,
     r"weight has dtype torch.float8_e5m2; .*weight.float\(\)"),
]
_ENTRIES = {"FusedLinearFunction.apply": _APPLY, "linear_act": _OP, "FusedChainFunction.apply": _CHAIN}


@pytest.mark.parametrize("entry", _ENTRIES)
@pytest.mark.parametrize("args,exc,pattern", [c[1:] for c in ENTRY_CASES], ids=[c[0] for c in ENTRY_CASES])
def test_every_entry_point_validates(entry, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _ENTRIES[entry](*args)


@pytest.mark.parametrize("args,exc,pattern", [c[1:] for c in ENTRY_CASES if "sparse" not in c[0]],
                         ids=[c[0] for c in ENTRY_CASES if "sparse" not in c[0]])
def test_fake_implementation_validates(args, exc, pattern):
    """What torch.compile sees (FakeTensorMode runs the op's fake implementation)."""
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(exc, match=pattern):
            torch.ops.fusedlinear.linear_act(*fake)


_G, _S = torch.randn(4, 5), torch.randn(4, 5)
BACKWARD_CASES = [
    ("grad shape", (torch.randn(4, 4), _S, X, W, "tanh", 0.01, [True] * 3), ValueError, r"grad has shape \(4, 4\), expected \(4, 5\)"),
    ("saved shape", (_G, torch.randn(3, 5), X, W, "tanh", 0.01, [True] * 3), ValueError, r"saved has shape \(3, 5\), expected \(4, 5\)"),
    ("grad dtype", (_G.double(), _S, X, W, "tanh", 0.01, [True] * 3), TypeError, r"grad is Tensor\(4, 5\) torch.float64"),
    ("weight dtype", (_G, _S, X, W.double(), "tanh", 0.01, [True] * 3), TypeError, r"input is torch.float32 but weight is torch.float64"),
    ("activation", (_G, _S, X, W, "swish", 0.01, [True] * 3), ValueError, r"unknown activation 'swish'"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("args,exc,pattern", [c[1:] for c in BACKWARD_CASES], ids=[c[0] for c in BACKWARD_CASES])
def test_backward_op_validates(args, exc, pattern, fake):
    with FakeTensorMode() if fake else contextlib.nullcontext() as mode:
        if fake:
            args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(exc, match=pattern):
            torch.ops.fusedlinear.linear_act_backward(*args)


def test_chain_apply_validates_spec_and_later_layers():
    with pytest.raises(ValueError, match=r"spec must hold \(activation, negative_slope, has_bias\).*1 layers, 1 params"):
        FusedChainFunction.apply(X, (("relu", 0.01, True),), W)
    with pytest.raises(ValueError, match=r"layer 1: its input has 5 features.*in_features=3"):
        FusedChainFunction.apply(X, (("relu", 0.01, False), ("relu", 0.01, False)), W, W)


@pytest.mark.parametrize("slope,pattern", [
    (torch.tensor(0.1), r"negative_slope must be a Python number, got a tensor.*float\(negative_slope\)"),
    (True, r"negative_slope must be a real number, got True"),
    ("0.1", r"negative_slope must be a real number, got '0.1'"),
])
def test_slope_must_be_a_number(slope, pattern):
    """A tensor slope is refused (no gradient would flow into it, and reading it costs a sync);
    a bool is a mistake (True is 1.0); an int is a number (test_ops_autograd)."""
    for call in (lambda: fused_linear(X, W, B, "leaky_relu", slope), lambda: _APPLY(X, W, B, "leaky_relu", slope)):
        with pytest.raises(TypeError, match=pattern):
            call()


@pytest.mark.parametrize("to_sparse", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr], ids=["coo", "csr"])
def test_sparse_layouts_torch_computes_equal_the_dense_result(to_sparse):
    """Where PyTorch computes a sparse input or CSR weight, the result is the dense one."""
    x, w, b = (t.double() for t in (X, W, B))
    want = torch.relu(torch.nn.functional.linear(x, w, b))
    for got in (fused_linear(to_sparse(x), w, b), fused_linear(x, to_sparse(w), b) if to_sparse is torch.Tensor.to_sparse_csr else None):
        if got is not None:
            torch.testing.assert_close(got.to_dense(), want, rtol=1e-12, atol=1e-12)  # float64, one small product: rounding only


def test_op_refuses_nested_tensors_naming_the_fix():
    """The op has no nested kernel: our message (not the dispatcher's 'Could not run ... NestedTensorCPU')."""
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    pattern = r"input is a nested tensor; .*to_padded_tensor\(0.0\)"
    for requires_grad in (False, True):
        with pytest.raises(ValueError, match=pattern):
            torch.ops.fusedlinear.linear_act(nested.detach().requires_grad_(requires_grad), W, B, "relu", 0.01)
    with pytest.raises(ValueError, match=r"grad is a nested tensor"):
        torch.ops.fusedlinear.linear_act_backward(nested, nested, nested, W, "relu", 0.01, [True] * 3)


def test_op_slope_is_a_float_by_its_schema():
    """The op's schema says ``float negative_slope``: the dispatcher converts a 0-d tensor to a float
    before any kernel runs (as for every ATen op with a float argument), so the op cannot see it to
    refuse it; it computes with that value, equal to fused_linear with float(slope). fused_linear and
    FusedLinearFunction.apply, which can see it, refuse it (test_slope_must_be_a_number)."""
    slope = torch.tensor(0.25)
    got = torch.ops.fusedlinear.linear_act(X, W, B, "leaky_relu", slope)[0]
    torch.testing.assert_close(got, fused_linear(X, W, B, "leaky_relu", 0.25), rtol=0, atol=0)


# ---- the fast checks never pass what the full checks refuse --------------------------------------


def _variants():
    """(input, weight, bias, activation, slope): one valid call on CUDA tensors (fake: this build
    has no CUDA) and one on CPU tensors, and each with one thing wrong. Every tensor is made new
    (views of a fake CUDA tensor need a CUDA build)."""
    for device in ("cuda", "cpu"):
        def e(*shape, dtype=torch.float32, on=device):
            return torch.empty(shape, dtype=dtype, device=on)

        x, w, b = e(4, 3), e(5, 3), e(5)
        yield x, w, b, "relu", 0.01
        for other in ("cuda:1", "meta", "cpu" if device == "cuda" else "cuda"):
            yield x, e(5, 3, on=other), b, "relu", 0.01
            yield x, w, e(5, on=other), "relu", 0.01
            yield e(4, 3, on=other), w, b, "relu", 0.01
        yield e(4, 3, dtype=torch.float64), w, b, "relu", 0.01
        yield x, w, e(5, dtype=torch.float64), "relu", 0.01
        yield e(4, 3, dtype=torch.int64), e(5, 3, dtype=torch.int64), e(5, dtype=torch.int64), "relu", 0.01
        yield x, e(5, 2), b, "relu", 0.01
        yield x, w, e(4), "relu", 0.01
        yield x, e(15), b, "relu", 0.01
        yield x, w, b, "swish", 0.01
        yield x, w, b, "leaky_relu", "0.1"
        if device == "cpu":
            yield x.to_sparse(), w, b, "relu", 0.01
            yield x, w, b.to_sparse(), "relu", 0.01


def test_fast_checks_agree_with_the_full_ones():
    """_valid (forward) and _valid_backward take CPU and CUDA tensors on one device alike; whatever
    they pass, the full checks (which name the problem) pass too, and what they refuse goes there."""
    from fusedlinear.torch_ext import ops

    passed = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        for x, w, b, activation, slope in _variants():
            if ops._valid(x, w, b, activation, slope):
                passed.append(x.device)
                ops._check(x, w, b, activation, slope, rows=True)  # must not raise
                grad = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
                assert ops._valid_backward(grad, grad, x, w, activation, slope, [True] * 3)
                for bad in (torch.empty(x.shape[0], 1, device=x.device), torch.empty(grad.shape, device="meta"),
                            torch.empty(grad.shape, dtype=torch.float64, device=x.device)):
                    assert not ops._valid_backward(bad, grad, x, w, activation, slope, [True] * 3)
                    with pytest.raises((TypeError, ValueError)):
                        ops._check_op_backward(bad, grad, x, w, activation, slope, [True] * 3)
            else:
                with pytest.raises((TypeError, ValueError, RuntimeError)):
                    ops._check(x, w, b, activation, slope, rows=True)
    assert [d.type for d in passed] == ["cuda", "cpu"]  # the valid call on each device, nothing else


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
    # float16/bfloat16: a few roundings to 11/8 significant bits of O(1) values (see test_dispatch's
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


def test_fused_linear_on_meta_tensors():
    x, w = torch.randn(2, 4, device="meta"), torch.randn(5, 4, device="meta")
    assert fusedlinear.fused_linear(x, w, None, "relu").shape == F.linear(x, w).shape
    layer = fusedlinear.FusedLinearMish(4, 5, device="meta")
    assert layer(x).shape == (2, 5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu"])
def test_meta_tensors_behave_as_f_linear_does(activation):
    """Shapes, dtype, device and gradients' shapes as F.linear + activation give them on meta
    (accelerate's init_empty_weights, torch.device('meta')), for fused_linear, fused_chain, modules."""
    w1, b1 = torch.randn(5, 4, device="meta", requires_grad=True), torch.randn(5, device="meta", requires_grad=True)
    w2 = torch.randn(3, 5, device="meta", dtype=torch.float32, requires_grad=True)
    x = torch.randn(2, 7, 4, device="meta", requires_grad=True)
    ref = F.linear(F.relu(F.linear(x, w1, b1)), w2)
    for out in (fusedlinear.fused_linear(fusedlinear.fused_linear(x, w1, b1, activation), w2, None, "identity"),
                fusedlinear.fused_chain(x, [(w1, b1, activation, 0.01), (w2, None, "identity", 0.0)])):
        assert (out.shape, out.dtype, out.device) == (ref.shape, ref.dtype, ref.device)
        out.sum().backward()
        assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and b1.grad.shape == b1.shape
        assert x.grad.device.type == "meta"
    y = fusedlinear.fused_linear(x.double(), w1.double(), None, activation)
    assert y.dtype == torch.float64 and y.shape == (2, 7, 5)
