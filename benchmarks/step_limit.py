"""The MNIST training step against its honest limit: its GEMMs + the loss + the SGD update.

    python benchmarks/step_limit.py [--batches 1,64,256,1024] [--blocks 15] [--steps 60] [--threads N] [--clock cpu]

Three providers in one process, in alternating blocks of steps (a slow period of a shared
machine hits all alike), each block's median kept, and the ratios taken block by block:

* ``fused``: the fused model's step (zero_grad, forward, cross-entropy, backward, SGD step);
* ``eager``: the same step with nn.Linear + nn.ReLU (same weights);
* ``limit``: what no implementation of the step can skip — its 8 GEMMs (3 forward; dW of each
  layer; dX of layers 2 and 3), as ``torch.mm`` into preallocated outputs on PyTorch's threads,
  plus ``cross_entropy`` forward and backward on the logits, plus ``SGD.step()`` on the model's
  parameters with their gradients set. Not in it: the bias add, ReLU and its mask, db sums —
  the work fusion hides inside the GEMMs' epilogues.

``--clock cpu`` times each step in this thread's CPU seconds (``time.thread_time``) instead of
wall seconds: with ``--threads 1`` every step's work runs on this thread, and time the machine
gives to other processes is not counted — the figure to use on a heavily shared machine.

Validates the fused model against eager before timing. Prints medians (microseconds) and the
per-block ratios (median, min–max). A profile, not `fusedlinear bench step`, which runs each
provider in its own processes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import fusedlinear
from fusedlinear.bench_worker import MNIST_LAYERS as LAYERS
from fusedlinear.bench_worker import check_fused, mnist_problem, mnist_step

LR = 1e-4


def _limit(model, batch, y):
    g = torch.Generator().manual_seed(1)
    acts = [torch.randn(batch, k, generator=g) for k, _ in LAYERS]  # each layer's input
    weights = [torch.randn(n, k, generator=g) for k, n in LAYERS]
    outs = [torch.empty(batch, n) for _, n in LAYERS]
    dzs = [torch.randn(batch, n, generator=g) for _, n in LAYERS]
    dws = [torch.empty(n, k) for k, n in LAYERS]
    dxs = [torch.empty(batch, k) for k, _ in LAYERS]
    logits = torch.randn(batch, 10, generator=g, requires_grad=True)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=LR)

    def step():
        for i in range(3):
            torch.mm(acts[i], weights[i].T, out=outs[i])  # Z = X Wᵀ
        for i in range(3):
            torch.mm(dzs[i].T, acts[i], out=dws[i])  # dW = dZᵀ X
        for i in (1, 2):
            torch.mm(dzs[i], weights[i], out=dxs[i])  # dX = dZ W
        logits.grad = None
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64,256,1024")
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave it)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    for batch in (int(b) for b in args.batches.split(",")):
        eager, x, y = mnist_problem(batch)
        fused = fusedlinear.fuse(eager)  # a deep copy
        check_fused(fused, eager, x)
        fns = {"fused": mnist_step(fused, x, y, LR), "eager": mnist_step(eager, x, y, LR),
               "limit": _limit(copy.deepcopy(eager), batch, y)}
        for fn in fns.values():  # warm-up (first calls compile or load kernels and plans)
            for _ in range(5):
                fn()
        blocks = {name: [] for name in fns}
        for block in range(args.blocks):
            order = list(fns)[block % 3:] + list(fns)[:block % 3]  # rotate who goes first
            for name in order:
                samples = []
                for _ in range(args.steps):
                    t0 = clock()
                    fns[name]()
                    samples.append(clock() - t0)
                blocks[name].append(statistics.median(samples[args.steps // 5:]))
        med = {name: statistics.median(v) * 1e6 for name, v in blocks.items()}

        def ratio(a, b):
            r = [p / q for p, q in zip(blocks[a], blocks[b])]
            return f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})"

        print(f"B={batch:5d}  fused {med['fused']:9.1f} us  eager {med['eager']:9.1f} us  limit {med['limit']:9.1f} us"
              f"  fused/eager {ratio('fused', 'eager')}  fused/limit {ratio('fused', 'limit')}", flush=True)


if __name__ == "__main__":
    main()
