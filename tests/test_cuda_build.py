"""The CUDA sources and plans without a GPU: the generated header is current, the text CuPy
compiles covers every line (so its disk cache cannot serve a stale kernel), plans stay inside
CUDA's launch limits at any batch size, and nvcc compiles every kernel of both modules for sm_80
and sm_90 without register spills."""

import re
import shutil
import subprocess

import pytest

from fusedlinear.kernels import activations, cuda, tiling


def test_activation_header_matches_the_table():
    with open(cuda.HEADER) as f:
        assert f.read() == cuda.activation_header(), (
            "kernels/fl_activations.cuh is stale: run `python -m fusedlinear.kernels.cuda`")


@pytest.mark.parametrize("module", list(cuda.SOURCES))
def test_compiled_text_inlines_every_header_and_options_carry_the_table_digest(module):
    # CuPy keys its disk cache on (source text, options): with the headers inlined, a changed
    # activation table or storage type changes the key.
    text = cuda.module_source(module)
    assert '#include "' not in text
    assert cuda.activation_header().splitlines()[5] in text  # a line of the generated header
    assert f"-DFL_TABLE_DIGEST=0x{activations.table_digest()}" in cuda.compile_options()
    if module == "elementwise":
        assert "fl_float_to_half" in text


def test_plans_launch_only_kernels_the_modules_define():
    names = {m: set(cuda.kernel_names(m)) for m in cuda.SOURCES}
    launched = []
    for dtype in cuda.TAGS:
        for act in activations.NAMES:
            launched += cuda.act_forward_plan(dtype, 100, act, 0.1)
            launched += cuda.grad_plan(dtype, 100, 7, (9, 1), act, 0.1, True, True)
    for dtype in cuda.GEMM_DTYPES:
        for act in activations.NAMES:
            launched += cuda.gemm_forward_plan(dtype, 5, 6, 7, 7, 7, True, act, 0.0)
        launched += cuda.gemm_backward_plan(dtype, 5, 6, 7, 7, 7, 6, True, True)
    for launch in launched:
        assert launch.kernel in names[launch.module], launch.kernel
    # every compiled kernel is launched by some plan, except A = identity(Z), which needs no pass
    unlaunched = (names["elementwise"] | names["gemm"]) - {l.kernel for l in launched}
    assert unlaunched == {cuda.act_forward_name("identity", d) for d in cuda.TAGS}


@pytest.mark.parametrize("m", [1, 2, 3, 64, 8192, 2**22 + 1, 2**31 - 1, 2**33])
def test_plans_stay_within_cuda_launch_limits_at_any_batch(m):
    # Launch() checks every grid on construction; the dZ+db pass is one launch whose blocks cover
    # every column (each block walks all rows of its 32 columns; each thread owns 16 bytes of them).
    n = 300
    for dtype, size, limit in (("float16", 2, tiling.CUDA_GRAD_THREADS), ("float32", 4, tiling.CUDA_GRAD_THREADS),
                               ("float64", 8, tiling.CUDA_GRAD_THREADS_F64)):
        plan = cuda.grad_plan(dtype, m, n, (n, 1), "relu", 0.0, True, True)
        (gx, gy, gz), (bx, by, bz) = plan[0].grid, plan[0].block
        assert len(plan) == 1 and (gy, gz, bz) == (1, 1, 1)
        assert (gx - 1) * tiling.CUDA_GRAD_COLS < n <= gx * tiling.CUDA_GRAD_COLS
        assert bx * (16 // size) == tiling.CUDA_GRAD_COLS and bx * by <= limit and by & (by - 1) == 0  # lanes: 2^k
        assert by * 8 >= m or by == limit // bx  # a lane per 8 rows, up to the block's thread limit
    if m < 2**31:
        (gx, gy, _), _ = tiling.cuda_gemm_grid(m, n)
        assert gx * tiling.CUDA_TILE_M >= m and gy * tiling.CUDA_TILE_N >= n
        cuda.gemm_forward_plan("float32", m, n, 5, 5, 5, True, "relu", 0.0)


def test_launch_beyond_the_limits_is_refused():
    with pytest.raises(ValueError, match="outside the limits"):
        cuda.Launch("gemm", "fl_gemm_nn_f32", (1, 65536, 1), (256, 1, 1), ())
    with pytest.raises(ValueError, match="outside the limits"):
        cuda.gemm_forward_plan("float32", 64, 64 * 65536, 5, 5, 5, False, "relu", 0.0)  # N tiles on grid y


PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes cumulative stack size)?(?:, (\d+) bytes smem)?")


def ptxas_report(module: str, arch: str, tmp_path) -> dict:
    """Compile exactly the text and options CuPy compiles (plus CuPy's own -ftz=true) with nvcc."""
    source = tmp_path / f"{module}.cu"
    source.write_text(cuda.module_source(module))
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-ftz=true", *cuda.compile_options(),
           "-o", str(tmp_path / f"{module}-{arch}.cubin"), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report, current = {}, None
    for line in proc.stderr.splitlines():
        if m := PTXAS_FUNCTION.search(line):
            current = m.group(1)
            report[current] = {}
        elif current and (m := PTXAS_SPILLS.search(line)):
            report[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := PTXAS_USED.search(line)):
            report[current].update(registers=int(m.group(1)), smem=int(m.group(3) or 0))
    return report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("module", list(cuda.SOURCES))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_without_spills(module, arch, tmp_path):
    report = ptxas_report(module, arch, tmp_path)
    print(f"\nptxas {module} {arch}:")
    for name, r in sorted(report.items()):
        print(f"  {name:40s} {r.get('registers', '?'):>4} regs  {r.get('smem', 0):>6} B smem  "
              f"{r.get('stack', '?')} B stack  {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} B spills")
    assert set(report) == set(cuda.kernel_names(module))
    spilling = {n: r for n, r in report.items() if r.get("spill_stores") or r.get("spill_loads") or r.get("stack")}
    assert not spilling, f"register spills or local memory: {spilling}"
    # every block the plans launch fits one SM's 64 K registers, whatever the instance's count
    for name, r in report.items():
        threads = (tiling.CUDA_THREADS if module == "gemm" else tiling.CUDA_GRAD_THREADS_F64
                   if name.startswith("fl_grad_") and name.endswith("_f64") else
                   max(tiling.CUDA_EW_THREADS, tiling.CUDA_GRAD_THREADS))
        assert r["registers"] <= 255 and r["smem"] <= 48 * 1024
        assert r["registers"] * threads <= 65536, f"{name}: {r['registers']} registers x {threads} threads"


PTX_16_BYTES = re.compile(r"\b(ld|st)\.global(?:\.nc)?\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_elementwise_kernels_load_and_store_16_bytes_at_once(arch, tmp_path):
    # fl_load16/fl_store16 are meant to be one 16-byte access each; NVVM is free to split a struct
    # copy into scalar accesses (it split dZ's store in 55 of the 64 fl_grad instances), and the
    # emulator cannot see that: every kernel's PTX must hold a 16-byte global load and store.
    source, ptx = tmp_path / "elementwise.cu", tmp_path / "elementwise.ptx"
    source.write_text(cuda.module_source("elementwise"))
    proc = subprocess.run(["nvcc", "-ptx", f"-arch={arch}", "-ftz=true", *cuda.compile_options(), "-o", str(ptx),
                           str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    wide = {body.split("(", 1)[0]: {m.group(1) for m in PTX_16_BYTES.finditer(body)}
            for body in ptx.read_text().split(".visible .entry ")[1:]}
    assert set(wide) == set(cuda.kernel_names("elementwise"))
    narrow = {name: sorted({"ld", "st"} - ops) for name, ops in wide.items() if ops != {"ld", "st"}}
    assert not narrow, f"{len(narrow)} kernels without a 16-byte global load/store: {narrow}"


@pytest.mark.parametrize("value,engine", [("", "vendor"), ("own", "own"), ("vendor", "vendor"), ("cublas", None)])
def test_engine_variable(value, engine):
    """FUSEDLINEAR_CUDA_GEMM picks the engine at import; a bad value makes the cupy backend
    unavailable with a message naming the value and the choices (and `fusedlinear info` says so)."""
    import os
    import sys

    code = ("from fusedlinear.backend import cupy_cuda as c; print(c.ENGINE); "
            "print(c._ENGINE_ERROR or ''); print(c._forward.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FUSEDLINEAR_CUDA_GEMM": value})
    assert proc.returncode == 0, proc.stderr
    got, error, forward = proc.stdout.splitlines()
    assert got == str(engine)
    if engine:
        assert not error and forward == f"{engine}_forward"
    else:
        assert "FUSEDLINEAR_CUDA_GEMM='cublas'" in error and "vendor, own" in error and forward == "_refuse"


def _nvrtc():
    try:
        from cupy.cuda import compiler, nvrtc

        nvrtc.getVersion()
        return compiler, nvrtc
    except Exception:  # CuPy or libnvrtc missing (ImportError, OSError, or CuPy's own errors by version)
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy with NVRTC not installed (no GPU needed for this test)")
@pytest.mark.parametrize("module", list(cuda.SOURCES))
@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvrtc_compiles_what_cupy_compiles(module, arch):
    """NVRTC (not nvcc) on the exact text and options CuPy's compile_with_cache uses, CuPy's own
    additions included: every kernel name the executor fetches is an entry of the PTX, no warning."""
    compiler, nvrtc = _nvrtc()
    options = cuda.compile_options() + ("-ftz=true", f"-arch=compute_{arch}", "--device-as-default-execution-space")
    program = compiler._NVRTCProgram(cuda.module_source(module), "kern.cu")
    nvrtc.compileProgram(program.ptr, options)
    entries = set(re.findall(r"\.visible \.entry (\w+)\(", nvrtc.getPTX(program.ptr).decode()))
    assert entries == set(cuda.kernel_names(module))
    assert not nvrtc.getProgramLog(program.ptr).strip()
