"""GPU benchmark: fused (CuPy kernels) vs eager PyTorch, fp32, CUDA-event medians after warm-up.

* forward of one layer, Linear + ReLU: MNIST shapes (784->512, 512->512, 512->10) at B = 64, 1024,
  8192, and 4096 x 4096 -> 4096;
* the MNIST training step (forward, cross-entropy, backward, SGD step) at B = 64, 1024, 8192.

Results are validated before timing (fused vs eager within fp32 tolerance). Writes
bench_gpu.json and bench_gpu.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

import fusedlinear
from fusedlinear.bench import quantiles, machine_info, time_cuda
from fusedlinear.mnist import NeuralNetwork


def timed(fn, reps):
    med, p20, p80 = quantiles(time_cuda(fn, reps=reps))
    return {"median": med, "p20": p20, "p80": p80}


def layer_rows(reps):
    rows = []
    shapes = [(b, k, n) for b in (64, 1024, 8192) for k, n in ((784, 512), (512, 512), (512, 10))]
    shapes.append((4096, 4096, 4096))
    for b, k, n in shapes:
        torch.manual_seed(0)
        x = torch.randn(b, k, device="cuda")
        lin = nn.Linear(k, n, device="cuda")
        fused = fusedlinear.FusedLinearReLU.from_linear(lin)
        eager = nn.Sequential(lin, nn.ReLU())
        with torch.no_grad():
            err = (fused(x) - eager(x)).abs().max().item()
            scale = eager(x).abs().max().item()
        assert err <= 1e-3 * max(scale, 1), f"fused != eager at {b}x{k}->{n}: {err}"
        flops = 2 * b * k * n
        for provider, mod in (("eager", eager), ("fused", fused)):
            with torch.no_grad():
                t = timed(lambda: mod(x), reps)
            rows.append({"kernel": "linear_relu_forward", "provider": provider, "B": b, "K": k, "N": n,
                         **t, "tflops": flops / t["median"] / 1e12})
    return rows


def step_rows(reps):
    rows = []
    for b in (64, 1024, 8192):
        x = torch.randn(b, 1, 28, 28, device="cuda")
        y = torch.randint(0, 10, (b,), device="cuda")
        for provider in ("eager", "fused"):
            torch.manual_seed(0)
            model = NeuralNetwork().cuda()
            if provider == "fused":
                fusedlinear.fuse(model, inplace=True)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)

            def step():
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            t = timed(step, reps)
            rows.append({"kernel": "mnist_train_step", "provider": provider, "B": b, "K": 784, "N": 10, **t,
                         "tflops": 3 * 2 * b * (784 * 512 + 512 * 512 + 512 * 10) / t["median"] / 1e12})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    rows = layer_rows(args.reps) + step_rows(args.reps)
    info = machine_info() | {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=2)
    lines = [f"GPU: {info.get('gpu')}, torch {info['torch']}, TF32 matmul {info['tf32_matmul']}", "",
             "| kernel | B | K->N | eager ms (p20-p80) | fused ms (p20-p80) | eager/fused | fused TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for e, f in zip(rows[::2], rows[1::2]):
        lines.append(f"| {e['kernel']} | {e['B']} | {e['K']}->{e['N']} | {e['median'] * 1e3:.3f} "
                     f"({e['p20'] * 1e3:.3f}-{e['p80'] * 1e3:.3f}) | {f['median'] * 1e3:.3f} "
                     f"({f['p20'] * 1e3:.3f}-{f['p80'] * 1e3:.3f}) | {e['median'] / f['median']:.2f} | "
                     f"{f['tflops']:.2f} |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
