"""Thread stress: several Python threads calling several fused modules at varying batch sizes at
once, with more distinct call shapes than the launch-plan cache holds (so plans are evicted
while other threads run them), every result compared bit for bit with the same call made
beforehand on the main thread alone, and each of those with float64 PyTorch.

Exact comparison is right here: a call's bits depend only on its launch plan (tiles, BLAS, the
thread count, all the same for the same call), not on which Python thread makes it — checked
first, on the main thread, by making each call twice. A freed bias or weight copy read by a
kernel usually changes only a few low bits (glibc's MALLOC_PERTURB_ fills freed memory with
tiny values, or the block is reused by another thread's tensor), which no tolerance would see.
"""

import random
import threading
import time

import torch

import fusedlinear
from fusedlinear import parity
from fusedlinear.backend import numba_cpu

PLAN_CACHE = getattr(numba_cpu, "_MAX_PLANS", 256)  # launch plans kept; fall back to the size it had
THREADS = 4
SECONDS = 20  # of concurrent calls (bounded: the whole file runs in well under a minute on 2 cores)


def _modules():
    torch.manual_seed(0)
    return [
        fusedlinear.FusedLinearReLU(256, 256, bias=False),  # the case: a kept zero bias
        fusedlinear.FusedLinear(64, 48, activation="gelu"),
        fusedlinear.FusedLinear(33, 17, activation="leaky_relu", negative_slope=0.1, bias=False),
        fusedlinear.FusedLinearTanh(40, 70),
        fusedlinear.FusedLinearSiLU(20, 130).double(),
    ]


def _grads(module, x, grad):
    out = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    return (out.detach(), *torch.autograd.grad(out, [x, *params], grad))


def test_threads_evicting_plans_give_the_single_threaded_bits():
    modules = _modules()
    batches = list(range(1, 2 + PLAN_CACHE // len(modules))) + [97, 255, 300]
    # each (module, batch) is one forward and one backward plan: more than the cache holds
    assert 2 * len(modules) * len(batches) > 2 * PLAN_CACHE
    g = torch.Generator().manual_seed(1)
    work = []
    for module in modules:
        dtype = module.weight.dtype
        for batch in batches:
            x = torch.randn(batch, module.in_features, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
            grad = torch.randn(batch, module.out_features, generator=g, dtype=torch.float64).to(dtype)
            work.append((module, x, grad))
    expected = [_grads(*item) for item in work]
    for item, want in zip(work[::7], expected[::7]):  # determinism, which exact comparison relies on
        assert all(torch.equal(a, b) for a, b in zip(_grads(*item), want)), "a repeated call differs"
    for (module, x, grad), want in zip(work[::5], expected[::5]):  # and the single-threaded results are right
        layers = [(module.weight, module.bias, module.activation, module.negative_slope)]
        ref = parity.reference(x, layers, grad)
        got = dict(zip(["output", "input", "weight0", "bias0"], want))
        for name, (value, bound) in ref.items():
            error, ok, note = parity.compare(got[name], value, bound, x.dtype)
            assert ok, f"{module} batch {x.shape[0]}: {name} relative error {error:.3g} {note}"

    mismatches, errors, calls = [], [], [0] * THREADS
    stop = time.monotonic() + SECONDS

    def worker(t):
        order = list(range(len(work)))
        random.Random(t).shuffle(order)
        try:
            while time.monotonic() < stop:
                for i in order:
                    got = _grads(*work[i])
                    calls[t] += 1
                    if not all(torch.equal(a, b) for a, b in zip(got, expected[i])):
                        module, x, _ = work[i]
                        worst = max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, expected[i]))
                        mismatches.append(f"{module} batch {x.shape[0]}: largest difference {worst:.3g}")
                    if time.monotonic() >= stop:
                        break
        except Exception as exc:  # noqa: BLE001 (any error in a thread fails the test below, with its message)
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:5]
    assert not mismatches, (f"{len(mismatches)} of {sum(calls)} calls differ from the single-threaded bits: "
                            f"{mismatches[:5]}")
    assert sum(calls) > len(work), f"only {sum(calls)} calls in {SECONDS} s: the plan cache was not cycled"


