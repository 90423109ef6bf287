"""A short fused forward + backward on the GPU, for compute-sanitizer (memcheck, racecheck).

Odd shapes that leave partial tiles in every grid dimension; every activation; both dtypes.
Exits non-zero if a result disagrees with PyTorch.
"""

import sys

import torch

import fusedlinear

torch.manual_seed(0)
bad = 0
for dtype in (torch.float32, torch.float64):
    for activation in fusedlinear.ACTIVATIONS:
        x = torch.randn(67, 45, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(70, 45, device="cuda", dtype=dtype) / 7).requires_grad_(True)
        b = torch.randn(70, device="cuda", dtype=dtype, requires_grad=True)
        with fusedlinear.use_backend("cupy"):
            out = fusedlinear.fused_linear(x, w, b, activation)
            out.square().sum().backward()
        grads = [t.grad.clone() for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        with fusedlinear.use_backend("torch"):
            ref = fusedlinear.fused_linear(x, w, b, activation)
            ref.square().sum().backward()
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        ok = torch.allclose(out, ref, atol=tol, rtol=tol) and all(
            torch.allclose(g, t.grad, atol=tol, rtol=tol) for g, t in zip(grads, (x, w, b)))
        if not ok:
            print(f"MISMATCH {activation} {dtype}")
            bad += 1
torch.cuda.synchronize()
print("gpu_smoke: all results match" if not bad else f"gpu_smoke: {bad} mismatches")
sys.exit(1 if bad else 0)
