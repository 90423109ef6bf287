"""Timing helpers shared by the benchmark scripts: medians with p20/p80, CSV rows with the machine named."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time


def quantiles(samples: list[float]) -> dict:
    s = sorted(samples)

    def q(p):
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {"median": statistics.median(s), "p20": q(0.2), "p80": q(0.8), "n": len(s)}


def time_cpu(fn, warmup: int = 5, reps: int = 30, min_seconds: float = 0.0) -> dict:
    """Seconds per call of ``fn`` on the host clock, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return quantiles(samples)


def time_cuda(fn, warmup: int = 10, reps: int = 50) -> dict:
    """Seconds per call of ``fn`` with CUDA events, after warm-up (module load, compilation)."""
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
    return quantiles(samples)


def machine() -> dict:
    import numpy
    import torch

    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(rows[0])
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
