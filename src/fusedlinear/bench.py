"""``fusedlinear bench``: fused layers beside eager PyTorch, torch.compile and the bare-BLAS limit.

Every measurement runs in a fresh process for one provider (a thread pool left spinning by one
provider must not slow the next), providers alternate over rounds in a rotating order, each
process warms up first and then times a point for at least ``--min-seconds``; the samples of all
rounds are pooled into median, p20 and p80. Results are validated before timing (fused against
eager). Rows go to a CSV with the machine, versions, thread counts and a timestamp.

Benchmarks::

    layer      one Linear+activation (k -> n), forward / backward / forward+backward, per batch
    step       the MNIST training step: forward, cross-entropy, backward, SGD step
    infer      MNIST inference (no_grad)
    coldstart  a fresh process: import + first call, with an empty and with a warm JIT cache

Providers: ``fused`` (fusedlinear; ``fused_mkl`` / ``fused_openblas`` force the BLAS its CPU
kernels call, see FUSEDLINEAR_CPU_BLAS), ``eager`` (nn.Linear + activation module), ``compile``
(torch.compile of the eager model), ``blas`` (the same GEMMs as bare numpy/OpenBLAS calls: the
limit, timed in its own processes like every other provider).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MNIST_LAYERS = ((784, 512), (512, 512), (512, 10))
PROVIDERS = ("fused", "fused_openblas", "fused_mkl", "eager", "compile", "blas")


# ---- inside a worker process -----------------------------------------------------------------


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
    from .backend.activations import REGISTRY

    return REGISTRY[name].module(0.01)  # nn.LeakyReLU's default slope


def _blas_layer(batch, k, n, mode):
    """The GEMMs of one layer as numpy calls into preallocated outputs (numpy's OpenBLAS)."""
    import numpy as np

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
    import numpy as np

    rng = np.random.default_rng(1)
    dz, x = rng.standard_normal((batch, 512), np.float32), rng.standard_normal((batch, 784), np.float32)
    dw = np.empty((512, 784), np.float32)
    fns.append(lambda: np.matmul(dz.T, x, out=dw))
    return lambda: [f() for f in fns]


def _provider_model(provider, eager):
    """The model a torch provider times, built from the eager one (same weights)."""
    import torch

    import fusedlinear

    return {"fused": lambda: fusedlinear.fuse(eager), "eager": lambda: eager,
            "compile": lambda: torch.compile(eager, dynamic=False)}[provider]()


def _torch_layer(provider, batch, k, n, activation, mode):
    import torch
    from torch import nn

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


def _torch_mnist(provider, batch, train: bool):
    import torch
    from torch import nn

    from fusedlinear.mnist import NeuralNetwork

    torch.manual_seed(0)
    eager = NeuralNetwork()
    model = _provider_model(provider, eager)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if provider == "fused":
        with torch.no_grad():
            torch.testing.assert_close(model(x), eager(x), atol=1e-4, rtol=1e-4)
    if not train:
        def infer():
            with torch.no_grad():
                model(x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def flops(what, batch, k=0, n=0, mode="fwdbwd"):
    if what in ("step", "infer"):
        per_layer = sum(2 * batch * kk * nn for kk, nn in MNIST_LAYERS)
        if what == "infer":
            return per_layer
        return 3 * per_layer - 2 * batch * 784 * 512  # layer 1's dX is not computed
    return 2 * batch * k * n * {"forward": 1, "backward": 2, "fwdbwd": 3}[mode]


def run_worker(spec: dict) -> dict:
    if spec["provider"].startswith("fused_"):  # before fusedlinear picks its BLAS
        os.environ["FUSEDLINEAR_CPU_BLAS"] = spec["provider"].split("_", 1)[1]
        spec = spec | {"provider": "fused"}
    import torch

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


def _blas_layer_chain(batch):
    fns = [_blas_layer(batch, k, n, "forward") for k, n in MNIST_LAYERS]
    return lambda: [f() for f in fns]


# ---- the parent: processes, rounds, aggregation, CSV, plot ------------------------------------


def time_cuda(fn, warmup: int = 10, reps: int = 50) -> list[float]:
    """Seconds per call of ``fn`` from CUDA events, after warm-up (module load, NVRTC compile)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples


def quantiles(samples):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def machine_info() -> dict:
    import platform

    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"machine": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "")}
    try:  # the kernels scipy's OpenBLAS (the fused CPU path's BLAS) actually runs
        from fusedlinear.kernels._numba_runtime import scipy_openblas_core

        info["openblas_core"] = scipy_openblas_core()
    except ImportError:
        pass
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _spawn(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fusedlinear.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {spec['provider']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> list[dict]:
    providers, batches, shape = args.providers, args.batches, args.shape  # parsed and checked by add_parser
    pooled = {(p, b): [] for p in providers for b in batches}
    per_round = {(p, b): [] for p in providers for b in batches}  # one median per process
    rss = {p: 0.0 for p in providers}
    for r in range(args.rounds):
        order = providers[r % len(providers):] + providers[:r % len(providers)]
        for p in order:
            spec = {"what": args.what, "provider": p, "batches": batches, "shape": shape, "mode": args.mode,
                    "activation": args.activation, "reps": args.reps, "min_seconds": args.min_seconds}
            out = _spawn(spec)
            rss[p] = max(rss[p], out["peak_rss_mib"])
            for res in out["results"]:
                pooled[(p, res["batch"])] += res["samples"]
                per_round[(p, res["batch"])].append(quantiles(res["samples"])[0])
            print(f"  round {r + 1}/{args.rounds}: {p} done", file=sys.stderr, flush=True)
    info = machine_info()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    rows = []
    for b in batches:
        base = quantiles(pooled[("eager", b)])[0] if "eager" in providers else None
        for p in providers:
            med, p20, p80 = quantiles(pooled[(p, b)])
            # The ratio of each round's medians (the two processes ran back to back), then the median
            # over rounds: robust to the slow and fast periods a shared VM goes through.
            paired = ([x / e for x, e in zip(per_round[(p, b)], per_round[("eager", b)])]
                      if "eager" in providers else [])
            kernel = f"{args.what}" if args.what != "layer" else f"layer_{args.activation}_{shape[0]}x{shape[1]}"
            rows.append({
                "kernel": kernel, "mode": args.mode if args.what == "layer" else args.what, "provider": p,
                "batch": b, "median_ms": med * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
                "samples": len(pooled[(p, b)]),
                "gflops": flops(args.what, b, *shape, args.mode) / med / 1e9,
                "ratio_to_eager": (med / base) if base else "",
                "paired_ratio": quantiles(paired)[0] if paired else "",
                "paired_ratio_min": min(paired) if paired else "", "paired_ratio_max": max(paired) if paired else "",
                "peak_rss_mib": round(rss[p], 1), "timestamp": stamp, **info,
            })
    return rows


def print_table(rows) -> None:
    print(f"{'kernel':24s} {'mode':8s} {'provider':8s} {'batch':>6s} {'median ms':>10s} {'p20-p80 ms':>17s} "
          f"{'GFLOP/s':>8s} {'/eager':>7s} {'paired /eager (min-max)':>24s}")
    for r in rows:
        ratio = f"{r['ratio_to_eager']:.3f}" if r["ratio_to_eager"] != "" else ""
        paired = (f"{r['paired_ratio']:.3f} ({r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f})"
                  if r["paired_ratio"] != "" else "")
        print(f"{r['kernel']:24s} {r['mode']:8s} {r['provider']:8s} {r['batch']:>6d} {r['median_ms']:>10.4f} "
              f"{r['p20_ms']:>8.4f}-{r['p80_ms']:<8.4f} {r['gflops']:>8.1f} {ratio:>7s} {paired:>24s}")


def append_csv(path, rows) -> None:
    import csv

    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(rows[0]):  # written by another version: keep both, lose nothing
            root, ext = os.path.splitext(path)
            other = f"{root}-{time.strftime('%Y%m%dT%H%M%S')}{ext or '.csv'}"
            print(f"fusedlinear bench: {path} has other columns; these rows go to {other}", file=sys.stderr)
            path, new = other, True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path) -> list[dict]:
    """Rows written by ``--csv``, numbers as numbers (for plotting them again)."""
    import csv

    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("batch", "samples"):
                row[key] = int(row[key])
            for key in ("median_ms", "p20_ms", "p80_ms", "gflops"):
                row[key] = float(row[key])
            row["ratio_to_eager"] = float(row["ratio_to_eager"]) if row["ratio_to_eager"] else ""
            rows.append(row)
    return rows


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fusedlinear[bench]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, p in enumerate(dict.fromkeys(r["provider"] for r in rows)):
        mine = [r for r in rows if r["provider"] == p]
        xs = [r["batch"] for r in mine]
        style = dict(marker="o", label=p, color=f"C{i}")  # one colour per provider in both panels
        if p != "eager" and all(r["ratio_to_eager"] != "" for r in mine):
            ax1.plot(xs, [r["ratio_to_eager"] for r in mine], **style)
        ax2.plot(xs, [r["gflops"] for r in mine], **style)
    ax1.axhline(1.0, color="grey", lw=0.8)
    title = rows[0]["kernel"] if rows[0]["mode"] == rows[0]["kernel"] else f"{rows[0]['kernel']} {rows[0]['mode']}"
    ax1.set(xscale="log", xlabel="batch", ylabel="time / eager time", title=title)
    ax2.set(xscale="log", xlabel="batch", ylabel="GFLOP/s", title=rows[0]["machine"][:48])
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def coldstart(args) -> list[dict]:
    """A fresh process: import, then the first fused forward+backward of one layer (784->512 ReLU,
    batch 64, float32), with an empty JIT cache and then with the cache that run left on disk.
    Each row has wall seconds (the process, the import, the first call) and the first call's
    CPU seconds (steadier than wall time on a loaded machine)."""
    code = ("import time; t0 = time.perf_counter(); import torch, fusedlinear; t1 = time.perf_counter(); "
            "x = torch.randn(64, 784, requires_grad=True); m = fusedlinear.FusedLinearReLU(784, 512); "
            "c2 = time.process_time(); t2 = time.perf_counter(); m(x).sum().backward(); "
            "t3 = time.perf_counter(); print(t1 - t0, t3 - t2, time.process_time() - c2)")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for state in ("empty", "warm", "warm"):
            env = {**os.environ, "NUMBA_CACHE_DIR": cache, "FUSEDLINEAR_BACKEND": "numba"}
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            imp, first, cpu = (float(v) for v in proc.stdout.split())
            rows.append({"cache": state, "process_s": wall, "import_s": imp, "first_call_s": first,
                         "first_call_cpu_s": cpu})
            print(f"JIT cache {state:5s}: process {wall:6.2f} s (import {imp:.2f} s, first forward+backward "
                  f"{first:.2f} s, {cpu:.2f} s CPU)")
    return rows


def _providers(text: str) -> list[str]:
    names = [p for p in text.split(",") if p]
    bad = [p for p in names if p not in PROVIDERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown provider {', '.join(map(repr, bad)) or '(none given)'}; "
                                         f"choose from {', '.join(PROVIDERS)} (comma-separated)")
    return names


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes >= 1 (e.g. 1,64,1024)")
    return batches


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        shape = tuple(int(v) for v in parts)
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in_features x out_features (e.g. 784x512)")
    return shape


def _activation(text: str) -> str:
    from .kernels import NAMES

    if text not in NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not an activation; choose from {', '.join(NAMES)}")
    return text


def add_parser(sub) -> None:
    from .cli import _number, positive_int, writable_file

    p = sub.add_parser("bench", help="benchmarks beside eager PyTorch, torch.compile and bare BLAS",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("layer", "step", "infer", "coldstart"))
    p.add_argument("--providers", type=_providers, default="fused,eager,compile,blas")
    p.add_argument("--batches", type=_batches, default="1,16,64,256,1024,4096")
    p.add_argument("--shape", type=_shape, default="784x512", help="layer: in x out features (default 784x512)")
    p.add_argument("--mode", choices=("forward", "backward", "fwdbwd"), default="fwdbwd", help="layer only")
    p.add_argument("--activation", type=_activation, default="relu", help="layer only")
    p.add_argument("--rounds", type=positive_int, default=3, help="processes per provider, alternated (default 3)")
    p.add_argument("--reps", type=positive_int, default=20, help="timed calls per point per process, at least")
    p.add_argument("--min-seconds", type=_number(float, minimum=0), default=0.5,
                   help="timed seconds per point per process, at least")
    p.add_argument("--csv", type=writable_file, help="append rows to this CSV")
    p.add_argument("--plot", type=writable_file, help="PNG of time/eager and GFLOP/s against batch")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.what == "coldstart":
        rows = coldstart(args)
        if args.csv:
            append_csv(args.csv, [r | machine_info() for r in rows])
        return 0
    rows = run(args)
    print_table(rows)
    if args.csv:
        append_csv(args.csv, rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_worker(json.loads(sys.argv[2]))))
    else:
        from .cli import main

        sys.exit(main(["bench", *sys.argv[1:]]))
