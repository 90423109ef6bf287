"""GPU benchmark: fused (each CUDA engine) vs eager PyTorch vs torch.compile, CUDA-event medians.

* one layer, Linear + ReLU, 784->512 and 4096->4096 at B = 64 ... 8192, forward and forward+backward;
* the MNIST training step (forward, cross-entropy, backward, SGD step), eager and fused, plain
  and captured in a CUDA graph (torch.cuda.graph), and torch.compile;
* precisions: fp32 with TF32 off, fp32 with TF32 on, bf16, fp16 (the layers cast to the dtype).

Timing: ``--inner`` calls between two CUDA events (so the per-call host overhead counts when the
GPU outruns the host), ``--rounds`` rounds, the median per-call time (and p20-p80) reported.
Each fused result is checked against eager before timing. Rows are appended to
``bench_gpu.json`` as they come (a timeout keeps what was measured); ``bench_gpu.md`` gets the
tables. The card's name, driver, torch/CuPy versions head both.

    python benchmarks/bench_gpu.py --out DIR [--quick] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear
from fusedlinear.backend import cupy_cuda
from fusedlinear.bench import machine_info

PRECISIONS = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False),
              "fp16": (torch.float16, False)}


def set_engine(name: str) -> None:
    """Switch the CUDA GEMM engine in-process (what FUSEDLINEAR_CUDA_GEMM chooses at import)."""
    cupy_cuda._forward, cupy_cuda._backward = cupy_cuda._ENGINE_FUNCTIONS[name]


def timed(fn, inner: int, rounds: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / inner)
    s = sorted(per_call)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    return {"median": pick(0.5), "p20": pick(0.2), "p80": pick(0.8)}


def providers(compile_ok: bool, dtype):
    out = ["eager", "fused-vendor"]
    if dtype in (torch.float32, torch.float64):
        out.append("fused-own")  # the own GEMM runs float32/float64 only
    if compile_ok:
        out.append("compile")
    return out


def layer_model(provider, k, n, dtype):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(k, n), nn.ReLU()).to(device="cuda", dtype=dtype)
    if provider == "eager":
        return eager, eager
    if provider == "compile":
        return eager, torch.compile(eager, dynamic=False)
    set_engine(provider.split("-")[1])
    return eager, fusedlinear.fuse(eager, inplace=False)


def check(eager_out, got, what):
    err = (got.float() - eager_out.float()).abs().max().item()
    scale = max(eager_out.float().abs().max().item(), 1.0)
    tol = 3e-2 if got.dtype in (torch.float16, torch.bfloat16) else 1e-3  # vs eager in the same dtype
    if err > tol * scale:
        raise AssertionError(f"{what}: fused differs from eager by {err:.3g} (scale {scale:.3g})")


def layer_rows(args, emit):
    for prec in args.precisions:
        dtype, tf32 = PRECISIONS[prec]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for k, n in ((784, 512), (4096, 4096)):
            for b in args.batches:
                x = torch.randn(b, k, device="cuda", dtype=dtype)
                compile_ok = args.compile and b in args.compile_batches and prec in args.compile_precisions
                for provider in providers(compile_ok, dtype):
                    eager, model = layer_model(provider, k, n, dtype)
                    with fusedlinear.use_backend("cupy") if provider.startswith("fused") else _null():
                        with torch.no_grad():
                            check(eager(x), model(x), f"{provider} {prec} {b}x{k}->{n}")
                        for mode in ("fwd", "fwdbwd"):
                            xg = x.clone().requires_grad_(mode == "fwdbwd")
                            params = list(model.parameters())

                            def fn():
                                if mode == "fwd":
                                    with torch.no_grad():
                                        model(xg)
                                    return
                                for p in params:
                                    p.grad = None
                                xg.grad = None
                                model(xg).sum().backward()

                            t = timed(fn, args.inner, args.rounds)
                            flop = 2 * b * k * n * (1 if mode == "fwd" else 3)
                            emit({"kind": "layer", "precision": prec, "provider": provider, "mode": mode, "B": b,
                                  "K": k, "N": n, **t, "tflops": flop / t["median"] / 1e12})


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_rows(args, emit):
    from fusedlinear.mnist import NeuralNetwork

    for prec in args.precisions:
        dtype, tf32 = PRECISIONS[prec]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for b in args.step_batches:
            x = torch.randn(b, 1, 28, 28, device="cuda", dtype=dtype)
            y = torch.randint(0, 10, (b,), device="cuda")
            compile_ok = args.compile and b in args.compile_batches and prec in args.compile_precisions
            for provider in providers(compile_ok, dtype):
                for graphed in ((False, True) if provider != "compile" else (False,)):
                    torch.manual_seed(0)
                    model = NeuralNetwork().to(device="cuda", dtype=dtype)
                    if provider.startswith("fused"):
                        set_engine(provider.split("-")[1])
                        fusedlinear.fuse(model, inplace=True)
                    run = torch.compile(model, dynamic=False) if provider == "compile" else model
                    opt = torch.optim.SGD(model.parameters(), lr=0.01)

                    def step():
                        opt.zero_grad(set_to_none=not graphed)
                        F.cross_entropy(run(x), y).backward()
                        opt.step()

                    with fusedlinear.use_backend("cupy") if provider.startswith("fused") else _null():
                        fn = _graphed(step) if graphed else step
                        t = timed(fn, args.inner, args.rounds)
                    flop = 3 * 2 * b * (784 * 512 + 512 * 512 + 512 * 10)
                    emit({"kind": "mnist_step", "precision": prec, "provider": provider + ("+graph" if graphed else ""),
                          "mode": "train", "B": b, "K": 784, "N": 10, **t, "tflops": flop / t["median"] / 1e12})


def _graphed(step):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def tables(info, rows) -> str:
    lines = [f"GPU: {info.get('gpu')} (driver {info.get('driver')}), torch {info['torch']}, cupy {info.get('cupy')}",
             "Per-call median ms (p20-p80) from CUDA events; x = eager time / this time.", ""]
    keys = sorted({(r["kind"], r["precision"], r["mode"], r["K"], r["N"]) for r in rows},
                  key=lambda k: (k[0], list(PRECISIONS).index(k[1]), k[2], k[3]))
    for kind, prec, mode, k, n in keys:
        sel = [r for r in rows if (r["kind"], r["precision"], r["mode"], r["K"], r["N"]) == (kind, prec, mode, k, n)]
        provs = sorted({r["provider"] for r in sel}, key=lambda p: (p != "eager", p))
        lines += [f"### {kind} {k}->{n} {prec} {mode}", "", "| B | " + " | ".join(provs) + " |",
                  "|---|" + "---|" * len(provs)]
        for b in sorted({r["B"] for r in sel}):
            by = {r["provider"]: r for r in sel if r["B"] == b}
            base = by.get("eager", {}).get("median")
            cells = []
            for p in provs:
                r = by.get(p)
                cells.append("" if r is None else f"{r['median'] * 1e3:.3f} ({r['p20'] * 1e3:.3f}-{r['p80'] * 1e3:.3f})"
                             + (f" x{base / r['median']:.2f}" if base and p != "eager" else ""))
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--precisions", default="fp32,tf32,bf16,fp16")
    p.add_argument("--batches", default="64,256,1024,4096,8192")
    p.add_argument("--step-batches", default="64,1024,8192")
    p.add_argument("--compile-batches", default="64,8192", help="batches at which torch.compile is measured")
    p.add_argument("--compile-precisions", default="fp32,tf32,bf16,fp16")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="fewer batches and rounds (gpu_check.sh's budget)")
    args = p.parse_args()
    if args.quick:
        args.batches, args.step_batches, args.inner, args.rounds = "64,1024,8192", "64,8192", 10, 9
        args.compile_batches, args.compile_precisions = "8192", "fp32,bf16"
    args.precisions, args.compile_precisions = args.precisions.split(","), args.compile_precisions.split(",")
    args.batches, args.step_batches, args.compile_batches = (
        [int(v) for v in s.split(",")] for s in (args.batches, args.step_batches, args.compile_batches))
    info = machine_info()
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                driver=torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None,
                cuda=torch.version.cuda, cupy=__import__("cupy").__version__, engine_default=cupy_cuda.engine())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_gpu.json")
    rows = []
    start = time.time()

    def emit(row):
        rows.append(row)
        print(f"[{time.time() - start:6.1f}s] {row['kind']} {row['precision']} {row['provider']:>14} {row['mode']:>6} "
              f"B={row['B']:<5} {row['K']}->{row['N']}: {row['median'] * 1e3:.3f} ms", flush=True)
        with open(path, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)

    try:
        step_rows(args, emit)
        layer_rows(args, emit)
    finally:
        set_engine(cupy_cuda.ENGINE or "vendor")
        text = tables(info, rows)
        with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
            f.write(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
