"""The CUDA sources without a GPU: the generated header is current, and nvcc compiles every
kernel for sm_80 and sm_90 without register spills (the report lists registers and shared memory)."""

import re
import shutil
import subprocess

import pytest

from fusedlinear.kernels import cuda, tiling


def test_activation_header_matches_the_table():
    with open(cuda.HEADER) as f:
        assert f.read() == cuda.activation_header(), (
            "kernels/fl_activations.cuh is stale: run `python -m fusedlinear.kernels.cuda`")


def test_plans_cover_every_kernel_name():
    launched = set()
    for dtype in ("float32", "float64"):
        launched |= {l.kernel for l in cuda.forward_plan(dtype, 5, 6, 7, 7, 7, True, "gelu", 0.0)}
        launched |= {l.kernel for l in cuda.backward_plan(dtype, 5, 6, 7, 7, 7, "gelu", 0.0, (True, True, True))}
    assert launched == set(cuda.kernel_names())


PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def ptxas_report(arch: str, tmp_path) -> dict:
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-std=c++17", "-DFL_EXPLICIT_INSTANTIATIONS",
           f"-I{cuda.HERE}", *(f"-D{k}={v}" for k, v in tiling.cuda_defines().items()),
           "-o", str(tmp_path / f"fl-{arch}.cubin"), cuda.SOURCE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report, current = {}, None
    for line in proc.stderr.splitlines():
        if m := PTXAS_FUNCTION.search(line):
            current = m.group(1)
            report[current] = {}
        elif current and (m := PTXAS_SPILLS.search(line)):
            report[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := PTXAS_USED.search(line)):
            report[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_without_spills(arch, tmp_path):
    report = ptxas_report(arch, tmp_path)
    print(f"\nptxas {arch}:")
    for name, r in sorted(report.items()):
        print(f"  {name:60s} {r.get('registers', '?'):>4} regs  {r.get('smem', 0):>6} B smem  "
              f"{r.get('spill_stores', '?')} B spill stores  {r.get('spill_loads', '?')} B spill loads")
    assert len(report) == len(cuda.kernel_names()), sorted(report)
    spilling = {n: r for n, r in report.items() if r.get("spill_stores") or r.get("spill_loads")}
    assert not spilling, f"register spills: {spilling}"
    for r in report.values():
        assert r["registers"] <= 255 and r["smem"] <= 48 * 1024
