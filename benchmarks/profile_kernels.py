"""The fused CPU kernels of the MNIST layers against PyTorch's own GEMMs, stage by stage, one thread.

    python benchmarks/profile_kernels.py [--batches 64,256,1024] [--rounds 9] [--reps 40]

For 784->512 (backward without dX: the model's input needs no gradient) and 512->512 ReLU, float32,
one thread, times in this thread's CPU seconds (``time.thread_time``, so time the machine gives
to other processes is not counted), median of round medians, the candidates taking turns:

* ``fwd kernel`` / ``bwd kernel``: the plan's kernel launches alone (no allocation, no Python
  layer above the backend), as chosen by the tuner (printed);
* their stages, by the plan's P_STAGE split: forward 1 = GEMM, 2 = bias + activation; backward
  columns 1 = dZ and db, 2 = dW (GEMM); rows = dX (GEMM);
* ``torch`` rows: the same GEMMs as ``torch.mm`` into preallocated outputs, ``addmm`` + ``relu``
  as eager runs the forward, ``threshold_backward`` + ``sum`` as eager gets dZ and db.

A profile, not the benchmark (benchmarks/step_limit.py, ``fusedlinear bench step``).
"""

from __future__ import annotations

import argparse
import array
import statistics
import time

import torch

from fusedlinear.backend import numba_cpu
from fusedlinear.kernels import blas
from fusedlinear.kernels import cpu_params as slots


def _runner(plan, pointers: dict, stages=None):
    """Run ``plan``'s launches (those with a stage in ``stages``, by position; None keeps a
    launch's own stage, a missing entry skips it) on this thread with ``pointers`` filled in."""
    blocks = []
    for i, (_, call, template, _) in enumerate(plan.launches):
        if stages is not None and (i >= len(stages) or stages[i] is False):
            continue
        p = array.array("q", template)
        if stages is not None and stages[i] is not None:
            p[slots.P_STAGE] = stages[i]
        for slot, tensor in pointers.items():
            p[getattr(slots, f"P_{slot}")] = tensor.data_ptr() if tensor.numel() else 0
        blocks.append((call, p, p.buffer_info()[0]))
    return lambda: [call(address) for call, _, address in blocks]


def _bench(fns: dict, rounds: int, reps: int) -> dict:
    rows = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            samples = []
            for _ in range(reps):
                t0 = time.thread_time()
                fn()
                samples.append(time.thread_time() - t0)
            rows[name].append(statistics.median(samples))
    return {name: statistics.median(v) * 1e6 for name, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The backend holds scipy's OpenBLAS to one thread while a launch runs (numba_cpu._launch);
    # _runner calls the kernels directly, so the same pin is held here, for the whole profile: otherwise each
    # OpenBLAS tile call runs on OpenBLAS's own threads too, whose work this thread's CPU time
    # leaves out (an OpenBLAS forward then read 0.47x torch's one-thread GEMM on a 2-core AMD EPYC
    # Zen 4; its real time was 1.05x).
    blas.pin_one_thread()
    for batch in (int(b) for b in args.batches.split(",")):
        for k, n, mask in ((784, 512, (False, True, True)), (512, 512, (True, True, True))):
            g = torch.Generator().manual_seed(0)
            x, w, b = torch.randn(batch, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
            da = torch.randn(batch, n, generator=g)
            a, _ = numba_cpu.forward(x, w, b, "relu", 0.0)  # tunes this shape on its first call
            numba_cpu.backward(da, a, x, w, "relu", 0.0, mask)
            fwd = numba_cpu._plan(x, w, b, "relu", 0.0, None)
            bwd = numba_cpu._plan(x, w, None, "relu", 0.0, mask)
            out, dz, dw, db = torch.empty(batch, n), torch.empty(batch, n), torch.empty(n, k), torch.empty(n)
            dx = torch.empty(batch, k) if mask[0] else torch.empty(0)
            fp = {"X": x, "A": out, "Z": torch.empty(0)}
            bp = {"X": x, "DA": da, "SAVED": a, "DZ": dz, "DX": dx, "DW": dw, "DB": db}
            fns = {"fwd kernel": _runner(fwd, fp), "bwd kernel": _runner(bwd, bp)}
            if len(fwd.launches) == 1:
                fns["fwd 1: GEMM"] = _runner(fwd, fp, [1])
                fns["fwd 2: bias+act"] = _runner(fwd, fp, [2])
            fns["bwd 1: dZ+db"] = _runner(bwd, bp, [1])
            fns["bwd 2: dW GEMM"] = _runner(bwd, bp, [2])
            if mask[0]:
                fns["bwd rows: dX GEMM"] = _runner(bwd, bp, [False, None])
            fns["torch mm X Wt"] = lambda: torch.mm(x, w.T, out=out)
            fns["torch addmm+relu"] = lambda: torch.relu(torch.addmm(b, x, w.T))
            fns["torch mm dW"] = lambda: torch.mm(da.T, x, out=dw)
            if mask[0]:
                fns["torch mm dX"] = lambda: torch.mm(da, w, out=dx)
            fns["torch dZ+db"] = lambda: torch.ops.aten.threshold_backward(da, a, 0).sum(0)
            times = _bench(fns, args.rounds, args.reps)
            fwd_gemm = times["torch mm X Wt"]
            bwd_gemm = times["torch mm dW"] + times.get("torch mm dX", 0.0)
            choice = numba_cpu._choose(x, w, b, "relu", 0.0, None), numba_cpu._choose(x, w, None, "relu", 0.0, mask)
            print(f"B={batch} {k}->{n} (forward {choice[0]}, backward {choice[1]}): "
                  f"kernel/torch-GEMMs forward {times['fwd kernel'] / fwd_gemm:.3f}, backward {times['bwd kernel'] / bwd_gemm:.3f}")
            for name, us in times.items():
                print(f"    {name:20s} {us:9.1f} us")


if __name__ == "__main__":
    main()
