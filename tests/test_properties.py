"""Property-based differential suite: fused calls against float64 PyTorch, drawn by Hypothesis.

Each example draws a call — a single ``fused_linear`` or a ``fused_chain`` of 1-4 layers — over
shapes 0…600 (mostly small and odd, sometimes large, the total work capped), 0-3 leading
dimensions, operand layouts (transposed, column-strided, row-padded, at a storage offset,
expanded with stride 0), float32/float64 (bfloat16/float16 through the fallback), every
activation of the table, slopes (0, -0.0, negative, large), bias or not, any subset of
(input, weights, biases) requiring grad, and 1-4 threads; runs it on the backend under test and
compares the output and every gradient — of the operands the kernels see and of the leaves the
user holds — with the same call in float64 PyTorch from the same values.

Tolerance: the per-element error bound of :mod:`fusedlinear.parity` (the one ``fusedlinear
parity`` uses, reasons in its docstring): 8 unit roundoffs of the dtype times √L·Σ|terms| for
each sum of L products, propagated through the activation, its derivative and each layer of a
chain. Values come either from a grid (multiples of 1/16: every float32 product and sum is
exact, so the kernels' Z is exactly PyTorch's, ties and zeros included) or continuous.

Budget: a fixed number of examples, derandomized (the same examples on every run), so the file
runs in well under two minutes on 2 cores. ``FUSEDLINEAR_HYPOTHESIS=thorough`` draws 20× more,
randomly (for hunting, not CI).
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedlinear
from fusedlinear import parity
from fusedlinear.kernels import activations as act_table

ACTIVATIONS = act_table.NAMES  # read from the table: a new activation is drawn without editing this file
THOROUGH = os.environ.get("FUSEDLINEAR_HYPOTHESIS") == "thorough"
MAX_WORK = 3_000_000  # multiply-adds per call (rows·K·N summed over layers): bounds every example's cost


def budget(examples):
    return settings(max_examples=examples * (20 if THOROUGH else 1), deadline=None, derandomize=not THOROUGH,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Sizes 0…600, biased toward small and odd sizes and tile edges, with occasional large ones.
sizes = st.one_of(st.integers(0, 9), st.integers(1, 9), st.integers(10, 70),
                  st.sampled_from([63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513]), st.integers(0, 600))
SLOPES = [0.0, -0.0, 0.01, 0.2, 1.0, -0.5, 3.0, -7.0, 1e3, -1e4]
LAYOUTS = ["contiguous", "transposed", "strided", "padded", "offset", "expanded"]


@st.composite
def layouts(draw, shape):
    """(leaf shape, view): a leaf the user holds and the view of it the call receives (with ``shape``)."""
    kind = draw(st.sampled_from(LAYOUTS))
    shape = tuple(shape)
    if kind == "transposed" and len(shape) > 1:  # every dimension reversed: column-major
        dims = tuple(range(len(shape) - 1, -1, -1))
        return kind, shape[::-1], lambda t: t.permute(dims)
    if kind == "strided":  # the last dimension with step 2 or 3, at an offset
        step = draw(st.integers(2, 3))
        off = draw(st.integers(0, step - 1))
        return kind, shape[:-1] + (shape[-1] * step,), lambda t: t[..., off::step]
    if kind == "padded":  # rows padded (leading dimension > columns), at an offset
        pad = draw(st.integers(1, 5))
        off = draw(st.integers(0, pad))
        return kind, shape[:-1] + (shape[-1] + pad,), lambda t: t[..., off:off + shape[-1]]
    if kind == "offset":  # contiguous at a storage offset
        off = draw(st.integers(1, 7))
        return kind, (off + math.prod(shape),), lambda t: t[off:].view(shape)
    if kind == "expanded":  # stride 0 along one dimension (rows, columns, or a leading one)
        dim = draw(st.integers(0, len(shape) - 1))
        return kind, shape[:dim] + (1,) + shape[dim + 1:], lambda t: t.expand(shape)
    return "contiguous", shape, lambda t: t


@st.composite
def calls(draw, dtypes, max_layers=4):
    """A whole call: dtype, input shape and layout, layers, requires_grad flags, threads, data."""
    dtype = draw(st.sampled_from(dtypes))
    half = dtype in parity.HALF_DTYPES
    n_lead = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
    lead = [draw(sizes)] + [draw(st.integers(0, 4)) for _ in range(n_lead - 1)] if n_lead else []
    widths = [draw(sizes) for _ in range(1 + draw(st.integers(1, max_layers)))]  # K, then each out_features
    work = lambda: math.prod(lead) * sum(a * b for a, b in zip(widths, widths[1:]))  # noqa: E731
    while work() > MAX_WORK:  # shrink the largest dimension until the call is cheap enough
        if lead and max(lead) > 1 and max(lead) >= max(widths):
            lead[lead.index(max(lead))] //= 2
        else:
            widths[widths.index(max(widths))] //= 2
    layers = []
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        slopes = [s for s in SLOPES if abs(s) <= 10] if half else SLOPES  # half dtypes overflow at 1e4
        layers.append(dict(
            k=k, n=n, activation=draw(st.sampled_from(ACTIVATIONS)), slope=draw(st.sampled_from(slopes)),
            bias=draw(st.booleans()), w_layout=draw(layouts((n, k))), b_layout=draw(layouts((n,))),
            w_grad=draw(st.booleans()), b_grad=draw(st.booleans())))
    return dict(
        dtype=dtype, lead=tuple(lead), k=widths[0], layers=layers, x_layout=draw(layouts(tuple(lead) + (widths[0],))),
        x_grad=draw(st.booleans()), threads=draw(st.integers(1, 4)), grid=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)), chain_api=len(layers) > 1 or draw(st.booleans()))


def _values(shape, g, grid, scale):
    if grid:  # multiples of 1/16 in [-scale, scale]: float32 sums of their products are exact (K <= 600)
        steps = max(1, round(16 * scale))
        return torch.randint(-steps, steps + 1, shape, generator=g, dtype=torch.int64).double() / 16
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale * math.sqrt(3)


def _adjoint(view, leaf_shape, grad):
    """The gradient a leaf gets from ``grad`` of its view (the view's backward), in float64."""
    leaf = torch.zeros(leaf_shape, dtype=torch.float64, requires_grad=True)
    return torch.autograd.grad(view(leaf), leaf, grad, allow_unused=True)[0]


def check_call(call, backend):
    """Run ``call`` on ``backend`` ("numba", "torch", or None for the default routing) and compare."""
    dtype, g = call["dtype"], torch.Generator().manual_seed(call["seed"])
    leaves, operands, views = {}, {}, {}

    def make(name, layout, scale, requires_grad):
        kind, leaf_shape, view = layout
        leaf = _values(leaf_shape, g, call["grid"], scale).to(dtype).requires_grad_(requires_grad)
        op = view(leaf)
        if requires_grad:
            op.retain_grad()
        leaves[name], operands[name], views[name] = leaf, op, (view, leaf_shape, kind)
        return op

    x = make("input", call["x_layout"], 1.0, call["x_grad"])
    layers = []
    for i, spec in enumerate(call["layers"]):
        scale = 1 / math.sqrt(max(spec["k"], 1))  # nn.Linear's initialisation: Z stays O(1)
        w = make(f"weight{i}", spec["w_layout"], scale, spec["w_grad"])
        b = make(f"bias{i}", spec["b_layout"], scale, spec["b_grad"]) if spec["bias"] else None
        layers.append((w, b, spec["activation"], spec["slope"]))
    needs_grad = any(t.requires_grad for t in leaves.values())
    out_shape = call["lead"] + (call["layers"][-1]["n"],)
    grad = _values(out_shape, g, call["grid"], 1.0).to(dtype)

    def run():
        if call["chain_api"]:
            return fusedlinear.fused_chain(x, layers)
        return fusedlinear.fused_linear(x, *layers[0])

    threads = torch.get_num_threads()
    torch.set_num_threads(call["threads"])
    try:
        with fusedlinear.use_backend(backend) if backend else _nothing():
            out = run()
            again = run()  # the same call again: a cached launch plan must give the same bits
            if needs_grad:
                out.backward(grad)
    finally:
        torch.set_num_threads(threads)
    describe = (f"{dtype} {backend or 'default'} threads={call['threads']} x{tuple(x.shape)} {views['input'][2]} "
                + " | ".join(f"{a} s={s} w{tuple(w.shape)} {views[f'weight{i}'][2]} "
                             f"{'b ' + views[f'bias{i}'][2] if b is not None else 'no bias'}"
                             for i, (w, b, a, s) in enumerate(layers)))
    assert out.shape == out_shape, f"{describe}: output shape {tuple(out.shape)}, want {out_shape}"
    assert out.dtype == dtype and out.requires_grad == needs_grad, describe
    assert torch.equal(again, out), f"{describe}: a second call differs"
    want = parity.reference(x, layers, grad if needs_grad else None)
    checks = [("output", out, *want["output"])]
    for name, leaf in leaves.items():
        if not leaf.requires_grad:
            continue
        ref, bound = want[name]
        checks.append((f"d{name} (operand)", operands[name].grad, ref, bound))
        view, leaf_shape, _ = views[name]
        tol, fanin = parity.tolerance(dtype), _adjoint(view, leaf_shape, torch.ones_like(ref))
        leaf_bound = _adjoint(view, leaf_shape, bound) + tol * fanin.sqrt() * _adjoint(view, leaf_shape, ref.abs())
        checks.append((f"d{name} (leaf)", leaf.grad, _adjoint(view, leaf_shape, ref), leaf_bound))
    for name, got, ref, bound in checks:
        error, ok, note = parity.compare(got, ref, bound, dtype)
        assert ok, f"{describe}: {name} relative error {error:.3g} > tolerance {parity.tolerance(dtype):.1e} {note}"


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


FULL = [torch.float32, torch.float64]
HALF = [torch.bfloat16, torch.float16]


@budget(120)
@given(calls(FULL, max_layers=1))
def test_numba_single_layer(call):
    check_call(call, "numba")


@budget(50)
@given(calls(FULL))
def test_numba_chain(call):
    check_call(call, "numba")


@budget(40)
@given(calls(FULL + HALF))
def test_torch_backend(call):
    check_call(call, "torch")


@pytest.mark.filterwarnings("ignore:fusedlinear. no fused kernel:RuntimeWarning")
@budget(25)
@given(calls(HALF))
def test_half_dtypes_fall_back(call):
    check_call(call, None)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("first", [0.0, -0.0])
def test_signed_zero_slope(backend, first):
    """leaky_relu with slope 0.0 gives -0.0 for a negative z, with -0.0 gives +0.0 (IEEE z·s); the
    same operands with the other slope right after must not reuse the first call's result."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    with fusedlinear.use_backend(backend):
        for slope in (first, -first):
            got = fusedlinear.fused_linear(x, w, None, "leaky_relu", slope)
            want = torch.nn.functional.leaky_relu(x.double() @ w.double().t(), slope)
            zero = want == 0
            assert zero.any() and torch.equal(got[zero].signbit(), want[zero].signbit()), (
                f"slope {slope!r} (slopes {first!r} then {-first!r}, same operands): "
                f"signs of zeros {got[zero].signbit().tolist()}, "
                f"want {want[zero].signbit().tolist()}")
