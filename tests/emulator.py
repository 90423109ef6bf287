"""Build and run the CPU emulation of the CUDA kernels (tests/cuda_emu) on launch plans.

The plans come from fusedlinear.kernels.cuda, and the launches from fusedlinear.backend.cupy_cuda
itself: :func:`launcher` returns a function with the signature of the backend's GPU launcher
(plan, name -> tensor, device), so the backend's own code — its GEMM calls, workspaces, leading
dimensions and plans — runs on CPU tensors with the kernels executed by the emulator. Buffers
cross as raw bytes of each tensor's storage span (padded rows included), so float16 and bfloat16
reach the kernels in their storage format, at their tensor's address modulo 16 (the kernels take
16-byte loads where addresses allow).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np
import torch

from fusedlinear.kernels import cuda, tiling

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "cuda_emu")

VARIANTS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "tsan": ["-O1", "-fsanitize=thread"],
}
TAGS = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}


def have_gxx() -> bool:
    return shutil.which("g++") is not None


def _command(exe, variant, main, extra):
    return ["g++", "-std=c++20", "-g", "-pthread", *VARIANTS[variant], f"-I{EMU_DIR}", f"-I{cuda.HERE}",
            *(f"-D{k}={v}" for k, v in tiling.cuda_defines().items()), *extra, os.path.join(EMU_DIR, main), "-o", exe]


def compile_emulator(out_dir: str | None, variant: str, main: str = "driver.cpp", extra: tuple[str, ...] = ()) -> str:
    """Build the emulator; cached (under the temp dir, or ``out_dir``) by the digest of the command
    and every source it reads, so a changed kernel or table always rebuilds (g++ takes minutes)."""
    text = "".join(open(os.path.join(d, f)).read() for d in (EMU_DIR, cuda.HERE)
                   for f in sorted(os.listdir(d)) if f.endswith((".cu", ".cuh", ".h", ".cpp")))
    digest = hashlib.sha256((text + repr(_command("", variant, main, extra))).encode()).hexdigest()[:16]
    out_dir = out_dir or os.path.join(tempfile.gettempdir(), f"fusedlinear-emu-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, f"emu-{variant}-{os.path.splitext(main)[0]}-{digest}")
    if not os.path.exists(exe):
        subprocess.run(_command(exe + ".tmp", variant, main, extra), check=True, capture_output=True, text=True)
        os.replace(exe + ".tmp", exe)
    return exe


def _span(t: torch.Tensor) -> torch.Tensor:
    """The 1-D view of the storage a kernel may touch through t's data pointer (padding included)."""
    if t.numel() == 0:
        return t.reshape(0)
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.as_strided((extent,), (1,), t.storage_offset())


def _token(kind, value):
    if kind == "ptr":
        return f"p:{value if value is not None else '-'}"
    return {"i64": "i", "f64": "d"}[kind] + f":{value!r}"


def run_plan(exe: str, work: str, plan, buffers: dict[str, torch.Tensor], env=None) -> str:
    """Run ``plan`` on ``buffers`` (name -> CPU tensor; tensors sharing a data pointer become one
    buffer) and copy every buffer back into its tensor. Checks CUDA's grid limits itself (the
    emulated launch checks them again). Returns the emulator's stderr; raises with it on failure."""
    lines, spans, by_ptr = [], {}, {}
    for name, t in buffers.items():
        if t.dtype not in TAGS:
            raise TypeError(f"buffer {name}: dtype {t.dtype} has no kernel")
        ptr = t.data_ptr()
        if t.numel() and ptr in by_ptr:
            lines.append(f"alias {name} {by_ptr[ptr]}")
            continue
        span = _span(t)
        spans[name] = span
        if t.numel():
            by_ptr[ptr] = name
        path = os.path.join(work, f"in-{name}.bin") if span.numel() else "-"
        if span.numel():
            span.contiguous().view(torch.uint8).numpy().tofile(path)
        # the same address mod 16 as the tensor's (PyTorch's CPU allocations are 64-byte aligned, a
        # view's offset moves it as on a GPU), for the kernels' 16-byte accesses
        lines.append(f"buffer {name} {TAGS[t.dtype]} {max(span.numel(), 1)} {path} {ptr % 16}")
    for launch in plan:
        assert all(1 <= g <= lim for g, lim in zip(launch.grid, tiling.CUDA_GRID_MAX)), launch
        assert 1 <= launch.block[0] * launch.block[1] * launch.block[2] <= tiling.CUDA_BLOCK_MAX_THREADS, launch
        args = " ".join(_token(kind, value) for kind, value in launch.args)
        lines.append(f"launch {launch.kernel} {' '.join(map(str, launch.grid))} {' '.join(map(str, launch.block))} {args}")
    for name in spans:
        lines.append(f"output {name} {os.path.join(work, f'out-{name}.bin')}")
    plan_path = os.path.join(work, "plan.txt")
    with open(plan_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    proc = subprocess.run([exe, plan_path], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"emulator exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    with torch.no_grad():  # raw memory, as a kernel writes it (inputs come back unchanged)
        for name, span in spans.items():
            if span.numel():
                raw = np.fromfile(os.path.join(work, f"out-{name}.bin"), dtype=np.uint8)
                span.copy_(torch.from_numpy(raw).view(span.dtype)[: span.numel()])
    return proc.stderr


def launcher(exe: str, work: str, log: list | None = None):
    """A launcher with the backend's signature (plan, buffers, device) running on the emulator;
    appends each plan (empty ones too) to ``log`` if given."""

    def launch(plan, buffers, device):
        assert device.type == "cpu", device
        if log is not None:
            log.append(plan)
        if plan:
            run_plan(exe, work, plan, buffers)

    return launch


def roundtrip(exe: str, work: str, values: np.ndarray, tag: str) -> np.ndarray:
    """float32 values -> the kernels' float16 or bfloat16 conversion -> float32."""
    src, dst = os.path.join(work, "rt-in.bin"), os.path.join(work, "rt-out.bin")
    values = np.ascontiguousarray(values, dtype=np.float32)
    values.tofile(src)
    with open(os.path.join(work, "rt.txt"), "w") as f:
        f.write(f"roundtrip {tag} {values.size} {src} {dst}\n")
    subprocess.run([exe, os.path.join(work, "rt.txt")], check=True, capture_output=True, timeout=300)
    return np.fromfile(dst, dtype=np.float32)
