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

What runs in each process is :mod:`fusedlinear.bench_worker`; this module starts the processes,
pools their samples into statistics, and writes the table, the CSV and the plot.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time

from .argtypes import UsageError, number, positive_int, writable_file
from .bench_worker import MNIST_LAYERS
from .kernels import NAMES
from .report import machine_info, pyplot, save_figure

PROVIDERS = ("fused", "fused_openblas", "fused_mkl", "eager", "compile", "blas")


def flops(what, batch, k=0, n=0, mode="fwdbwd"):
    if what in ("step", "infer"):
        per_layer = sum(2 * batch * kk * nn for kk, nn in MNIST_LAYERS)
        if what == "infer":
            return per_layer
        return 3 * per_layer - 2 * batch * 784 * 512  # layer 1's dX is not computed
    return 2 * batch * k * n * {"forward": 1, "backward": 2, "fwdbwd": 3}[mode]


def quantiles(samples):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def _spawn(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fusedlinear.bench_worker", json.dumps(spec)],
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
    plt = pyplot("bench")
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
    save_figure(fig, path)


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
    if text not in NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not an activation; choose from {', '.join(NAMES)}")
    return text


def add_parser(sub) -> None:
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
    p.add_argument("--min-seconds", type=number(float, minimum=0), default=0.5,
                   help="timed seconds per point per process, at least")
    p.add_argument("--csv", type=writable_file, help="append rows to this CSV")
    p.add_argument("--plot", type=writable_file, help="PNG of time/eager and GFLOP/s against batch")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the runs, not after
        raise UsageError("--plot needs matplotlib: pip install 'fusedlinear[bench]' (or drop --plot)")
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


if __name__ == "__main__":  # python -m fusedlinear.bench ARGS is fusedlinear bench ARGS (the CLI's own entry)
    sys.argv[1:1] = ["bench"]
    runpy.run_module("fusedlinear", run_name="__main__")
