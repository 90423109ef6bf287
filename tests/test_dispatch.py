"""Backend dispatch: use_backend across threads, layouts the kernels cannot take, the CPU BLAS
choice (FUSEDLINEAR_CPU_BLAS, for real in a fresh process) and BLAS's 32-bit limit."""

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedlinear
from conftest import assert_close, make_inputs, reference, run_python
from fusedlinear import backend
from fusedlinear.backend import numba_cpu

# ---- use_backend -----------------------------------------------------------------------------


def test_use_backend_nests_and_restores_after_an_exception():
    assert backend._forced is None
    with fusedlinear.use_backend("torch"):
        with pytest.raises(ZeroDivisionError):
            with fusedlinear.use_backend("numba"):
                assert backend.forced_backend() == "numba"
                1 / 0
        assert backend.forced_backend() == "torch"
    assert backend._forced is None


def _run_in_thread(fn):
    t = threading.Thread(target=fn)
    t.start()
    return t


def test_use_backend_blocks_overlapping_across_threads():
    """T1 enters "torch", T2 enters "numba", T1 exits (T2 still open: "numba" stays), T2 exits:
    nothing is forced. Exiting restored the previous value before, leaving "torch" forced."""
    steps = {name: threading.Event() for name in ("t1_in", "t2_in", "t1_out", "t2_out")}
    seen = {}

    def t1():
        with fusedlinear.use_backend("torch"):
            steps["t1_in"].set()
            steps["t2_in"].wait(10)
        seen["after_t1"] = backend._forced
        steps["t1_out"].set()

    def t2():
        steps["t1_in"].wait(10)
        with fusedlinear.use_backend("numba"):
            steps["t2_in"].set()
            steps["t1_out"].wait(10)
        steps["t2_out"].set()

    threads = [_run_in_thread(t1), _run_in_thread(t2)]
    for t in threads:
        t.join(20)
    assert all(e.is_set() for e in steps.values())
    assert seen["after_t1"] == "numba"  # T2's block is still open
    assert backend._forced is None and backend.forced_backend() is None


def test_use_backend_in_many_threads_leaves_nothing_forced():
    barrier = threading.Barrier(6)
    x, w, b = make_inputs((5,), 7, 3, torch.float64)

    def worker(i):
        for _ in range(50):
            with fusedlinear.use_backend(("torch", "numba")[i % 2]):
                barrier.wait(10) if _ == 0 else None
                fusedlinear.fused_linear(x, w, b, "relu")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert backend._stack == [] and backend._forced is None


# ---- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_input_computes_like_pytorch(layout):
    """Sparse inputs run through the torch backend (PyTorch's ops take them): value and dW."""
    x, w, b = make_inputs((9,), 6, 4, torch.float64, seed=2)
    x[x.abs() < 0.7] = 0
    xs = x.to_sparse() if layout == "sparse_coo" else x.to_sparse_csr()
    wg, wr = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fusedlinear.fused_linear(xs, wg, b, "tanh")
    ref = reference(x, wr, b, "tanh")
    assert_close(out, ref, torch.float64, "output")
    out.sum().backward()
    ref.sum().backward()
    assert_close(wg.grad, wr.grad, torch.float64, "dW")


@pytest.mark.parametrize("convert, name", [(lambda t: t.to_mkldnn(), "_mkldnn"),
                                           (lambda t: t.to_sparse_csc(), "sparse_csc")])
def test_other_layouts_get_a_clear_error(convert, name):
    x, w, b = make_inputs((4,), 6, 3, torch.float32)
    """The backend refuses a layout no kernel takes, naming it and the fix; the functional API
    (torch_ext) runs such an input as plain torch ops, so the user gets nn.Linear's result."""
    with pytest.raises(TypeError, match=rf"input is a {name} tensor.*input\.to_dense\(\)"):
        backend.route(convert(x), w)
    # float32 through torch's own kernels for that layout vs float64 dense: a 6-term sum
    assert_close(fusedlinear.fused_linear(convert(x), w, b, "relu").to_dense().double(),
                 torch.relu(F.linear(x.double(), w.double(), b.double())), torch.float32, "layout result")


def test_mkldnn_weight_gets_a_clear_error():
    x, w, b = make_inputs((4,), 6, 3, torch.float32)
    with pytest.raises(TypeError, match=r"weight is a _mkldnn tensor.*weight\.to_dense\(\)"):
        backend.route(x, w.to_mkldnn())


def test_batched_gradients_never_reach_a_kernel_address(monkeypatch):
    """vmap's batched tensors have no storage: the ops' registered vmap rules compute them with
    torch ops, so no kernel is handed a batched tensor's address (here: a kernel call fails)."""
    x, w, b = make_inputs((5,), 6, 3, torch.float64, seed=7)
    with torch.no_grad():
        a, z = numba_cpu.forward(x, w, b, "gelu", 0.01)

    def refuse(*args):
        raise AssertionError("a batched tensor reached the numba backend")

    monkeypatch.setattr(numba_cpu, "forward", refuse)
    monkeypatch.setattr(numba_cpu, "backward", refuse)
    grads = torch.randn(4, 5, 3, dtype=torch.float64)
    got = torch.vmap(lambda g: torch.ops.fusedlinear.linear_act_backward(g, z, x, w, "gelu", 0.01, [True] * 3))(grads)
    want = [backend.implementation("torch").backward(g, z, x, w, "gelu", 0.01, (True, True, True)) for g in grads]
    for i, name in enumerate(("dX", "dW", "db")):
        assert_close(got[i], torch.stack([v[i] for v in want]), torch.float64, name)
    xs = torch.randn(4, 5, 6, dtype=torch.float64)
    got = torch.vmap(lambda xi: torch.ops.fusedlinear.linear_act(xi, w, b, "gelu", 0.01)[0])(xs)
    assert_close(got, F.gelu(F.linear(xs, w, b)), torch.float64, "vmap forward")


# ---- BLAS ------------------------------------------------------------------------------------




_WHICH_BLAS = ("import torch, fusedlinear; from fusedlinear.backend import numba_cpu; "
               "x = torch.randn(3, 5); w = torch.randn(4, 5); "
               "ok = torch.allclose(fusedlinear.fused_linear(x, w, None, 'relu'), torch.relu(x @ w.T), atol=1e-5); "
               "print(ok, numba_cpu.blas_functions(1)['library'], numba_cpu.blas_functions(4096)['library'], sep='|')")


@pytest.mark.parametrize("choice, library", [("openblas", "OpenBLAS"), ("mkl", "MKL")])
def test_cpu_blas_environment_variable_for_real(choice, library):
    if choice == "mkl" and "mkl" not in numba_cpu.blas_libraries():
        pytest.skip("this PyTorch exports no MKL")
    out = run_python(_WHICH_BLAS, FUSEDLINEAR_CPU_BLAS=choice)
    assert out.returncode == 0, out.stderr[-2000:]
    ok, small, large = out.stdout.strip().split("|")
    assert ok == "True" and small.startswith(library) and large.startswith(library), out.stdout


def test_bad_cpu_blas_value_is_one_clear_error():
    out = run_python(_WHICH_BLAS, FUSEDLINEAR_CPU_BLAS="bogus")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "FUSEDLINEAR_CPU_BLAS='bogus'" in last and "auto, mkl, openblas" in last, out.stderr[-2000:]


def test_sizes_beyond_blas_32_bit_ints_run_through_torch(monkeypatch):
    """BLAS takes 32-bit sizes; a larger problem runs through exact PyTorch ops (warned once).
    Tested with the limit lowered: a real one needs a > 8 GB tensor."""
    monkeypatch.setattr(numba_cpu, "SIZE_MAX", 50)
    monkeypatch.setattr(backend, "_warned", set())  # backend.route warns once per process
    x, w, b = make_inputs((7,), 60, 5, torch.float64, seed=8)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="32-bit"):
        out = fusedlinear.fused_linear(xg, wg, b, "silu")
    ref_x, ref_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = reference(ref_x, ref_w, b, "silu")
    assert_close(out, ref, torch.float64, "output")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        out.sum().backward()
    ref.sum().backward()
    assert_close(xg.grad, ref_x.grad, torch.float64, "dX")
    assert_close(wg.grad, ref_w.grad, torch.float64, "dW")
