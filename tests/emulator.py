"""Build and run the CPU emulation of the CUDA kernels (tests/cuda_emu) on launch plans.

The plans come from fusedlinear.kernels.cuda, the same functions the CuPy backend launches, so
grid and block sizes, argument order and the sequence of launches are those of the GPU path.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np

from fusedlinear.kernels import cuda, tiling

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "cuda_emu")

VARIANTS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "tsan": ["-O1", "-fsanitize=thread"],
}


def have_gxx() -> bool:
    return shutil.which("g++") is not None


def compile_emulator(out_dir: str, variant: str, source: str = cuda.SOURCE, main: str = "driver.cpp",
                     extra: tuple[str, ...] = ()) -> str:
    exe = os.path.join(out_dir, f"emu-{variant}-{os.path.splitext(os.path.basename(main))[0]}")
    cmd = ["g++", "-std=c++20", "-g", "-pthread", *VARIANTS[variant], f"-I{EMU_DIR}", f"-I{cuda.HERE}",
           f'-DKERNEL_SOURCE="{source}"', *(f"-D{k}={v}" for k, v in tiling.cuda_defines().items()),
           "-DFL_EXPLICIT_INSTANTIATIONS", *extra, os.path.join(EMU_DIR, main), "-o", exe]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def _token(kind, value):
    if kind == "ptr":
        return f"p:{value if value is not None else '-'}"
    return {"i64": "i", "int": "n", "T": "t"}[kind] + f":{value!r}"


def run_plan(exe: str, work: str, plan, dtype: str, inputs: dict, outputs: dict, env=None):
    """Run ``plan`` with ``inputs`` (name -> array) and zeroed ``outputs`` (name -> element count);
    return name -> array for the outputs. Raises with the sanitizer report on a non-zero exit."""
    np_dtype = np.float32 if dtype == "float32" else np.float64
    tag = "f32" if dtype == "float32" else "f64"
    lines = []
    for name, array in inputs.items():
        path = os.path.join(work, f"in-{name}.bin")
        np.ascontiguousarray(array, dtype=np_dtype).tofile(path)
        lines.append(f"buffer {name} {tag} {array.size} {path}")
    for name, count in outputs.items():
        lines.append(f"buffer {name} {tag} {max(count, 1)} -")
    for launch in plan:
        args = " ".join(_token(kind, value) for kind, value in launch.args)
        lines.append(f"launch {launch.kernel.replace(' ', '')} {' '.join(map(str, launch.grid))} "
                     f"{' '.join(map(str, launch.block))} {args}")
    for name in outputs:
        lines.append(f"output {name} {os.path.join(work, f'out-{name}.bin')}")
    plan_path = os.path.join(work, "plan.txt")
    with open(plan_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    proc = subprocess.run([exe, plan_path], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"emulator exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return {name: np.fromfile(os.path.join(work, f"out-{name}.bin"), dtype=np_dtype)[:count]
            for name, count in outputs.items()}, proc.stderr


def forward(exe, work, x, w, b, activation, slope):
    """A (and Z) for numpy X (M, K), W (N, K), b (N,) or None, through the forward plan."""
    dtype = str(x.dtype)
    m, k = x.shape
    n = w.shape[0]
    plan = cuda.forward_plan(dtype, m, n, k, k, k, b is not None, activation, slope)
    inputs = {"x": x, "w": w, **({"b": b} if b is not None else {})}
    outputs = {"a": m * n, "z": m * n}
    out, _ = run_plan(exe, work, plan, dtype, inputs, outputs)
    return out["a"].reshape(m, n), out["z"].reshape(m, n)


def backward(exe, work, da, saved, x, w, activation, slope, mask=(True, True, True)):
    dtype = str(x.dtype)
    m, k = x.shape
    n = w.shape[0]
    plan = cuda.backward_plan(dtype, m, n, k, k, k, activation, slope, mask)
    inputs = {"da": da, "x": x, "w": w, **({"saved": saved} if saved is not None else {})}
    outputs = {"dz": m * n, "partial": cuda.column_chunks(m) * n, "dx": m * k, "dw": n * k, "db": n}
    out, _ = run_plan(exe, work, plan, dtype, inputs, outputs)
    return out["dx"].reshape(m, k), out["dw"].reshape(n, k), out["db"]
