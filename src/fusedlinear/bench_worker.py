"""The worker process of ``fusedlinear bench``: builds one provider's model (or bare-BLAS GEMMs),
validates it against eager, and times it at each batch size; prints the samples as one JSON line.

    python -m fusedlinear.bench_worker '{"what": "layer", "provider": "fused", ...}'

Started by :func:`fusedlinear.bench.run`, one process per provider and round. Imports what the
provider needs only when it builds it: ``fused_mkl``/``fused_openblas`` set FUSEDLINEAR_CPU_BLAS
before fusedlinear's CPU backend is imported, which reads it once.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np
import torch
from torch import nn

from .backend.activations import REGISTRY
from .mnist import NeuralNetwork
from .torch_ext import fuse

MNIST_LAYERS = ((784, 512), (512, 512), (512, 10))


def _samples(fn, warmup: int, reps: int, min_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    out, start = [], time.perf_counter()
    while len(out) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _activation_module(name):
    return REGISTRY[name].module(0.01)  # nn.LeakyReLU's default slope


def _blas_layer(batch, k, n, mode):
    """The GEMMs of one layer as numpy calls into preallocated outputs (numpy's OpenBLAS)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((batch, k), np.float32), rng.standard_normal((n, k), np.float32)
    dz = rng.standard_normal((batch, n), np.float32)
    z, dx, dw = np.empty((batch, n), np.float32), np.empty((batch, k), np.float32), np.empty((n, k), np.float32)

    def fwd():
        np.matmul(x, w.T, out=z)

    def bwd():
        np.matmul(dz, w, out=dx)
        np.matmul(dz.T, x, out=dw)

    return {"forward": fwd, "backward": bwd, "fwdbwd": lambda: (fwd(), bwd())}[mode]


def _blas_step(batch):
    """The GEMMs of an MNIST training step (layer 1's dX is not needed: 8 GEMMs)."""
    fns = [_blas_layer(batch, k, n, "forward") for k, n in MNIST_LAYERS]
    fns += [_blas_layer(batch, k, n, "backward") for k, n in MNIST_LAYERS[1:]]
    rng = np.random.default_rng(1)
    dz, x = rng.standard_normal((batch, 512), np.float32), rng.standard_normal((batch, 784), np.float32)
    dw = np.empty((512, 784), np.float32)
    fns.append(lambda: np.matmul(dz.T, x, out=dw))
    return lambda: [f() for f in fns]


def _blas_layer_chain(batch):
    fns = [_blas_layer(batch, k, n, "forward") for k, n in MNIST_LAYERS]
    return lambda: [f() for f in fns]


def _provider_model(provider, eager):
    """The model a torch provider times, built from the eager one (same weights)."""
    return {"fused": lambda: fuse(eager), "eager": lambda: eager,
            "compile": lambda: torch.compile(eager, dynamic=False)}[provider]()


def _torch_layer(provider, batch, k, n, activation, mode):
    torch.manual_seed(0)
    linear = nn.Linear(k, n)
    eager = nn.Sequential(linear, _activation_module(activation))
    model = _provider_model(provider, eager)
    x = torch.randn(batch, k, requires_grad=mode != "forward")
    if provider == "fused":  # validate before timing
        with torch.no_grad():
            torch.testing.assert_close(model(x), eager(x), atol=1e-4, rtol=1e-4)
    grad = torch.randn(batch, n)
    if mode == "forward":
        def fn():
            with torch.no_grad():
                model(x)
        return fn
    leaves = [x, *model.parameters()]

    def fresh_grads():  # as a training loop's zero_grad(set_to_none=True): no accumulation pass timed
        for t in leaves:
            t.grad = None

    if mode == "backward":
        state = {}

        def fn():
            if "out" not in state:
                state["out"] = model(x)
            fresh_grads()
            state["out"].backward(grad, retain_graph=True)
        return fn

    def fn():
        fresh_grads()
        model(x).backward(grad)
    return fn


def mnist_problem(batch):
    """The MNIST benchmarks' problem, the same in every process: (the eager model, seeded; an
    input batch; its labels). Shared with benchmarks/step_limit.py."""
    torch.manual_seed(0)
    return NeuralNetwork(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))


def check_fused(model, eager, x):
    """Validate a fused model against its eager original before timing it."""
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), atol=1e-4, rtol=1e-4)


def mnist_step(model, x, y, lr=1e-3):
    """One training step of ``model`` as a training loop runs it: zero_grad (set to None),
    forward, cross-entropy, backward, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _torch_mnist(provider, batch, train: bool):
    eager, x, y = mnist_problem(batch)
    model = _provider_model(provider, eager)
    if provider == "fused":
        check_fused(model, eager, x)
    if not train:
        def infer():
            with torch.no_grad():
                model(x)
        return infer
    return mnist_step(model, x, y)


def run_worker(spec: dict) -> dict:
    if spec["provider"].startswith("fused_"):  # before fusedlinear picks its BLAS
        os.environ["FUSEDLINEAR_CPU_BLAS"] = spec["provider"].split("_", 1)[1]
        spec = spec | {"provider": "fused"}
    results = []
    for batch in spec["batches"]:
        p = spec["provider"]
        if spec["what"] == "layer":
            k, n = spec["shape"]
            fn = (_blas_layer(batch, k, n, spec["mode"]) if p == "blas"
                  else _torch_layer(p, batch, k, n, spec["activation"], spec["mode"]))
        elif p == "blas":
            fn = _blas_step(batch) if spec["what"] == "step" else _blas_layer_chain(batch)
        else:
            fn = _torch_mnist(p, batch, train=spec["what"] == "step")
        warmup = 20 if p == "compile" else 5
        results.append({"batch": batch, "samples": _samples(fn, warmup, spec["reps"], spec["min_seconds"])})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"results": results, "peak_rss_mib": rss, "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    print(json.dumps(run_worker(json.loads(sys.argv[1]))))
