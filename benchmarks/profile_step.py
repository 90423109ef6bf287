"""Where the time of an MNIST training step goes, eager against fused, phase by phase.

    python benchmarks/profile_step.py [--batches 1,64] [--blocks 12] [--steps 100]

Both models live in one process and run in alternating blocks of steps (so a slow period of a
shared machine hits both alike); each phase is timed with perf_counter around it:
``fwd`` (zero_grad + forward), ``loss`` (cross-entropy), ``bwd`` (backward), ``opt`` (SGD step).
It also times, for the fused model, the backend's own calls (kernel launches plus the work of
filling in their parameter blocks) by wrapping them, so the rest is Python and autograd overhead.
This is a profile, not the benchmark: the benchmark (``fusedlinear bench step``) runs each
provider in its own processes. Prints medians in microseconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import fusedlinear
from fusedlinear.backend import numba_cpu
from fusedlinear.mnist import NeuralNetwork

PHASES = ("fwd", "loss", "bwd", "opt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    backend_time = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                backend_time[0] += time.perf_counter() - t0
        return wrapper

    numba_cpu.forward, numba_cpu.backward = timed(numba_cpu.forward), timed(numba_cpu.backward)

    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        eager = NeuralNetwork()
        models = {"eager": copy.deepcopy(eager), "fused": fusedlinear.fuse(eager)}
        opts = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in models.items()}
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        phases = {name: {p: [] for p in (*PHASES, "step", "backend")} for name in models}
        for block in range(args.blocks):
            for name, model in models.items():
                opt, rec = opts[name], phases[name]
                samples = {p: [] for p in rec}
                for i in range(args.steps):
                    backend_time[0] = 0.0
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    out = model(x)
                    t1 = time.perf_counter()
                    loss = nn.functional.cross_entropy(out, y)
                    t2 = time.perf_counter()
                    loss.backward()
                    t3 = time.perf_counter()
                    opt.step()
                    t4 = time.perf_counter()
                    if i >= args.steps // 5:  # warm-up
                        for p, d in zip((*PHASES, "step", "backend"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0,
                                                                       backend_time[0])):
                            samples[p].append(d)
                for p in rec:
                    rec[p].append(statistics.median(samples[p]))
        print(f"batch {batch}: medians over {args.blocks} blocks of {args.steps} steps, microseconds")
        print(f"  {'':6s} " + " ".join(f"{p:>8s}" for p in (*PHASES, "step", "backend")))
        for name, rec in phases.items():
            print(f"  {name:6s} " + " ".join(f"{statistics.median(rec[p]) * 1e6:8.1f}" for p in rec))
        ratios = [f / e for f, e in zip(phases["fused"]["step"], phases["eager"]["step"])]
        print(f"  fused/eager step, per block: median {statistics.median(ratios):.3f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
