"""The CUDA kernels compiled with g++ and run on the CPU (tests/cuda_emu), launched by the CuPy
backend's own code (fusedlinear.backend.cupy_cuda, with CPU tensors and the emulator as its
launcher), against float64 PyTorch; under ASan+UBSan and under ThreadSanitizer.

Every dtype (float16 and bfloat16 in their storage format), every activation, both engines,
padded and transposed operands, gradient masks, slopes other than the default, and ties at 0."""

import os
import subprocess

import numpy as np
import pytest
import torch

import emulator
from conftest import ACTIVATIONS, TOL, make_inputs, reference
from fusedlinear.backend import cupy_cuda
from fusedlinear.kernels import ACTIVATIONS as TABLE
from fusedlinear.kernels import cuda, tiling

pytestmark = pytest.mark.skipif(not emulator.have_gxx(), reason="g++ not installed")

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
# Against the float64 reference, for inputs with |Z| = O(1):
# - float16 (11-bit significand, unit roundoff 4.9e-4): Z, A, dZ and each GEMM result are rounded
#   once each to float16 (PyTorch's CPU GEMMs accumulate in float32), so an output carries 2-4
#   roundings plus the reference's exact sums: 1e-2 absolute and relative leaves a 5x margin;
# - bfloat16 (8-bit significand, unit roundoff 3.9e-3): the same count of roundings: 5e-2;
# - float32 / float64: conftest.TOL (their reasons are written there).
TOLS = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=5e-2, rtol=5e-2), **TOL}


@pytest.fixture(scope="session")
def builds():
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = emulator.compile_emulator(None, variant)
        return cache[variant]

    return get


def padded_rows(t, extra=3, fill=float("nan")):
    """The same values with each row padded by ``extra`` elements (leading dimension > columns)."""
    big = torch.full((t.shape[0], t.shape[1] + extra), fill, dtype=t.dtype)
    big[:, : t.shape[1]] = t
    return big[:, : t.shape[1]]


def column_major(t):
    return t.t().contiguous().t()


# "zero-padded": for bfloat16 inputs of the vendor engine's addmm, which runs on PyTorch's CPU in
# emulation: PyTorch 2.13's CPU bfloat16 addmm reads a padded input's padding (NaN padding gives
# NaN rows; not so on CUDA, where cuBLAS takes the leading dimension). Our kernels still get NaN
# padding wherever they read a padded operand (dA, the own GEMM's X).
LAYOUTS = {"contiguous": lambda t: t, "padded": padded_rows, "zero-padded": lambda t: padded_rows(t, fill=0.0),
           "transposed": column_major}


def run_case(exe, work, m, k, n, activation, dtype, engine="vendor", bias=True, slope=0.37,
             x_layout="contiguous", w_layout="contiguous", grad_layout="contiguous", mask=(True, True, True),
             inputs=None, log=None):
    """Forward and backward through the backend's ``engine`` functions with the emulated kernels;
    output and every masked-in gradient compared with float64 PyTorch."""
    x, w, b = inputs or make_inputs((m,), k, n, dtype, bias=bias, seed=m + 7 * n)
    launch = emulator.launcher(exe, work, log)
    fwd, bwd = {"vendor": (cupy_cuda.vendor_forward, cupy_cuda.vendor_backward),
                "own": (cupy_cuda.own_forward, cupy_cuda.own_backward)}[engine]
    xk, wk = LAYOUTS[x_layout](x), LAYOUTS[w_layout](w)
    a, z = fwd(xk, wk, b, activation, slope, launch)
    refs = [t.detach().double().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    ref = reference(*refs, activation, slope)
    tol = TOLS[dtype]
    torch.testing.assert_close(a.double(), ref.detach(), **tol, msg=lambda s: f"output: {s}")
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(grad)
    saved = {"a": a, "z": z, "none": x.new_empty(0)}[TABLE[activation].saves]
    dx, dw, db = bwd(LAYOUTS[grad_layout](grad.to(dtype)), saved, xk, wk, activation, slope, mask, launch)
    for name, on, got, want in zip(("dX", "dW", "db"), mask, (dx, dw, db), refs):
        if on and want is not None:
            torch.testing.assert_close(got.double(), want.grad, **tol, msg=lambda s: f"{name}: {s}")
        elif not on:
            assert got.numel() == 0, f"{name} was masked out but computed"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_vendor_engine_matches_float64(builds, tmp_path, activation, dtype):
    # 37 rows: 8 row lanes in the dZ+db pass, so db goes through the block's lane reduction;
    # x and dA with padded rows (read in place by the kernels), a slope other than the default.
    log = []
    run_case(builds("plain"), str(tmp_path), 37, 29, 45, activation, dtype,
             x_layout="zero-padded" if dtype == torch.bfloat16 else "padded",
             grad_layout="zero-padded" if dtype == torch.bfloat16 and activation == "identity" else "padded",
             log=log)  # (the identity's dZ is dA itself, which addmm's sibling mm reads on the CPU)
    kernels = [launch.kernel for plan in log for launch in plan]
    assert cuda.grad_name(activation, str(dtype).removeprefix("torch.")) in kernels
    assert len(log[0]) == (activation != "identity") and len(log[-1]) == 1  # forward: <= 1 kernel besides addmm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_own_engine_matches_float64(builds, tmp_path, activation, dtype):
    # 130 x 131 outputs: several 64-wide tiles in both grid dimensions and 5 K tiles of 16, with
    # remainders everywhere; x with padded rows, W column-major (copied for the own GEMM).
    run_case(builds("plain"), str(tmp_path), 130, 77, 131, activation, dtype, engine="own", x_layout="padded",
             w_layout="transposed", slope=2.5)


MASKS = [(True, False, False), (False, True, False), (False, False, True), (True, True, False),
         (False, True, True), (True, False, True)]


@pytest.mark.parametrize("engine", ["vendor", "own"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("xwb"[i] for i in range(3) if m[i]))
@pytest.mark.parametrize("activation", ["identity", "leaky_relu", "gelu"])
def test_gradient_masks_and_layouts(builds, tmp_path, activation, mask, engine):
    # Each gradient subset; dA transposed (copied) or padded (read in place; for the identity dZ is
    # dA itself, so the own GEMMs read a padded dZ), no bias on some, slope 0.05.
    run_case(builds("plain"), str(tmp_path), 23, 17, 19, activation, torch.float32, engine=engine, bias=mask[2],
             slope=0.05, grad_layout="transposed" if mask[0] else "padded", x_layout="padded", mask=mask)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (1, 5, 300)], ids=lambda s: "x".join(map(str, s)))
def test_tiny_and_wide_shapes(builds, tmp_path, shape, dtype):
    # One row (one chunk: db written directly), one column (32-thread blocks), 300 columns (2 blocks).
    m, k, n = shape
    for activation in ("relu", "silu"):
        run_case(builds("plain"), str(tmp_path), m, k, n, activation, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ties_at_zero_follow_pytorch(builds, tmp_path, activation):
    # Z exactly +0.0, -0.0 and +-1 (X = 0, so Z = b): values and gradients must equal PyTorch's
    # conventions at the kinks (relu'(0) = 0, leaky_relu'(0) = slope) exactly, in float64.
    b = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=torch.float64)
    x, w = torch.zeros(3, 2, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    launch = emulator.launcher(builds("plain"), str(tmp_path))
    a, z = cupy_cuda.vendor_forward(x, w, b, activation, 0.2, launch)
    zrow = b.clone().requires_grad_(True)  # the reference: PyTorch's activation applied to Z itself
    want = reference(torch.ones(1, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64), zrow,
                     activation, 0.2)[0]
    want.backward(torch.ones(4, dtype=torch.float64))
    # exact at the ties (columns 0, 1); at +-1 the C library's exp/tanh/erf may differ by an ulp
    torch.testing.assert_close(a[:, :2], want.detach()[:2].expand(3, 2), atol=0, rtol=0)
    torch.testing.assert_close(a[:, 2:], want.detach()[2:].expand(3, 2), **TOL[torch.float64])
    saved = {"a": a, "z": z, "none": x.new_empty(0)}[TABLE[activation].saves]
    _, _, db = cupy_cuda.vendor_backward(torch.ones(3, 4, dtype=torch.float64), saved, x, w, activation, 0.2,
                                         (False, False, True), launch)
    torch.testing.assert_close(db[:2], 3 * zrow.grad[:2], atol=0, rtol=0)
    torch.testing.assert_close(db[2:], 3 * zrow.grad[2:], **TOL[torch.float64])


@pytest.mark.parametrize("tag", ["f16", "bf16"])
def test_storage_conversions_round_like_pytorch(builds, tmp_path, tag):
    # The host side of fl_types.cuh (the GPU uses PTX cvt): float32 -> 16 bits -> float32 equals
    # PyTorch's conversion bit for bit, over random floats of every magnitude, halfway cases,
    # subnormals of both formats, infinities and NaN.
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    halfway = (np.arange(1, 5000, dtype=np.uint32) << 13) | (1 << 12)  # f16 ties (exponent range varies)
    bf_halfway = (np.arange(1, 5000, dtype=np.uint32) << 16) | (1 << 15)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00000001, 0x33800000, 0x33000000,
                        0x387FC000, 0x477FE000, 0x477FF000, 0x7F7FFFFF], dtype=np.uint32)
    values = np.concatenate([bits, halfway, halfway + (0x30 << 23), bf_halfway, special]).view(np.float32)
    got = emulator.roundtrip(builds("plain"), str(tmp_path), values, tag)
    want = torch.from_numpy(values.copy()).to(DTYPES[tag]).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    mismatch = np.flatnonzero(got[~nan].view(np.uint32) != want[~nan].view(np.uint32))
    assert mismatch.size == 0, f"{mismatch.size} mismatches, e.g. {values[~nan][mismatch[:5]]}"


def _at_offset(t, elements):
    """``t``'s values in a tensor whose address is ``elements`` elements past an allocation's start
    (so not a multiple of 16 bytes for elements * itemsize % 16 != 0), the same strides."""
    flat = torch.full((elements + t.numel() + 8,), float("nan"), dtype=t.dtype)
    out = flat[elements:elements + t.numel()].view(t.shape)
    out.copy_(t)
    return out


def _grad_layouts(g, vector):
    """dA (m, n) as the layouts the dZ+db pass meets: those whose rows it reads as 16-byte vectors
    (contiguous; rows padded to a multiple of 16 bytes; one row expanded down, stride (0, 1)) and
    those it reads element by element (an address off 16; rows padded by one element; a column
    expanded across, stride (1, 0); transposed)."""
    m, n = g.shape
    return {
        "contiguous": g,
        "padded-aligned": padded_rows(g, extra=vector),
        "row-expanded": g[:1].expand(m, n),
        "offset": _at_offset(g, 1),
        "padded-odd": padded_rows(g, extra=1),
        "column-expanded": g[:, :1].expand(m, n),
        "transposed": column_major(g),
    }


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n", [64, 72, 44, 7])
def test_grad_pass_16_byte_and_element_ways_agree(builds, tmp_path, dtype, n):
    # The dZ + db pass takes 16-byte vectors of a thread's columns where dA's rows, saved and dZ
    # are 16-byte aligned, element by element elsewhere: both give the float64 reference's values
    # and the same values (same formula, same summation order). n = 64: every dtype's vector width
    # divides it; 72: too, but the 16-bit types' last block of 256 columns is partly empty; 44:
    # not the 16-bit types' 8; 7: none. 37 rows: 8 row lanes, so db goes through the lane reduction.
    m, vector = 37, 16 // dtype.itemsize
    launch = emulator.launcher(builds("plain"), str(tmp_path))
    gen = torch.Generator().manual_seed(n)
    z = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    for activation in ("relu", "gelu", "identity"):
        saves = TABLE[activation].saves
        saved = {"a": torch.relu(z), "z": z, "none": torch.empty(0)}[saves].to(dtype)
        results = {}
        for name, grad in _grad_layouts(g.to(dtype), vector).items():
            dz, db = cupy_cuda._grad_pass(grad, saved, saved.new_empty(m, 1), activation, 0.1,
                                          (True, True, True), launch, rows_needed=activation == "identity")
            results[name] = (dz.clone(), db.clone())
            # the reference from the values dA actually holds (row/column-expanded layouts repeat one)
            ga = grad.double().contiguous()
            if activation == "identity":
                want = ga
            else:
                zz = z.to(dtype).double()
                want = ga * (zz > 0) if activation == "relu" else torch.func.vjp(
                    lambda t: torch.nn.functional.gelu(t), zz)[1](ga)[0]
            torch.testing.assert_close(dz.double(), want, **TOLS[dtype], msg=lambda s: f"{name} dZ: {s}")
            torch.testing.assert_close(db.double(), want.sum(0), **{k: v * 4 for k, v in TOLS[dtype].items()},
                                       msg=lambda s: f"{name} db: {s}")
        # every layout holding the same dA values as "contiguous" gives the same dZ and db, exactly
        for name in ("padded-aligned", "offset", "padded-odd", "transposed"):
            assert torch.equal(results[name][0], results["contiguous"][0]), (activation, name, "dZ")
            assert torch.equal(results[name][1], results["contiguous"][1]), (activation, name, "db")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_pass_16_byte_and_element_ways_agree(builds, tmp_path, dtype):
    # A = g(Z) in place and out of place, Z at an address off 16 bytes (element by element) and
    # aligned (16-byte vectors, then the count % V tail one by one): the same bits, PyTorch's values.
    exe, work = builds("plain"), str(tmp_path)
    count = 37 * 13  # not a multiple of any vector width
    z = torch.randn(count, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    for activation in ("relu", "silu", "tanh"):
        want = {"relu": torch.relu, "silu": torch.nn.functional.silu, "tanh": torch.tanh}[activation](z.double())
        outs = {}
        for name, zin in (("aligned", z.clone()), ("offset", _at_offset(z, 1)), ("offset-3", _at_offset(z, 3))):
            plan = cuda.act_forward_plan(str(dtype).removeprefix("torch."), count, activation, 0.0)
            a = torch.empty_like(zin) if name != "offset-3" else _at_offset(torch.zeros_like(z), 3)
            emulator.run_plan(exe, work, plan, {"a": a, "z": zin})
            torch.testing.assert_close(a.double(), want, **TOLS[dtype], msg=lambda s: f"{name}: {s}")
            outs[name] = a.clone()
            emulator.run_plan(exe, work, plan, {"a": zin, "z": zin})  # in place
            assert torch.equal(zin, a), (activation, name, "in place")
        assert torch.equal(outs["offset"], outs["aligned"]) and torch.equal(outs["offset-3"], outs["aligned"])


@pytest.mark.parametrize("case", [("vendor", "gelu", torch.float16), ("vendor", "leaky_relu", torch.bfloat16),
                                  ("own", "silu", torch.float64), ("vendor", "tanh", torch.float32)],
                         ids=lambda c: "-".join(map(str, c)))
def test_address_and_undefined_behaviour_sanitizers_clean(builds, tmp_path, case):
    engine, activation, dtype = case
    run_case(builds("asan"), str(tmp_path), 70, 20, 66, activation, dtype, engine=engine, x_layout="padded",
             grad_layout="padded")
    run_case(builds("asan"), str(tmp_path), 1, 1, 1, activation, dtype, engine=engine, bias=False)
    # contiguous dA, 72 columns: the dZ+db pass's 16-byte path (the padded dA above takes the
    # element path), with threads past column 72 in the last block of every dtype; a vector access
    # past a row's end lands in the next row, with the right value, except after the last row
    run_case(builds("asan"), str(tmp_path), 37, 5, 72, activation, dtype, engine=engine)
    # the most row lanes the plans give this dtype (128 in 16-bit types, 64 float32, 16 float64):
    # every lane's slot of db's shared lane sums in range (the shapes above have at most 16 lanes;
    # UBSan checks the index against the array's declared size)
    across = tiling.CUDA_GRAD_COLS * dtype.itemsize // 16
    lanes = (tiling.CUDA_GRAD_THREADS_F64 if dtype == torch.float64 else tiling.CUDA_GRAD_THREADS) // across
    m = 8 * lanes
    assert cuda.grad_plan(str(dtype)[6:], m, 72, (72, 1), "relu", 0.0, True, True)[0].block[1] == lanes
    gen = torch.Generator().manual_seed(lanes)
    z, g = (torch.randn(m, 72, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    dz, db = cupy_cuda._grad_pass(g, torch.relu(z), z.new_empty(m, 1), "relu", 0.0, (True, True, True),
                                  emulator.launcher(builds("asan"), str(tmp_path)))
    want = g.double() * (z > 0)
    torch.testing.assert_close(dz.double(), want, **TOLS[dtype])
    torch.testing.assert_close(db.double(), want.sum(0), **{k: v * 4 for k, v in TOLS[dtype].items()})


def test_thread_sanitizer_clean(builds, tmp_path):
    # emulator.run_plan sets TSAN_OPTIONS=halt_on_error=1: any report fails the run, and the test.
    run_case(builds("tsan"), str(tmp_path), 70, 20, 66, "silu", torch.float32, engine="own")
    run_case(builds("tsan"), str(tmp_path), 40, 9, 33, "gelu_tanh", torch.bfloat16)


def test_emulated_launch_refuses_a_grid_beyond_cuda_limits(builds, tmp_path):
    """As a GPU would: grid.y = 65536 fails the launch instead of running a truncated grid."""
    plan = tmp_path / "plan.txt"
    plan.write_text("buffer a f32 1 -\nbuffer z f32 1 -\n"
                    "launch fl_act_forward_relu_f32 1 65536 1 32 1 1 p:a p:z i:1 d:0.0\n")
    proc = subprocess.run([builds("plain"), str(plan)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "outside CUDA's limits" in proc.stderr


@pytest.mark.parametrize("sync", [True, False], ids=["with-syncthreads", "missing-syncthreads"])
def test_thread_sanitizer_catches_a_missing_syncthreads(tmp_path, sync):
    """The harness is only worth something if it sees the bug it exists for."""
    exe = emulator.compile_emulator(str(tmp_path), "tsan", main="racy_main.cpp",
                                    extra=(f"-DRACY_SYNC={'true' if sync else 'false'}",))
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1"})
    if sync:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0 and "data race" in proc.stderr, proc.stderr[-3000:]


def _lowp_case(exe, work, dtype, activation, slope, shape, grad_rows_kept=None):
    """The vendor path (emulated kernels) in ``dtype``: (output, dX, dW, db). ``grad_rows_kept``
    plants a bug: dA's later rows are dropped, as a kernel that skipped rows would."""
    m, k, n = shape
    x, w, b = make_inputs((m,), k, n, dtype, seed=m + k)
    launch = emulator.launcher(exe, work)
    a, z = cupy_cuda.vendor_forward(x, w, b, activation, slope, launch)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    if grad_rows_kept is not None:
        grad[grad_rows_kept:] = 0
    saved = {"a": a, "z": z, "none": x.new_empty(0)}[TABLE[activation].saves]
    return (a, *cupy_cuda.vendor_backward(grad, saved, x, w, activation, slope, (True, True, True), launch))


def _eager_and_float64(dtype, activation, slope, shape):
    """Eager PyTorch in ``dtype`` and in float64, each (output, dX, dW, db), from the same values."""
    m, k, n = shape
    x, w, b = make_inputs((m,), k, n, dtype, seed=m + k)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    results = []
    for cast in (dtype, torch.float64):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (x, w, b)]
        out = reference(*leaves, activation, slope)
        out.backward(grad.to(cast))
        results.append((out.detach(), *(t.grad for t in leaves)))
    return results


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_lowp_error_model_passes_the_kernels_and_catches_planted_bugs(builds, tmp_path, dtype):
    """tests/lowp_model.py (what tests/test_gpu.py and gpu_smoke.py judge 16-bit results by):
    the kernels pass it at the GPU run's failing shape, and planted bugs fail it."""
    from lowp_model import lowp_error

    exe, work, shape, names = builds("plain"), str(tmp_path), (300, 257, 131), ("output", "dX", "dW", "db")
    for activation in ("tanh", "gelu", "leaky_relu"):
        eager, ref = _eager_and_float64(dtype, activation, 0.37, shape)
        got = _lowp_case(exe, work, dtype, activation, 0.37, shape)
        assert [lowp_error(*t, dtype, nm) for t, nm in zip(zip(got, eager, ref), names)] == [None] * 4
    tiny_eager, tiny_ref = _eager_and_float64(dtype, "silu", 0.37, (1, 2, 3))
    tiny = _lowp_case(exe, work, dtype, "silu", 0.37, (1, 2, 3))
    assert all(lowp_error(g, e, r, dtype) is None for g, e, r in zip(tiny, tiny_eager, tiny_ref))

    def failing(got, eager, ref):
        return [nm for g, e, r, nm in zip(got, eager, ref, names) if lowp_error(g, e, r, dtype, nm)]

    eager, ref = _eager_and_float64(dtype, "leaky_relu", 0.37, shape)
    assert failing(_lowp_case(exe, work, dtype, "leaky_relu", 0.30, shape), eager, ref) == list(names)  # wrong slope
    eager, ref = _eager_and_float64(dtype, "gelu", 0.37, shape)
    assert failing(_lowp_case(exe, work, dtype, "silu", 0.37, shape), eager, ref) == list(names)  # another g
    assert failing(_lowp_case(exe, work, dtype, "gelu", 0.37, shape, grad_rows_kept=299), eager, ref) == \
        ["dX", "dW", "db"]  # one of 300 rows of dA skipped


class _Launches(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what would be kernel launches on a GPU: every aten op PyTorch runs outside our
    launcher except allocations and views (so GEMMs, copies from .contiguous(), fills all count),
    plus one per kernel of each plan our launcher runs."""

    FREE = {"empty", "empty_like", "new_empty", "empty_strided", "t", "transpose", "view", "as_strided",
            "detach", "alias", "_reshape_alias", "expand", "reshape", "unsqueeze", "squeeze", "permute", "slice",
            "select", "is_contiguous", "lift_fresh", "sym_size", "sym_stride"}

    def __init__(self, exe, work):
        super().__init__()
        self.ops, self.ours, self.inside = [], [], False
        inner = emulator.launcher(exe, work)

        def launch(plan, buffers, device):
            self.ours += [launch.kernel for launch in plan]
            self.inside = True
            try:
                inner(plan, buffers, device)
            finally:
                self.inside = False

        self.launch = launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside and name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def take(self):
        count, what = len(self.ops) + len(self.ours), self.ops + self.ours
        self.ops, self.ours = [], []
        return count, what


@pytest.mark.parametrize("grad_kind", ["contiguous", "expanded"])
@pytest.mark.parametrize("case", [("vendor", torch.float32), ("vendor", torch.bfloat16), ("own", torch.float32),
                                  ("own", torch.float64)], ids=lambda c: f"{c[0]}-{str(c[1])[6:]}")
@pytest.mark.parametrize("activation", ["identity", "relu", "tanh", "gelu"])  # saves nothing, A, A, Z
def test_launch_counts_forward_at_most_2_backward_at_most_3(builds, tmp_path, activation, case, grad_kind):
    """Launches per layer, GEMMs and copies included (what the GPU would run): forward <= 2,
    backward <= 3 with every gradient and a bias (db in the same launch as dZ), also for the
    stride-0 gradient of ``out.sum()`` (read in place, never copied); and the values are right."""
    engine, dtype = case
    m, k, n = 70, 29, 45  # 70 rows: 16 row lanes in the dZ+db pass (8 in float64)
    x, w, b = make_inputs((m,), k, n, dtype, seed=11)
    fwd, bwd = {"vendor": (cupy_cuda.vendor_forward, cupy_cuda.vendor_backward),
                "own": (cupy_cuda.own_forward, cupy_cuda.own_backward)}[engine]
    counter = _Launches(builds("plain"), str(tmp_path))
    grad = (torch.ones((), dtype=dtype).expand(m, n) if grad_kind == "expanded" else
            torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
    with counter:
        a, z = fwd(x, w, b, activation, 0.37, counter.launch)
        forward = counter.take()
        saved = {"a": a, "z": z, "none": x.new_empty(0)}[TABLE[activation].saves]
        dx, dw, db = bwd(grad, saved, x, w, activation, 0.37, (True, True, True), counter.launch)
        backward = counter.take()
    assert forward[0] <= 2, forward
    assert backward[0] <= 3, backward
    from lowp_model import assert_like_eager

    results = []
    for cast in (dtype, torch.float64):  # eager in the same dtype (the 16-bit yardstick), and float64
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (x, w, b)]
        out = reference(*leaves, activation, 0.37)
        out.backward(grad.to(cast))
        results.append((out.detach(), *(t.grad for t in leaves)))
    for name, got, eager, want in zip(("output", "dX", "dW", "db"), (a, dx, dw, db), *results):
        if dtype in (torch.float16, torch.bfloat16):
            assert_like_eager(got, eager, want, dtype, name)
        else:
            torch.testing.assert_close(got.double(), want, **TOLS[dtype], msg=lambda s: f"{name}: {s}")
