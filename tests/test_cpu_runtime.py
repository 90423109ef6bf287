"""backend/cpu_runtime.py, the process state the CPU kernels depend on: a forked child (of a
parent that ran the OpenMP pool, or whose PyTorch did) runs the kernels on one thread, warns once,
is right, and never hangs."""

import multiprocessing
import os
import warnings

import pytest
import torch

import fusedlinear
from conftest import make_inputs, reference, run_python
from fusedlinear import backend

# A fresh process forks after its parent (below: ``before_fork``) started an OpenMP pool; the child
# makes a fused call on the parallel path (2*96*200*150 flops) and exits 0 only if it is right and
# warned once that it was forked. Its status is printed: -14 is the alarm's kill (a hung child).
_FORK_CHILD = r"""
import os, signal, warnings
import torch, torch.nn.functional as F
import fusedlinear
torch.set_num_threads(2)
torch.manual_seed(0)
x, w, b = torch.randn(96, 200, dtype=torch.float64), torch.randn(150, 200, dtype=torch.float64), torch.randn(150, dtype=torch.float64)
ref = F.gelu(F.linear(x, w, b))  # float64 PyTorch
BEFORE_FORK
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a hung child (GOMP_parallel waiting for threads it does not have) dies
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = fusedlinear.fused_linear(x, w, b, "gelu")  # the parallel path
    ok = torch.allclose(out, ref, atol=1e-10, rtol=1e-10)  # float64: summation order only
    warned = sum("forked" in str(c.message) for c in caught)
    os._exit(0 if ok and warned == 1 else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def assert_forked_child_runs(before_fork):
    """Run _FORK_CHILD with ``before_fork`` (code) in the parent: the child is right, warned once, not hung."""
    out = run_python(_FORK_CHILD.replace("BEFORE_FORK", before_fork))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "child 0", (out.stdout, out.stderr[-2000:])  # -14: killed by the alarm (hung)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.skipif(backend.select(torch.device("cpu"), torch.float32) != "numba", reason="the numba backend is not the CPU backend here")
def test_forked_child_repeating_the_parents_parallel_call_does_not_hang():
    """The parent ran this very call on its OpenMP pool, so its launch plan is cached; the forked
    child repeats it (the parent's cached plan's key). The at-fork hook (backend.FORK) must make the
    child run on one thread: without it the child finds the parent's plan and waits in GOMP_parallel
    for threads it does not have."""
    assert_forked_child_runs("""
with torch.no_grad():
    first = fusedlinear.fused_linear(x, w, b, "gelu")  # the parallel (OpenMP) path
assert torch.allclose(first, ref, atol=1e-10, rtol=1e-10)
""")


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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_after_pytorch_started_the_pool():
    """PyTorch (not fusedlinear) started the OpenMP pool before the fork: the child's fused call
    must not wait for the pool's threads (they were not forked); it runs on one thread, warns once
    and is right."""
    # ref above, float64 PyTorch, started PyTorch's OpenMP pool; a parallel PyTorch op: its threads exist now
    assert_forked_child_runs("(torch.randn(4_000_000) + 1).exp_().sum()")
