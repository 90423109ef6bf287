"""A short fused forward + backward on the GPU, for compute-sanitizer (memcheck, racecheck, synccheck).

Both CUDA engines, every float dtype and activation, odd shapes (partial tiles and several row
chunks), row-padded input and gradient (read in place by the kernels), every gradient. Compared
with float64 PyTorch on the CPU; exits non-zero on a mismatch or if our kernels did not run.
"""

import os
import sys

import torch

import fusedlinear
from fusedlinear.backend import cupy_cuda
from fusedlinear.backend.reference import FORWARD
from fusedlinear.kernels import cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from lowp_model import lowp_error  # noqa: E402  (16-bit: as accurate as eager in the same dtype)

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}  # as tests/test_gpu.py (conftest.TOL)
QUICK = "--quick" in sys.argv  # racecheck/initcheck: one 16-bit and one 32-bit dtype, 3 activations
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

launched = []
real_run_plan = cuda.run_plan
cuda.run_plan = lambda plan, *a: (launched.append(len(plan)), real_run_plan(plan, *a))[1]


def padded(t):
    # the padding is left unwritten: a kernel that reads it shows in initcheck (and reads garbage)
    big = torch.empty(t.shape[0], t.shape[1] + 3, dtype=t.dtype, device=t.device)
    big[:, : t.shape[1]] = t
    return big[:, : t.shape[1]]


def reference(x, w, b, activation):
    return FORWARD[activation](torch.nn.functional.linear(x, w, b), 0.3)  # PyTorch's own activations


torch.manual_seed(0)
bad = 0
for engine in ("vendor", "own"):
    cupy_cuda._forward, cupy_cuda._backward = cupy_cuda._ENGINE_FUNCTIONS[engine]
    for dtype in (torch.bfloat16, torch.float32) if QUICK else (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for activation in ("identity", "gelu", "leaky_relu") if QUICK else fusedlinear.ACTIVATIONS:
            x64 = torch.randn(67, 45, dtype=torch.float64)
            w64 = torch.randn(70, 45, dtype=torch.float64) / 7
            b64 = torch.randn(70, dtype=torch.float64)
            g64 = torch.randn(67, 70, dtype=torch.float64)
            leaves = [t.to("cuda", dtype).requires_grad_(True) for t in (x64, w64, b64)]
            with fusedlinear.use_backend("cupy"):
                out = fusedlinear.fused_linear(padded(leaves[0]), *leaves[1:], activation, 0.3)
                out.backward(padded(g64.to("cuda", dtype)))
            eager = [t.detach().clone().requires_grad_(True) for t in leaves]
            out_eager = reference(*eager, activation)
            out_eager.backward(g64.to("cuda", dtype))
            refs = [t.clone().requires_grad_(True) for t in (x64, w64, b64)]
            ref = reference(*refs, activation)
            ref.backward(g64)
            triples = [(out, out_eager, ref)] + [(t.grad, e.grad, r.grad) for t, e, r in zip(leaves, eager, refs)]
            for name, (got, e, want) in zip(("output", "dX", "dW", "db"), triples):
                if dtype in TOL:
                    tol = TOL[dtype]
                    why = None if torch.allclose(got.double().cpu(), want.detach(), atol=tol, rtol=tol) else "allclose"
                else:
                    why = lowp_error(got, e, want, dtype, name)
                if why:
                    print(f"MISMATCH {engine} {activation} {dtype} {why}")
                    bad += 1
torch.cuda.synchronize()
if not launched:
    print("gpu_smoke: our CUDA kernels never ran")
    sys.exit(2)
print(f"gpu_smoke: {sum(launched)} kernel launches, " + ("all results match" if not bad else f"{bad} mismatches"))
sys.exit(1 if bad else 0)
