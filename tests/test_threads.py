"""Concurrency: Python threads calling fused layers at once, each call running the OpenMP team
itself; and DataLoader worker processes calling them (forked after the team started)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fusedlinear
from conftest import assert_close, make_inputs, reference, torch_threads

# Above kernels.tiling.CPU_PARALLEL_MIN_FLOP (2 MFLOP): 2 * 150 * 96 * 80 = 2.3 MFLOP per GEMM, so
# every forward and backward runs on PyTorch's OpenMP team, not on the calling thread.
ROWS, K, N = 150, 96, 80


def _forward_backward(seed, dtype, activation):
    """Output and every gradient of three fused calls (the last one kept) and of float64 PyTorch."""
    x, w, b = make_inputs((ROWS + seed,), K, N, dtype, seed=seed)
    grad = torch.randn(ROWS + seed, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(3):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        out = fusedlinear.fused_linear(*leaves, activation, 0.2)
        out.backward(grad.to(dtype))
    refs = [t.double().requires_grad_(True) for t in (x, w, b)]
    ref = reference(*refs, activation, 0.2)
    ref.backward(grad)
    return [out.detach()] + [t.grad for t in leaves], [ref.detach()] + [t.grad for t in refs]


@pytest.mark.parametrize("team", [1, 2, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_eight_threads_forward_backward_agree(team, dtype, backends_ran):
    """8 Python threads, each with its own shapes and activation, each call on a team of ``team``
    OpenMP threads (more than the 2 cores is allowed): output, dX, dW and db against float64
    PyTorch, with the tolerances of conftest.TOL (the only difference is summation order)."""
    activations = list(fusedlinear.ACTIVATIONS)
    with torch_threads(team), ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(_forward_backward, i, dtype, activations[i % len(activations)]) for i in range(8)]
        results = [job.result(timeout=300) for job in jobs]  # re-raises a thread's exception here
    for got, want in results:
        for name, g, r in zip(("output", "dX", "dW", "db"), got, want):
            assert_close(g, r, dtype, name)
    assert {name for name, _ in backends_ran} == {"numba"}


class _Rows(torch.utils.data.Dataset):
    """Item i: the fused layer's output and every gradient for input rows of seed i, computed in
    the worker process."""

    def __init__(self, layer):
        self.layer = layer

    def __len__(self):
        return 6

    def __getitem__(self, i):
        x, grad = _item_inputs(i)
        x.requires_grad_(True)
        self.layer.zero_grad(set_to_none=True)
        self.layer(x).backward(grad)
        with torch.no_grad():
            out = self.layer(x.detach())
        return out, x.grad, self.layer.weight.grad, self.layer.bias.grad


def _item_inputs(i):
    g = torch.Generator().manual_seed(i)
    return (torch.randn(64, 200, generator=g, dtype=torch.float64),
            torch.randn(64, 150, generator=g, dtype=torch.float64))


class _Constant(torch.utils.data.Dataset):
    """Item i: the fused layer's output (no gradient) for 4 rows of the value i, in the worker."""

    def __init__(self, layer):
        self.layer = layer

    def __len__(self):
        return 8

    def __getitem__(self, i):
        with torch.no_grad():
            return self.layer(torch.full((4, 200), float(i), dtype=torch.float64))


def test_dataloader_workers_match_pytorch_float64():
    """Workers forked after the parent started the OpenMP team (so they run the kernels on their
    calling thread) compute output and every gradient like float64 PyTorch, and batches of their
    outputs (default collation) equal the parent's own calls."""
    layer = fusedlinear.FusedLinearTanh(200, 150).double()
    with torch_threads(2):  # 2 * 64 * 200 * 150 = 3.8 MFLOP: the parent's call runs the team
        x, grad = _item_inputs(100)
        w, b = (layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True))
        out = layer(x)
        out.backward(grad)
        ref = reference(x, w, b, "tanh")
        ref.backward(grad)
        for name, g, r in zip(("output", "dW", "db"), (out.detach(), layer.weight.grad, layer.bias.grad),
                              (ref.detach(), w.grad, b.grad)):
            assert_close(g, r, torch.float64, f"parent {name}")
        loader = torch.utils.data.DataLoader(_Rows(layer), batch_size=None, num_workers=2)
        items = list(loader)
        batches = torch.cat(list(torch.utils.data.DataLoader(_Constant(layer), batch_size=2, num_workers=2)))
    assert len(items) == 6
    for i, got in enumerate(items):
        x, grad = _item_inputs(i)
        x.requires_grad_(True)
        w, b = (layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True))
        ref = reference(x, w, b, "tanh")
        ref.backward(grad)
        for name, g, r in zip(("output", "dX", "dW", "db"), got, (ref.detach(), x.grad, w.grad, b.grad)):
            assert_close(g, r, torch.float64, f"item {i} {name}")
    with torch.no_grad():
        want = torch.cat([layer(torch.full((4, 200), float(i), dtype=torch.float64)) for i in range(8)])
    torch.testing.assert_close(batches.reshape(want.shape), want)
