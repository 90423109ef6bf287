"""Lifetimes: every buffer a CPU kernel reads through a raw address outlives the kernel call.

Run under MALLOC_PERTURB_=165 (as .ci/run does) a use-after-free reads 0x5a... garbage; without
it, glibc's free-list pointers still overwrite the first bytes of a freed block, so these tests
fail on a dangling address either way.
"""

import tracemalloc

import pytest
import torch
import torch.nn.functional as F

import fusedlinear
from conftest import assert_close, make_inputs, reference
from fusedlinear.backend import numba_cpu

# Large enough for several output tiles, small enough to stay quick.
M, K, N = 37, 40, 20


def _fused(activation, slope=0.01):
    return lambda x, w, b: fusedlinear.fused_linear(x, w, b, activation, slope)


def _check_strided(dtype, activation, weight_view, bias_view, w_cols, b_len):
    """fused_linear on views of W and b (the leaves hold the full tensors) against float64
    PyTorch: output and every gradient, three times (the later calls may find a kept plan)."""
    x, w_full, b_full = make_inputs((M,), w_cols, b_len, dtype)
    x = x[:, :K].contiguous()
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_full, b_full)]
        refs = [t.detach().double().requires_grad_(True) for t in (x, w_full, b_full)]
        w, b = weight_view(leaves[1]), bias_view(leaves[2])
        assert not (w.is_contiguous() and b.is_contiguous())
        out = fusedlinear.fused_linear(leaves[0], w, b, activation)
        ref = reference(refs[0], weight_view(refs[1]), bias_view(refs[2]), activation)
        assert_close(out, ref, dtype, "output")
        grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out.backward(grad.to(dtype))
        ref.backward(grad)
        for name, got, want in zip(("dX", "dW", "db"), leaves, refs):
            assert_close(got.grad, want.grad, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_strided_weight(dtype):
    """W[:, ::2] has no contiguous rows or columns: the backend copies it; the copy must live
    until the kernels (forward and backward) have returned."""
    _check_strided(dtype, "gelu", lambda w: w[:, ::2], lambda b: b, 2 * K, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_bias(dtype):
    _check_strided(dtype, "tanh", lambda w: w[:N, ::2], lambda b: b[::2], 2 * K, 2 * N)


def test_strided_weight_and_bias_in_a_chain():
    x, w_full, b_full = make_inputs((M,), 2 * K, 2 * K, torch.float64)
    x = x[:, :K].contiguous()
    w1, b1 = w_full[:K, ::2], b_full[::2]  # (K, K), (K,): both copied
    w2 = w_full[K:K + N, 1::2]
    fn = lambda x, w, b: fusedlinear.fused_chain(x, [(w, b, "silu", 0.01), (w2, None, "relu", 0.01)])
    ref = torch.relu(F.linear(F.silu(F.linear(x, w1, b1)), w2))
    torch.testing.assert_close(fn(x, w1, b1), ref, atol=1e-9, rtol=1e-9)  # float64: summation order only


def test_plan_evicted_while_its_call_runs(monkeypatch):
    """Another thread may evict every cached plan while a call is running one (a bias-free plan
    points into a zero bias it made). Simulated deterministically: the first kernel launch of the
    call first fills the plan cache with other plans, then runs."""
    x, w, _ = make_inputs((M,), K, N, torch.float32, seed=3)
    fused = _fused("relu")
    with torch.no_grad():
        fused(x, w, None)  # the plan is cached now
    launch = numba_cpu._launch
    state = {"busy": False}

    def evict_then_launch(*args):
        if not state["busy"]:
            state["busy"] = True  # the calls below launch too
            for rows in range(1, numba_cpu._MAX_PLANS + 2):
                with torch.no_grad():
                    fused(torch.ones(rows, 3), torch.ones(2, 3), None)
            junk = [torch.full((N,), 7.0e30) for _ in range(64)]  # reuse freed blocks with garbage
            del junk
            state["busy"] = False
        return launch(*args)

    monkeypatch.setattr(numba_cpu, "_launch", evict_then_launch)
    with torch.no_grad():
        got = fused(x, w, None)
    torch.testing.assert_close(got.double(), torch.relu(x.double() @ w.double().T), atol=1e-4, rtol=1e-4)  # float32, K=40


def _signbits(t):
    return torch.signbit(t).tolist()


@pytest.mark.parametrize("first, second", [(0.0, -0.0), (-0.0, 0.0)])
def test_negative_zero_slope_is_its_own_plan(first, second):
    """leaky_relu with slope -0.0 gives +0.0 for negative z (and 0.0 gives -0.0), as PyTorch does:
    the two slopes must not share a plan (they are equal as floats, not as bits)."""
    x, w, b = make_inputs((M,), K, N, torch.float64, seed=4)
    for slope in (first, second):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fusedlinear.fused_linear(xg, wg, b, "leaky_relu", slope)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = F.leaky_relu(F.linear(xr, wr, b), slope)
        assert (out < 0).sum() == 0 and (ref < 0).sum() == 0 and (ref == 0).any()
        assert _signbits(out) == _signbits(ref), f"slope {slope!r}: signs of zeros differ from PyTorch"
        grad = torch.ones_like(ref)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(wg.grad, wr.grad, atol=1e-9, rtol=1e-9)  # float64: summation order only


def test_distinct_slopes_use_bounded_memory():
    """200,000 distinct slopes (a slope swept per step) once grew an unbounded cache (+390 MB);
    the caches are bounded, so memory levels off."""
    x, w, b = make_inputs((2,), 3, 4, torch.float32, seed=5)
    with torch.no_grad():
        for i in range(300):  # warm: fill the bounded caches first
            fusedlinear.fused_linear(x, w, b, "leaky_relu", 1.0 + i * 1e-7)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(6000):
                fusedlinear.fused_linear(x, w, b, "leaky_relu", 2.0 + i * 1e-7)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    # Unbounded, each slope kept ~2 kB (12 MB here); bounded, only a full cache's worth of
    # plans, replaced, remains: well under 1 MB.
    assert grown < 1_000_000, f"{grown} bytes kept for 6000 distinct slopes"

