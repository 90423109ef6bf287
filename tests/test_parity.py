"""Output and every gradient of fused_linear against float64 PyTorch, on the CPU backends."""

import pytest
import torch

import fusedlinear
from conftest import ACTIVATIONS, check_against_reference, make_inputs

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


LAYOUTS = {
    # name: X (33, 20) rebuilt from a (33, 20) or (1, 20) tensor with that memory layout
    "transposed": lambda t: t.t().contiguous().t(),  # column-major: read in place, BLAS transposes
    "row-padded": lambda t: torch.cat([t, t[:, :3]], dim=1)[:, :20],  # ld = 23 > K: read in place
    "strided-cols": lambda t: torch.stack([t, t], dim=2).reshape(33, 40)[:, ::2],  # copied
    "expanded": lambda t: t[:1].expand(33, 20),  # stride-0 rows: copied
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_non_contiguous_inputs(layout, weight_layout, dtype):
    x, w, b = make_inputs((33,), 20, 11, dtype)
    if weight_layout == "transposed":
        w = w.t().contiguous().t()
    assert LAYOUTS[layout](x).shape == (33, 20)
    check_against_reference(
        lambda x, w, b: fusedlinear.fused_linear(x, w, b, "tanh"), x, w, b, "tanh", layout=LAYOUTS[layout]
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


def test_bfloat16_falls_back_to_torch_with_a_warning():
    from fusedlinear import backend

    backend._warned.clear()
    x, w, b = make_inputs((8,), 16, 4, torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        out = fusedlinear.fused_linear(x, w, b, "relu")
    from conftest import reference

    torch.testing.assert_close(out, reference(x, w, b, "relu"))


@pytest.mark.parametrize("blas", ["auto", "mkl", "openblas"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_and_blas_choices_agree(threads, blas, monkeypatch):
    """The tiled (parallel), whole-matrix and single-thread paths, on either BLAS, compute the same thing."""
    from fusedlinear.backend import numba_cpu

    if blas == "mkl" and "mkl" not in numba_cpu.blas_libraries():
        pytest.skip("this PyTorch has no MKL")
    monkeypatch.setattr(numba_cpu, "BLAS_CHOICE", blas)  # FUSEDLINEAR_CPU_BLAS, read at import
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # column tiles, whole-matrix BLAS calls (kernels.tiling.CPU_WHOLE_MIN_ROWS), row bands (CPU_BAND_MIN_ROWS)
        for lead in ((40,), (300,), (1031,)):
            x, w, b = make_inputs(lead, 190, 170, torch.float64, seed=threads)
            check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "silu"), x, w, b, "silu")
    finally:
        torch.set_num_threads(previous)


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
