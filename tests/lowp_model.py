"""Error model for float16/bfloat16 results: as accurate as eager PyTorch in the same dtype.

A fixed tolerance cannot fit 16-bit GEMM outputs: dW = dZᵀ X sums hundreds of products whose
result is rounded once to an 8-bit (bfloat16) or 11-bit (float16) significand, so its error vs
float64 grows with |dW| (the first GPU run: bfloat16 dW off by 0.15 where |dW| ~ 30, one ulp).
Instead each tensor is compared with what eager PyTorch computes in the same dtype, from the same
inputs, on the same device (``F.linear`` + PyTorch's activation, autograd's backward):

    max|fused − ref64|  ≤  C · max|eager − ref64|  +  ROUNDINGS · u · max|ref64|

* C = 2: the fused path rounds to the 16-bit format at the same points as eager (Z by the same
  GEMM, A = g(Z), dZ = dA·g'(·), each GEMM's output), but g, g' are computed by our kernels, so
  an element may land one rounding away from eager's and feed that into the GEMMs: at most
  about as much error again as eager's own.
* ROUNDINGS · u · max|ref64| with ROUNDINGS = 2: one rounding of the largest value in the
  storage format (unit roundoff u) plus one of slack, for tensors where eager is by chance
  exact (tiny shapes) — the floor is what any 16-bit result of that size can be off by.

A wrong formula (a dropped row, a wrong slope, another activation's derivative, a transposed
index) is off by a fraction of |ref| far above 2 ulps, and fails: tests/test_cuda_emulation.py
plants such bugs and checks this model catches them. float32/float64 keep conftest.TOL.
"""

import torch

C = 2
ROUNDINGS = 2
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def lowp_error(got, eager, ref, dtype, what=""):
    """None if ``got`` is within the model (see the module doc), else the reason, with the numbers."""
    ref = ref.detach().double().cpu()
    err = (got.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    err_eager = (eager.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    floor = ROUNDINGS * UNIT_ROUNDOFF[dtype] * (ref.abs().max().item() if ref.numel() else 0.0)
    bound = C * err_eager + floor
    if not err <= bound:  # NaN fails too
        return (f"{what}: max|fused - float64| = {err:.4g} > {C}·{err_eager:.4g} (eager {dtype} error) "
                f"+ {floor:.4g} ({ROUNDINGS}·u·max|ref|)")
    return None


def assert_like_eager(got, eager, ref, dtype, what=""):
    reason = lowp_error(got, eager, ref, dtype, what)
    assert reason is None, reason
