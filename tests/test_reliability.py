"""Faults: unusable JIT caches, fork after use, and the determinism of the CPU path."""

import multiprocessing
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fusedlinear
from conftest import make_inputs, reference, run_python

# Large enough for the parallel (OpenMP) path: kernels.tiling.CPU_PARALLEL_MIN_FLOP
SHAPE = ((96,), 200, 150)


def _forward_backward(seed):
    x, w, b = make_inputs(*SHAPE, torch.float64, seed=seed)
    w.requires_grad_(True)
    out = fusedlinear.fused_linear(x, w, b, "gelu")
    out.sum().backward()
    wr = w.detach().clone().requires_grad_(True)
    ref = reference(x, wr, b, "gelu")
    ref.sum().backward()
    return bool(torch.allclose(out, ref, atol=1e-10) and torch.allclose(w.grad, wr.grad, atol=1e-10))


def _child(seed):
    torch.set_num_threads(1)  # what DataLoader workers do
    return _forward_backward(seed)


def _child_two_threads(seed):
    # Only the fused forward here: PyTorch's own multi-threaded ops (its OpenMP pool) hang in a
    # forked child, which is why DataLoader workers run with one thread.
    torch.set_num_threads(2)
    x, w, b = make_inputs(*SHAPE, torch.float64, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = fusedlinear.fused_linear(x, w, b, "gelu")
    return out.tolist(), any("forked" in str(w.message) for w in caught)  # plain data back, no shared tensors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_after_use():
    assert _forward_backward(0)  # the parent has started the OpenMP pool
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        assert pool.map(_child, [1, 2], chunksize=1) == [True, True]
    with ctx.Pool(1) as pool:  # a child asking for 2 threads runs the kernels on 1, and says why
        out, warned = pool.apply_async(_child_two_threads, (3,)).get(timeout=120)
    x, w, b = make_inputs(*SHAPE, torch.float64, seed=3)
    torch.testing.assert_close(torch.tensor(out, dtype=torch.float64), reference(x, w, b, "gelu"), atol=1e-10, rtol=1e-10)
    assert warned


def test_dataloader_workers_calling_fused_layers():
    layer = fusedlinear.FusedLinearTanh(200, 150).double()

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            with torch.no_grad():
                return layer(torch.full((4, 200), float(i), dtype=torch.float64))

    assert _forward_backward(0)
    loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2)
    got = torch.cat(list(loader))
    with torch.no_grad():
        want = torch.cat([layer(torch.full((4, 200), float(i), dtype=torch.float64)) for i in range(8)])
    torch.testing.assert_close(got.reshape(want.shape), want)




def test_impossible_cache_locations_still_work():
    """NUMBA_CACHE_DIR and HOME that cannot be written: the kernels fall back and still compute."""
    code = ("import torch, fusedlinear; x = torch.randn(5, 7, dtype=torch.float64); w = torch.randn(3, 7, dtype=torch.float64); "
            "print(torch.allclose(fusedlinear.fused_linear(x, w, None, 'relu'), torch.relu(x @ w.T)))")
    out = run_python(code, NUMBA_CACHE_DIR="/proc/fusedlinear-no-cache", HOME="/proc/fusedlinear-no-home")
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_no_cache_location_at_all_warns_once_and_works(monkeypatch):
    from numba.core import caching

    from fusedlinear.kernels import cpu

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    with pytest.warns(RuntimeWarning, match="no writable Numba cache location"):
        assert cpu._cache_available() is False


def test_cpu_path_is_deterministic_across_processes():
    code = ("import torch, fusedlinear, hashlib; torch.manual_seed(0); x = torch.randn(300, 257); "
            "w = torch.randn(129, 257, requires_grad=True); out = fusedlinear.fused_linear(x, w, None, 'silu'); "
            "out.square().sum().backward(); print(hashlib.sha256(out.detach().numpy().tobytes() + "
            "w.grad.numpy().tobytes()).hexdigest())")
    first, second = run_python(code), run_python(code)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout


def test_launch_plans_keep_no_weight_alive():
    """The CPU backend caches launch plans by call signature; a plan must not keep the caller's
    weight (or bias) alive after the model is gone."""
    import gc
    import weakref

    w = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    fusedlinear.fused_linear(torch.randn(8, 32), w, b, "relu").sum().backward()
    refs = [weakref.ref(w), weakref.ref(b)]
    del w, b
    gc.collect()
    assert all(r() is None for r in refs)


_FORK_AFTER_TORCH_POOL = r"""
import os, signal, warnings
import torch, torch.nn.functional as F
import fusedlinear
torch.set_num_threads(2)
torch.manual_seed(0)
x, w, b = torch.randn(96, 200, dtype=torch.float64), torch.randn(150, 200, dtype=torch.float64), torch.randn(150, dtype=torch.float64)
ref = F.gelu(F.linear(x, w, b))  # float64 PyTorch; with the line below it starts PyTorch's OpenMP pool
(torch.randn(4_000_000) + 1).exp_().sum()  # a parallel PyTorch op: the pool's threads exist now
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a hung child (GOMP_parallel waiting for threads it does not have) dies
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = fusedlinear.fused_linear(x, w, b, "gelu")  # 2*96*200*150 flops: the parallel path
    ok = torch.allclose(out, ref, atol=1e-10, rtol=1e-10)  # float64: summation order only
    warned = sum("forked" in str(c.message) for c in caught)
    os._exit(0 if ok and warned == 1 else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_after_pytorch_started_the_pool():
    """PyTorch (not fusedlinear) started the OpenMP pool before the fork: the child's fused call
    must not wait for the pool's threads (they were not forked); it runs on one thread, warns once
    and is right."""
    out = run_python(_FORK_AFTER_TORCH_POOL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "child 0", (out.stdout, out.stderr[-2000:])  # -14: killed by the alarm (hung)
