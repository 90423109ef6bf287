"""Output and every gradient of fused_linear against float64 PyTorch, on the CPU backends."""

import os
import subprocess
import sys

import pytest
import torch

import fusedlinear
from conftest import ACTIVATIONS, LAYOUTS, TOL, check_against_reference, make_inputs, reference, run_python, torch_threads

# (leading dims, K, N): 1->1 and 300->129 with B=1; odd small; 3-D and 4-D inputs; tiles with remainders; MNIST.
# (1,) x 300 -> 129: batch 1, where dW is written as an outer product instead of a BLAS call.
SHAPES = [((1,), 1, 1), ((1,), 300, 129), ((7,), 13, 5), ((2, 3), 13, 7), ((2, 3, 4), 9, 6), ((129,), 130, 3),
          ((64,), 784, 512), ((300,), 257, 131)]
IDS = ["1x1->1", "1x300->129", "7x13->5", "2x3x13->7", "2x3x4x9->6", "129x130->3", "64x784->512", "300x257->131"]


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_pytorch_float64(activation, shape, dtype, bias, backend):
    lead, k, n = shape
    x, w, b = make_inputs(lead, k, n, dtype, bias)
    with fusedlinear.use_backend(backend):
        check_against_reference(
            lambda x, w, b: fusedlinear.fused_linear(x, w, b, activation, 0.2), x, w, b, activation, 0.2
        )


@pytest.mark.parametrize("slope", [0.0, 0.01, -0.5, 2.0])
def test_leaky_relu_any_slope(slope):
    x, w, b = make_inputs((31,), 17, 9, torch.float64)
    check_against_reference(
        lambda x, w, b: fusedlinear.fused_linear(x, w, b, "leaky_relu", slope), x, w, b, "leaky_relu", slope
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation):
    x, w, b = make_inputs((4,), 6, 5, torch.float64, seed=3)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: fusedlinear.fused_linear(x, w, b, activation, 0.1), inputs, eps=1e-6, atol=1e-6
    )






@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed", "row-padded", "col-padded", "strided-cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_non_contiguous_inputs(layout, weight_layout, dtype):
    x, w, b = make_inputs((33,), 20, 11, dtype)
    assert LAYOUTS[layout](x).shape == (33, 20) and LAYOUTS[layout](x).stride() != x.stride()
    check_against_reference(
        lambda x, w, b: fusedlinear.fused_linear(x, w, b, "tanh"), x, w, b, "tanh", layout=LAYOUTS[layout],
        w_layout=LAYOUTS.get(weight_layout, lambda t: t),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_batch_one_with_strided_input(dtype):
    """Batch 1 writes dW as an outer product of a row-major X row; a strided row takes BLAS instead."""
    x, w, b = make_inputs((1,), 40, 9, dtype)
    strided = lambda t: torch.stack([t, t], dim=2).reshape(1, 80)[:, ::2]  # noqa: E731  (stride 2: read in place, transposed)
    check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "relu"), x, w, b, "relu", layout=strided)


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


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_stable_at_large_magnitudes(activation, dtype):
    """|Z| = 1e4: finite wherever PyTorch is finite, and equal to it."""
    x = torch.tensor([[1.0], [-1.0]], dtype=dtype) * 1e4
    w = torch.ones(3, 1, dtype=dtype)
    check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, activation), x, w, None, activation)
    assert torch.isfinite(fusedlinear.fused_linear(x, w, None, activation)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_falls_back_to_torch_with_a_warning(dtype, backends_ran):
    from fusedlinear import backend

    backend._warned.clear()
    x, w, b = make_inputs((8,), 16, 4, dtype)
    fusedlinear.fused_linear(x.float(), w.float(), b.float(), "gelu")  # the same call in float32 first ...
    assert backends_ran == [("numba", "forward")]
    backends_ran.clear()  # ... must not decide where the half-precision one goes
    # Against float64 PyTorch on the same (already rounded) values: the output is rounded to 8 (bf16)
    # or 11 (f16) significant bits once (2e-3 / 5e-4 relative), each gradient after dZ's rounding and
    # a 16- or 8-term product with float32 accumulation, a few roundings more: 3e-2 abs/rel covers
    # bf16 with margin (values are O(1)), and is still far below the O(1) error of a wrong formula.
    with pytest.warns(RuntimeWarning, match=str(dtype).replace("torch.", "")):
        check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "gelu"), x, w, b, "gelu",
                                tol=dict(atol=3e-2, rtol=3e-2))
    assert set(backends_ran) == {("torch", "forward"), ("torch", "backward")}


@pytest.mark.parametrize("blas", ["auto", "mkl", "openblas"])
@pytest.mark.parametrize("threads", [1, 2, 3, 4, 5])
def test_thread_counts_and_blas_choices_agree(threads, blas, monkeypatch, backends_ran):
    """The tiled (parallel), whole-matrix and single-thread paths, on either BLAS, 1-5 threads (more
    than the 2 cores is fine: the team still splits the work), float32 and float64, row-major and
    padded column-major X: output and every gradient against float64 PyTorch."""
    from fusedlinear.backend import numba_cpu

    if blas == "mkl" and "mkl" not in numba_cpu.blas_libraries():
        pytest.skip("this PyTorch has no MKL")
    monkeypatch.setattr(numba_cpu, "BLAS_CHOICE", blas)  # FUSEDLINEAR_CPU_BLAS, read at import (see below)
    with torch_threads(threads):
        # column tiles, whole-matrix BLAS calls (kernels.tiling.CPU_WHOLE_MIN_ROWS), row bands
        # (CPU_BAND_MIN_ROWS = 1024; 1031 rows leave a short last band), all above
        # CPU_PARALLEL_MIN_FLOP (2*40*190*170 = 2.6 MFLOP), so the OpenMP team runs
        for lead, dtype, layout in (((40,), torch.float64, "col-padded"), ((300,), torch.float32, "row-major"),
                                    ((1031,), torch.float64, "row-major"), ((1031,), torch.float32, "col-padded")):
            x, w, b = make_inputs(lead, 190, 170, dtype, seed=threads)
            check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "silu"), x, w, b, "silu",
                                    layout=LAYOUTS.get(layout, lambda t: t))
    assert set(backends_ran) == {("numba", "forward"), ("numba", "backward")}


def test_cpu_calls_are_bitwise_repeatable():
    x, w, b = make_inputs((300,), 257, 129, torch.float32)
    w.requires_grad_(True)
    runs = []
    for _ in range(3):
        w.grad = None
        out = fusedlinear.fused_linear(x, w, b, "gelu")
        out.square().sum().backward()
        runs.append((out.detach().clone(), w.grad.clone()))
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


# ---- ties: Z exactly 0 -------------------------------------------------------------------------
# PyTorch's value and derivative at z = ±0 (float32 and float64 alike): relu 0 and 0, leaky_relu 0
# and the slope, sigmoid 0.5 and 0.25, tanh 0 and 1, gelu/gelu_tanh/silu 0 and 0.5. A formula that
# selects with >= where PyTorch uses > (or the reverse) differs only here.
G_AT_ZERO = {"identity": 0.0, "relu": 0.0, "sigmoid": 0.5, "tanh": 0.0, "gelu": 0.0, "gelu_tanh": 0.0,
             "silu": 0.0, "leaky_relu": 0.0, "quick_gelu": 0.0, "gelu_fast": 0.0, "relu6": 0.0, "relu2": 0.0,
             "hardswish": 0.0, "hardsigmoid": 0.5, "mish": 0.0, "softplus": 0.6931471805599453}  # log 2, rounded to the dtype


def tie_inputs(m, k, n, dtype, bias, seed=5):
    """X, W, b with many entries of Z = X Wᵀ + b exactly ±0: small integers and halves (every
    product and sum exact in float32), b_j = -(X Wᵀ)[j mod m, j] so each column has a zero, the last
    two weight rows +0 and -0 (with b = -0 and +0: whole columns of zeros), and a row of X of -0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (m, k), generator=g).double()
    w = torch.randint(-2, 3, (n, k), generator=g).double() * 0.5
    x[1] = -0.0
    w[-1], w[-2] = 0.0, -0.0
    b = None
    if bias:
        b = -(x @ w.T)[torch.arange(n) % m, torch.arange(n)]
        b[-1], b[-2] = -0.0, 0.0
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (exact: small integers and halves)
    return cast(x), cast(w), cast(b)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(12, 7, 10), (70, 40, 400)], ids=["serial", "parallel"])  # 2.2 MFLOP: the team runs
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ties_at_zero_match_pytorch(activation, shape, dtype, bias, backend, backends_ran):
    m, k, n = shape
    x, w, b = tie_inputs(m, k, n, dtype, bias)
    z = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    ties = z == 0
    assert ties.sum() >= 2 * m, "the inputs must put Z exactly on 0"
    with fusedlinear.use_backend(backend):
        out = fusedlinear.fused_linear(x, w, b, activation, 0.2)
        # the value at a tie, exactly (±0 compare equal: PyTorch's own sign of a zero output is not
        # consistent, e.g. gelu(-0.0) is +0 in float32 and -0 in float64)
        assert (out[ties] == G_AT_ZERO[activation]).all()
        check_against_reference(
            lambda x, w, b: fusedlinear.fused_linear(x, w, b, activation, 0.2), x, w, b, activation, 0.2
        )
    assert {name for name, _ in backends_ran} == {backend}


# ---- the backend that runs ---------------------------------------------------------------------


def test_environment_variable_forces_the_backend_that_runs(monkeypatch, backends_ran):
    x, w, b = make_inputs((9,), 8, 7, torch.float64)
    check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "gelu"), x, w, b, "gelu")
    assert backends_ran == [("numba", "forward"), ("numba", "backward")]
    backends_ran.clear()
    monkeypatch.setenv("FUSEDLINEAR_BACKEND", "torch")
    check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "gelu"), x, w, b, "gelu")
    assert backends_ran == [("torch", "forward"), ("torch", "backward")]


def test_use_backend_nests_and_restores_after_an_exception(backends_ran):
    x, w, b = make_inputs((5,), 4, 3, torch.float64)

    def ran(expected):
        fusedlinear.fused_linear(x, w, b, "relu")
        assert backends_ran.pop() == (expected, "forward")

    ran("numba")
    with fusedlinear.use_backend("torch"):
        ran("torch")
        with fusedlinear.use_backend("numba"):
            ran("numba")
            with pytest.raises(ZeroDivisionError):
                with fusedlinear.use_backend("torch"):
                    ran("torch")
                    1 / 0
            ran("numba")  # the inner block's exception restored its outer choice
        ran("torch")
    ran("numba")




# A fused layer in a fresh process (the BLAS choice is read once, at the first fused call): the
# largest difference of output and dW from float64 PyTorch, at 40 rows (below 64: MKL's range in
# "auto" on AVX2) and 300 rows (OpenBLAS's), on 2 threads.
_BLAS_CHECK = """
import torch, fusedlinear
torch.set_num_threads(2)
torch.manual_seed(0)
worst = 0.0
for rows in (40, 300):
    x, w = torch.randn(rows, 190), torch.randn(170, 190, requires_grad=True)
    out = fusedlinear.fused_linear(x, w, None, "tanh")
    out.sum().backward()
    wr = w.detach().double().requires_grad_(True)
    ref = torch.tanh(x.double() @ wr.T)
    ref.sum().backward()
    worst = max(worst, (out.double() - ref).abs().max().item(), (w.grad.double() - wr.grad).abs().max().item())
print(worst)
"""


@pytest.mark.parametrize("blas", ["mkl", "openblas"])
def test_cpu_blas_environment_variable(blas):
    """FUSEDLINEAR_CPU_BLAS in a real process (it is read once, not per call): the kernels compute the
    right thing with it, and `fusedlinear info` names the forced library at every batch size."""
    from fusedlinear.backend import numba_cpu

    if blas == "mkl" and "mkl" not in numba_cpu.blas_libraries():
        pytest.skip("this PyTorch has no MKL")
    out = run_python(_BLAS_CHECK + "from fusedlinear.cli import main; main(['info'])", FUSEDLINEAR_CPU_BLAS=blas)
    assert out.returncode == 0, out.stderr[-2000:]
    worst, info = out.stdout.split("\n", 1)
    # float32, K = 190 terms of N(0,1) products: |error| ~ sqrt(190) * 6e-8 * 190 ~ 2e-4 at most
    assert float(worst) < 1e-3, worst
    (line,) = [line for line in info.splitlines() if "BLAS per tile" in line]
    assert line.split(": ", 1)[1].startswith({"mkl": "MKL (PyTorch's)", "openblas": "OpenBLAS (scipy's"}[blas])
    assert " below " not in line  # one library at every batch size


def test_cpu_blas_environment_variable_rejects_an_unknown_library():
    out = run_python("import torch, fusedlinear; fusedlinear.fused_linear(torch.randn(3, 4), torch.randn(2, 4))",
                      FUSEDLINEAR_CPU_BLAS="cublas")
    assert out.returncode != 0 and "FUSEDLINEAR_CPU_BLAS='cublas'" in out.stderr and "openblas" in out.stderr


# X (1, 2^31) and W (1, 2^31) float32 on one 8 GiB anonymous mapping that is never written (mmap
# gives zero pages: nothing is allocated unless something writes it; no malloc, so MALLOC_PERTURB_
# does not touch it either). K = 2^31 does not fit BLAS's 32-bit integers.
_HUGE_K = """
import mmap, torch, fusedlinear
k = 2**31
buf = mmap.mmap(-1, 4 * k, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
x = torch.frombuffer(buf, dtype=torch.float32, count=k).view(1, k)
print("result:", fusedlinear.fused_linear(x, x, None, "relu").tolist())
"""


def test_dimensions_beyond_32_bit_blas_run_through_torch():
    """K = 2^31 never reaches BLAS's 32-bit sizes: the call runs as plain torch ops (one warning
    naming the limit) and gives relu(0 . 0) = 0 for the zero pages."""
    out = run_python(_HUGE_K)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "result: [[0.0]]", out.stdout
    assert "32-bit" in out.stderr, out.stderr[-2000:]


# ---- launch plans: cached per call signature, never a stale one --------------------------------


def test_more_signatures_than_the_plan_cache_holds_stay_exact():
    """200 distinct call signatures (2 plans each, forward and backward: more than the 256 the
    backend keeps), then the first ones again: every result still against float64 PyTorch."""
    x, w, b = make_inputs((40,), 6, 5, torch.float64)
    signatures = [(rows, act) for rows in range(1, 41) for act in ACTIVATIONS[:5]]
    for rows, act in signatures:
        slope = 0.1
        check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, act, slope),
                                x[:rows], w, b, act, slope)
    for rows in (1, 7, 40):
        check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "gelu"), x[:rows], w, b, "gelu")


def test_same_shape_with_other_strides_gets_its_own_plan():
    """One weight, one input shape, three memory layouts of X one after another: a plan made for one
    layout must not serve another."""
    x, w, b = make_inputs((33,), 20, 11, torch.float64)
    for _ in range(2):
        for layout in ("row-major", "transposed", "col-padded", "row-padded"):
            check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "sigmoid"), x, w, b, "sigmoid",
                                    layout=LAYOUTS.get(layout, lambda t: t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_copied_weight_is_not_kept_across_updates(dtype):
    """A weight with strided columns and a strided bias are copied for the kernels; after an in-place
    update of them (an optimizer step) the next call must see the new values, not an earlier copy
    (and the copies must live as long as the call that reads them)."""
    x, w, b = make_inputs((17,), 12, 9, dtype)
    storage, b_storage = torch.stack([w, w], dim=2).reshape(9, 24), torch.stack([b, b], dim=1).reshape(18)
    strided, b_strided = storage[:, ::2], b_storage[::2]  # the values of w and b, stride 2: copied
    for step in range(3):
        for bias in (b_strided, None):
            torch.testing.assert_close(fusedlinear.fused_linear(x, strided, bias, "tanh").double(),
                                       reference(x.double(), strided.double(), None if bias is None else bias.double(),
                                                 "tanh"), **TOL[dtype])
        with torch.no_grad():
            storage.mul_(0.5).add_(0.25)
            b_storage.add_(1.0)
