"""GPU benchmark: fused (each CUDA engine) beside eager PyTorch, CUDA-event medians, rows streamed.

Parts (``--part``, comma-separated; benchmarks/gpu_check.sh runs each under its own timeout):

* ``layers``: one Linear + ReLU layer, 4096->4096 at B = 4096 forward+backward in fp32 (TF32
  off), tf32, bf16 and fp16, 784->512 at B = 64 forward (host-bound), and 784->512 at B = 16384
  forward+backward (16 column blocks in the dZ+db pass): eager, fused-vendor, and fused-own
  where it runs (fp32); then backward's dZ+db pass alone (4096 x 4096, bf16 and fp32) with its
  16-byte loads and element by element (dA one element off 16 bytes), beside eager's ops;
* ``mnist``: the MNIST training step (forward, cross-entropy, backward, SGD) at B = 64, fp32 and
  bf16: ungraphed, the model captured with ``torch.cuda.make_graphed_callables``, and the whole
  step captured with ``torch.cuda.graph`` — eager and fused captured the same way;
* ``compile``: the fp32 MNIST step with the model under ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs via cudagraph trees), eager and fused: two compiles, the expensive part.

Every first use (NVRTC modules, CuPy's stream and context lookups) happens in an ungraphed
warm-up step before any capture. Each fused provider is checked against eager before timing.

Rows: each one is appended to ``--md`` (a markdown table, header written once) and flushed the
moment it is measured, beside eager's time for the same case (``x`` = eager / this); an exception
in one row is written as that row's result and the next row runs; SIGTERM (``timeout``) ends the
run with a last line saying so, every finished row already on disk.

Timing: ``--inner`` calls between two CUDA events (the host's per-call overhead counts when the
GPU outruns it), ``--rounds`` rounds; median and p20-p80 per call.

``--dry``: the same row machinery on the CPU (small shapes, wall-clock timing, the plain-torch
backend for "fused"), for tests/test_gpu_check_dry.py; ``--dry-sleep`` slows each row and
``--dry-fail PROVIDER`` makes that provider's rows raise.

    python benchmarks/bench_gpu.py --part layers,mnist,compile --md OUT/bench.md
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time

import torch
from torch import nn

import fusedlinear
from fusedlinear.train import capture_cuda_graph, sgd_step

PRECISIONS = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False),
              "fp16": (torch.float16, False)}
HEADER = "| part | case | precision | provider | median ms (p20-p80) | x eager |\n|---|---|---|---|---|---|\n"


class Bench:
    def __init__(self, args):
        self.args, self.eager = args, {}
        self.device = "cpu" if args.dry else "cuda"
        self.backend = "torch" if args.dry else "cupy"

    # ---- timing -----------------------------------------------------------------------------
    def timed(self, fn) -> dict:
        inner, rounds = self.args.inner, self.args.rounds
        for _ in range(3):
            fn()
        per_call = []
        for _ in range(rounds):
            if self.args.dry:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                per_call.append((time.perf_counter() - t0) / inner)
                time.sleep(self.args.dry_sleep / rounds)
                continue
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

    # ---- rows -------------------------------------------------------------------------------
    def row(self, part, case, prec, provider, measure):
        """Measure one row (``measure()`` -> timing dict) and append it to the table at once; an
        exception becomes the row's text."""
        try:
            if self.args.dry and provider == self.args.dry_fail:
                raise RuntimeError(f"--dry-fail {provider}")
            t = measure()
            ms = f"{t['median'] * 1e3:.3f} ({t['p20'] * 1e3:.3f}-{t['p80'] * 1e3:.3f})"
            base = self.eager.get((part, case, prec, provider.partition("+")[2]))
            if provider.startswith("eager"):
                self.eager[(part, case, prec, provider.partition("+")[2])] = t["median"]
                ratio = ""
            else:
                ratio = f"{base / t['median']:.2f}" if base else "-"
        except Exception as exc:  # one failing row must not end the others
            ms, ratio = f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", ""
        line = f"| {part} | {case} | {prec} | {provider} | {ms} | {ratio} |"
        with open(self.args.md, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)

    def fused(self, module, engine):
        """A fused copy of ``module`` (the layers' weights shared) on ``engine``."""
        if not self.args.dry:
            from fusedlinear.backend import cupy_cuda

            cupy_cuda._forward, cupy_cuda._backward = cupy_cuda._ENGINE_FUNCTIONS[engine]
        return fusedlinear.fuse(module, inplace=False)

    def providers(self, dtype):
        if self.args.dry:
            return ["eager", "fused-vendor", "fused-own"]
        return ["eager", "fused-vendor"] + (["fused-own"] if dtype in (torch.float32, torch.float64) else [])

    def backend_for(self, provider):
        return fusedlinear.use_backend(self.backend) if provider.startswith("fused") else contextlib.nullcontext()


def check(eager_out, got, what):
    err = (got.float() - eager_out.float()).abs().max().item()
    scale = max(eager_out.float().abs().max().item(), 1.0)
    # vs eager in the same dtype: 16-bit and TF32 GEMMs (10-bit products) differ by a few of their ulps
    tf32 = got.dtype == torch.float32 and got.is_cuda and torch.backends.cuda.matmul.allow_tf32
    tol = 3e-2 if got.dtype in (torch.float16, torch.bfloat16) else 1e-2 if tf32 else 1e-3
    if not err <= tol * scale:
        raise AssertionError(f"{what}: fused differs from eager by {err:.3g} (scale {scale:.3g})")


def layer_rows(bench: Bench):
    big = 64 if bench.args.dry else 4096
    cases = [(prec, big, big, big, "fwdbwd") for prec in ("fp32", "tf32", "bf16", "fp16")]
    cases += [("fp32", 64, 784, 512, "fwd"), ("bf16", 64, 784, 512, "fwd"),
              ("fp32", 4 * big, 784, 512, "fwdbwd")]  # narrow layer, big batch: the dZ+db pass has N/32 blocks
    for prec, b, k, n, mode in cases:
        dtype, tf32 = PRECISIONS[prec]
        if not bench.args.dry:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.manual_seed(0)
        eager = nn.Sequential(nn.Linear(k, n), nn.ReLU()).to(device=bench.device, dtype=dtype)
        x = torch.randn(b, k, device=bench.device, dtype=dtype)
        for provider in bench.providers(dtype):
            def measure():
                model = eager if provider == "eager" else bench.fused(eager, provider.split("-")[1])
                with bench.backend_for(provider):
                    with torch.no_grad():
                        check(eager(x), model(x), f"{provider} {prec} {b}x{k}->{n}")
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

                    return bench.timed(fn)

            bench.row("layers", f"{b}x{k}->{n} {mode}", prec, provider, measure)
    grad_pass_rows(bench)


def grad_pass_rows(bench: Bench):
    """Backward's dZ + db pass alone (ReLU, saved A, 4096 x 4096): dA at a 16-byte-aligned address
    (the kernel's 16-byte loads) and one element off (its element-by-element way), beside what
    eager runs for the same work (``threshold_backward``, then the bias gradient's ``sum(0)``)."""
    from fusedlinear.backend import cupy_cuda

    n = 64 if bench.args.dry else 4096
    # --dry: the row machinery with the launch a no-op (no GPU; the emulator tests the kernel itself)
    launch = (lambda plan, buffers, device: None) if bench.args.dry else cupy_cuda.gpu_launch
    for prec in ("bf16", "fp32"):
        dtype = PRECISIONS[prec][0]
        gen = torch.Generator(device=bench.device).manual_seed(0)
        a = torch.relu(torch.randn(n, n, device=bench.device, dtype=dtype, generator=gen))
        g = torch.randn(n, n, device=bench.device, dtype=dtype, generator=gen)
        g_off = torch.empty(n * n + 1, device=bench.device, dtype=dtype)[1:].view(n, n).copy_(g)
        def eager():
            dz = torch.ops.aten.threshold_backward(g, a, 0)  # ReLU's backward in autograd, then db
            return dz, dz.sum(0)

        ways = {"eager": eager,
                "fused-16byte": lambda: cupy_cuda._grad_pass(g, a, a, "relu", 0.0, (True, True, True), launch),
                "fused-element": lambda: cupy_cuda._grad_pass(g_off, a, a, "relu", 0.0, (True, True, True), launch)}
        for provider, fn in ways.items():
            def measure():
                if not bench.args.dry and provider != "eager":
                    dz, db = fn()
                    want = torch.ops.aten.threshold_backward(g, a, 0)
                    check(want, dz, f"{provider} {prec} dZ")
                    check(want.float().sum(0), db, f"{provider} {prec} db")
                return bench.timed(fn)

            bench.row("layers", f"{n}x{n} dZ+db pass", prec, provider, measure)


def _mnist(bench, dtype, provider):
    from fusedlinear.mnist import NeuralNetwork

    torch.manual_seed(0)
    model = NeuralNetwork().to(device=bench.device, dtype=dtype)
    if provider.startswith("fused"):
        model = bench.fused(model, provider.split("-")[1])
    return model


def mnist_rows(bench: Bench, compiled: bool):
    b = 64
    precisions = ("fp32",) if compiled else ("fp32", "bf16")
    ways = ("compile-reduce-overhead",) if compiled else ("", "make_graphed_callables", "cuda.graph")
    if bench.args.dry:
        ways = tuple(w for w in ways if w in ("", "compile-reduce-overhead"))
    for prec in precisions:
        dtype, tf32 = PRECISIONS[prec]
        if not bench.args.dry:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        x = torch.randn(b, 1, 28, 28, device=bench.device, dtype=dtype)
        y = torch.randint(0, 10, (b,), device=bench.device)
        first_loss = {}
        for way in ways:
            # compiles cost about a minute each: eager and the default engine only
            for provider in bench.providers(dtype)[:2] if compiled else bench.providers(dtype):
                def measure():
                    model = _mnist(bench, dtype, provider)
                    opt = torch.optim.SGD(model.parameters(), lr=0.01)
                    with bench.backend_for(provider):
                        # warm-up, ungraphed: every first use (NVRTC, CuPy lookups) happens here
                        loss = sgd_step(model, opt, x, y).detach()
                        first_loss.setdefault(provider, loss)
                        check(first_loss["eager"], loss, f"{provider} first-step loss")
                        if way == "":
                            fn = lambda: sgd_step(model, opt, x, y)  # noqa: E731
                        elif way == "make_graphed_callables":
                            graphed = torch.cuda.make_graphed_callables(model, (x,))
                            fn = lambda: sgd_step(graphed, opt, x, y, set_to_none=False)  # noqa: E731
                        elif way == "cuda.graph":
                            fn = capture_cuda_graph(lambda: sgd_step(model, opt, x, y, set_to_none=False))[0].replay
                        else:
                            # --dry: no compile (minutes on a CPU); the rows' machinery is what it tests
                            run = model if bench.args.dry else torch.compile(model, mode="reduce-overhead",
                                                                              dynamic=False)
                            fn = lambda: sgd_step(run, opt, x, y, set_to_none=False)  # noqa: E731
                            for _ in range(3):  # compile, then cudagraph trees record
                                fn()
                        return bench.timed(fn)

                bench.row("mnist", f"B={b} step", prec, provider + (f"+{way}" if way else ""), measure)


def _on_sigterm(signum, frame):
    raise SystemExit(f"SIGTERM after {time.perf_counter() - _START:.0f} s")


_START = time.perf_counter()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="layers,mnist,compile")
    p.add_argument("--md", required=True, help="table to append rows to (created with a header if absent)")
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dry", action="store_true", help="CPU stand-in run of the row machinery (tests)")
    p.add_argument("--dry-sleep", type=float, default=0.0)
    p.add_argument("--dry-fail", default="")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(args)
    try:
        with open(args.md, "x") as f:
            f.write(HEADER)
    except FileExistsError:
        pass
    if not args.dry:
        import cupy

        props = torch.cuda.get_device_properties(0)
        with open(args.md, "a") as f:
            f.write(f"| {args.part} | {props.name}, torch {torch.__version__}, cupy {cupy.__version__} | | | "
                    f"per-call ms, CUDA events, {args.inner}x{args.rounds} | eager / this |\n")
    try:
        for part in args.part.split(","):
            {"layers": layer_rows, "mnist": lambda b: mnist_rows(b, False),
             "compile": lambda b: mnist_rows(b, True)}[part](bench)
    except SystemExit as stop:
        with open(args.md, "a") as f:
            f.write(f"| {args.part} | stopped: {stop} | | | | |\n")
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(124)


if __name__ == "__main__":
    main()
