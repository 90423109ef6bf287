"""The CUDA kernels compiled with g++ and run on the CPU (tests/cuda_emu), plan for plan as the
CuPy backend launches them, against float64 PyTorch; under ASan+UBSan and under ThreadSanitizer."""

import os

import pytest
import torch

import emulator
from conftest import ACTIVATIONS, TOL, make_inputs, reference

pytestmark = pytest.mark.skipif(not emulator.have_gxx(), reason="g++ not installed")


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("emu-build")
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = emulator.compile_emulator(str(out), variant)
        return cache[variant]

    return get


# (M, K, N): several blocks in every grid dimension of the forward and backward GEMMs (64-wide
# tiles), several K tiles (16), and remainders everywhere; plus the 1x1 -> 1 corner.
SHAPES = [(130, 77, 131), (1, 1, 1), (7, 13, 5)]


def check(exe, work, m, k, n, activation, dtype, bias=True, slope=0.1):
    x, w, b = make_inputs((m,), k, n, dtype, bias=bias, seed=m + n)
    xn, wn = x.numpy(), w.numpy()
    bn = b.numpy() if b is not None else None
    a, z = emulator.forward(exe, work, xn, wn, bn, activation, slope)
    refs = [t.double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    ref = reference(*refs, activation, slope)
    tol = TOL[dtype]
    torch.testing.assert_close(torch.from_numpy(a).double(), ref.detach(), **tol)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(grad)
    saves = {"a": a, "z": z, "none": None}[__import__("fusedlinear").kernels.ACTIVATIONS[activation].saves]
    dx, dw, db = emulator.backward(exe, work, grad.to(dtype).numpy(), saves, xn, wn, activation, slope)
    torch.testing.assert_close(torch.from_numpy(dx).double(), refs[0].grad, **tol)
    torch.testing.assert_close(torch.from_numpy(dw).double(), refs[1].grad, **tol)
    if b is not None:
        torch.testing.assert_close(torch.from_numpy(db).double(), refs[2].grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_emulated_kernels_match_pytorch(builds, tmp_path, activation, shape, dtype):
    m, k, n = shape
    check(builds("plain"), str(tmp_path), m, k, n, activation, dtype, bias=(m != 7))


@pytest.mark.parametrize("activation,dtype", [("gelu", torch.float32), ("relu", torch.float64)])
def test_address_and_undefined_behaviour_sanitizers_clean(builds, tmp_path, activation, dtype):
    check(builds("asan"), str(tmp_path), 130, 77, 131, activation, dtype)
    check(builds("asan"), str(tmp_path), 1, 1, 1, activation, dtype, bias=False)


def test_thread_sanitizer_clean(builds, tmp_path):
    # emulator.run_plan sets TSAN_OPTIONS=halt_on_error=1: any report fails the run, and the test.
    check(builds("tsan"), str(tmp_path), 70, 20, 66, "silu", torch.float32)


@pytest.mark.parametrize("sync", [True, False], ids=["with-syncthreads", "missing-syncthreads"])
def test_thread_sanitizer_catches_a_missing_syncthreads(tmp_path, sync):
    """The harness is only worth something if it sees the bug it exists for."""
    import subprocess

    exe = emulator.compile_emulator(str(tmp_path), "tsan", main="racy_main.cpp",
                                    extra=(f"-DRACY_SYNC={'true' if sync else 'false'}",))
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1"})
    if sync:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0 and "data race" in proc.stderr, proc.stderr[-3000:]
