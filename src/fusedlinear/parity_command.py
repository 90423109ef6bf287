"""``fusedlinear parity``: runs every case of :mod:`fusedlinear.parity` (the float64 error model
and the call under test) for each backend × device × dtype that runs here, prints one table and
exits 1 on any mismatch. A spy on each backend's module checks that the forced backend really ran
(a silent fallback cannot pass).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
import warnings

import torch

from . import backend, parity, use_backend
from .argtypes import UsageError, choices
from .kernels import NAMES
from .parity import TOLERANCE_REASONS, UNIT_ROUNDOFF, cases, check_table, run_case, tolerance
from .report import DTYPES, atomic_write, dtype_name


class _Spy:
    """Counts calls of a backend module's forward and backward while active."""

    def __init__(self, module):
        self.module, self.calls = module, {"forward": 0, "backward": 0}

    @contextlib.contextmanager
    def active(self):
        originals = {name: getattr(self.module, name) for name in self.calls}

        def counting(name):
            def wrapped(*args, **kwargs):
                self.calls[name] += 1
                return originals[name](*args, **kwargs)
            return wrapped

        for name in self.calls:
            setattr(self.module, name, counting(name))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(self.module, name, fn)


def targets(backends=None, dtypes=None) -> tuple[list[tuple[str, str, torch.dtype]], list[str]]:
    """(backend, device, dtype) triples to check here, and lines about backends that cannot run here."""
    skipped, found = [], []
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for name, (_, device_types, kernel_dtypes) in backend.BACKENDS.items():
        if backends is not None and name not in backends:
            continue
        reason = backend.available()[name]
        if reason != "ok":
            skipped.append(f"{name}: cannot run here ({reason})")
            continue
        devices = [d for d in ["cpu"] + gpus if not device_types or d.split(":")[0] in device_types]
        if not devices:
            skipped.append(f"{name}: no {'/'.join(device_types)} device here")
        for device in devices:
            for dtype in kernel_dtypes or tuple(UNIT_ROUNDOFF):
                if dtypes is None or dtype in dtypes:
                    found.append((name, device, dtype))
    return found, skipped


def run(found, quick=False, activations=None, on_row=None) -> list[dict]:
    """Every check of the (backend, device, dtype) triples ``found`` (see :func:`targets`), as table rows
    (dicts); ``on_row(row)`` is called as each row completes."""
    check_table()
    rows = []
    for seed, (name, device, dtype) in enumerate(found):
        # the module that implements `name` (not what dispatch returns for it): a fallback is not counted
        spy = _Spy(importlib.import_module(f"{backend.__name__}.{backend.BACKENDS[name][0]}"))
        for activation in activations or NAMES:
            for j, case in enumerate(cases(quick)):
                spy.calls.update(forward=0, backward=0)
                row = {"backend": name, "device": device, "dtype": dtype_name(dtype), "activation": activation,
                       "case": case.name, "error": 0.0, "tolerance": tolerance(dtype), "ok": True, "note": ""}
                try:
                    with spy.active(), use_backend(name), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # e.g. a one-time fallback warning of another call
                        results = run_case(case, activation, dtype, device, seed * 1000 + j)
                except Exception as exc:  # a backend that raises is a failed row, reported in the table
                    row.update(error=math.inf, ok=False, note=f"{type(exc).__name__}: {exc}")
                    rows.append(row)
                    if on_row:
                        on_row(row)
                    continue
                bad = [(n, r) for n, r in results.items() if not r[1]]
                row["error"] = max(r[0] for r in results.values())
                if bad:
                    row.update(ok=False, note="; ".join(f"{n} {r[2]}" for n, r in bad))
                elif min(spy.calls.values()) == 0:
                    row.update(ok=False, note=f"backend {name!r} did not run ({spy.calls}): a silent fallback")
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows


def format_table(rows) -> str:
    cells = [[r["backend"], r["device"], r["dtype"], r["activation"], r["case"], f"{r['error']:.2e}",
              f"{r['tolerance']:.1e}", "ok" if r["ok"] else "MISMATCH " + r["note"]] for r in rows]
    header = ["backend", "device", "dtype", "activation", "case", "rel. error", "tolerance", "ok"]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells)][:-1]
    line = lambda c: "  ".join(str(v).ljust(w) for v, w in zip(c, widths)) + "  " + c[-1]  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths] + ["--"])] + [line(c) for c in cells])


_EPILOG = "tolerances (per dtype, and why):\n" + "\n".join(f"  {k:9s} {v}" for k, v in TOLERANCE_REASONS.items()) + """

rel. error: max over elements of |got - ref| / scale, where scale = the element's error bound /
tolerance: sqrt(L)*sum|terms| for a sum of L products, propagated through the activation and its
derivative (see fusedlinear/parity.py). A row is ok when every element is within its bound.
Exit status: 0 all ok, 1 a mismatch (or a backend that failed or did not run), 2 bad arguments."""


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="check every backend that runs here against float64 PyTorch",
                       description=parity.__doc__.split("\n\n")[0] + " Output and every gradient, every activation, "
                       "odd shapes, strided/transposed/expanded operands, with and without bias.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", help="comma-separated backends to check (default: every one that runs here)")
    p.add_argument("--dtype", help="comma-separated dtypes (default: each dtype a backend runs; "
                                   "torch: float64, float32, float16, bfloat16)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (5 instead of 10, each with and without bias)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--progress", action="store_true",
                   help="also print each row to stderr as it completes (a run cut short keeps them)")
    p.set_defaults(func=cmd_parity)


def cmd_parity(args) -> int:
    backends = choices(args.backend, backend.BACKENDS, "backend") if args.backend else None
    dtypes = [DTYPES[d] for d in choices(args.dtype, DTYPES, "dtype")] if args.dtype else None
    folder = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if folder and not os.path.isdir(folder):
        raise UsageError(f"--json {args.json!r}: directory {folder!r} does not exist; create it or pick another path")
    found, skipped = targets(backends, dtypes)
    if not found:
        runs = "; ".join(f"{n} runs {'/'.join(dtype_name(d) for d in dts) or 'every float dtype'}"
                         for n, (_, _, dts) in backend.BACKENDS.items())
        raise UsageError(f"nothing to check here with --backend {args.backend or 'all'} --dtype {args.dtype or 'all'}"
                         + (f" ({'; '.join(skipped)})" if skipped else "") + f"; {runs}")
    for line in skipped:
        print(f"parity: {line}")
    start = time.perf_counter()
    progress = (lambda row: print("row: " + format_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                ) if args.progress else None
    rows = run(found, args.quick, on_row=progress)
    print(format_table(rows))
    bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows)} checks, {bad} mismatches, {time.perf_counter() - start:.1f} s")
    if args.json:
        result = {"rows": rows, "mismatches": bad, "torch": torch.__version__}
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
        print(f"wrote {args.json}")
    return 1 if bad else 0
