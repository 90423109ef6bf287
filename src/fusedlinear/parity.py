"""``fusedlinear parity``: every backend that runs on this machine against float64 PyTorch.

For each backend that can run here (``numba`` on the CPU, ``cupy`` on each GPU, ``torch`` on
every device) × each dtype it runs (``backend.BACKENDS``; for ``torch`` also the half dtypes
the others fall back to) × every activation of the table × odd shapes, strided, transposed and
expanded operands, with and without bias, and a 2-layer chain: the output and every gradient
(dX, dW, db) are compared element by element with the same call in float64 PyTorch, computed
from the same values. A spy on the backend's module checks that the forced backend really ran
(a silent fallback cannot pass). One table; exit status 1 on any mismatch.

This module is the float64 error model and the check of one case (:func:`run_case`); the command
that runs them all and prints the table is :mod:`fusedlinear.parity_command`.

Error model (the tolerance). Each element gets an error bound, propagated through the layer
the way rounding errors propagate, in float64 beside the reference values:

* a sum of L products (Z, dX, dW, db) may be off by ``SAFETY·(u + √L·u_acc)·Σ|terms|`` plus
  the propagated error of its inputs; √L, not L: rounding errors of a long sum add like a random
  walk (BLAS blocks and FMAs make them smaller still);
* A = g(Z): ``sup|g'|·err(Z)`` plus ``SAFETY·u·(|A| + |Z|)`` (one rounding, and libm vs PyTorch's
  vectorised exp/erf/tanh; |Z| covers the cancellation in gelu's ``1 + erf`` where A → 0);
* dZ = dA·g'(·): ``sup|g'|·err(dA)`` + ``2·|dA|·(err(Z) + err(A))`` (g' is evaluated at the
  kernel's Z or A; |g''| ≤ 2 for every smooth activation of the table, via A or via Z) plus
  its rounding; where g' jumps (relu and leaky_relu at 0, relu6 at 0 and 6, hardswish and
  hardsigmoid at ±3), an element whose Z is within err(Z) of the point may take either side:
  ``jump·|dA|``. Each activation's sup|g'|, jumps and smoothness are in
  ``fusedlinear.backend.activations`` (relu2's g' = 2z has no global bound: 2(|z| + 1) there).

``u`` is the dtype's unit roundoff; ``u_acc`` the accumulation's: float32 for float16 and
bfloat16 (PyTorch's GEMMs and sums accumulate half dtypes in float32, rounding the result
once), 2⁻¹¹ for float32 on CUDA when PyTorch allows TF32, else ``u``. The "relative error"
of a row is ``max |got − ref| / scale`` with ``scale = bound / tolerance``, and the row is ok
when it is ≤ the tolerance ``SAFETY·u`` (every element within its bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import NAMES
from .torch_ext import fused_chain, fused_linear

SAFETY = 8  # error terms are bounds of one rounding each; 8 of them leave room without hiding a wrong value
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_DTYPES = (torch.float16, torch.bfloat16)
TF32_UNIT_ROUNDOFF = 2.0**-11  # TF32 keeps 10 explicit mantissa bits
TOLERANCE_REASONS = {
    "float64": "8·2⁻⁵³ = 8.9e-16: unit roundoff; sums of L terms also scale with √L·Σ|terms|",
    "float32": "8·2⁻²⁴ = 4.8e-7: unit roundoff (2⁻¹¹ accumulation under TF32 on CUDA); sums scale with √L·Σ|terms|",
    "bfloat16": "8·2⁻⁸ = 3.1e-2: unit roundoff of the stored result; accumulation in float32",
    "float16": "8·2⁻¹¹ = 3.9e-3: unit roundoff of the stored result; accumulation in float32",
}


# The float64 reference of each activation and what its error bound needs (sup|g'| near z, the
# points where g' jumps, whether g' varies smoothly) come from the torch-side registry.
def _reference_table():
    from .backend.activations import REGISTRY

    return {name: (entry.torch, entry.parity) for name, entry in REGISTRY.items()}


REFERENCE = _reference_table()


def check_table() -> None:
    missing = set(NAMES) - set(REFERENCE)
    if missing:
        raise RuntimeError(f"fusedlinear.parity: no float64 PyTorch reference for activation(s) {sorted(missing)}; "
                           "add them to fusedlinear.parity.REFERENCE")


def units(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(u, u_acc): the unit roundoff of ``dtype`` and of its accumulation on ``device`` (see the module doc)."""
    u = UNIT_ROUNDOFF[dtype]
    if dtype in HALF_DTYPES:
        return u, UNIT_ROUNDOFF[torch.float32]
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return u, TF32_UNIT_ROUNDOFF
    return u, u


def tolerance(dtype: torch.dtype) -> float:
    return SAFETY * UNIT_ROUNDOFF[dtype]


def reference(x, layers, grad=None, device="cpu"):
    """Float64 PyTorch values and per-element error bounds for ``fused_chain(x, layers)`` (one
    layer: ``fused_linear``), computed from the same values as the call under test.

    ``x``: the input ``(*, K)``; ``layers``: ``[(weight, bias or None, activation, slope)]`` in the
    dtype of the call; ``grad``: dA of the output, or None for forward only; ``device``: where the
    call under test ran (TF32 on CUDA). Returns ``{name: (reference, bound)}`` for ``output``,
    and with ``grad`` also ``input``, ``weight{i}``, ``bias{i}`` (float64, on the CPU). Computed on
    one thread: these GEMMs are small, and a thread team on a loaded machine spins 100x longer.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(x, layers, grad, device)
    finally:
        torch.set_num_threads(threads)


def _reference(x, layers, grad, device):
    """See :func:`reference`."""
    dtype = x.dtype
    u, u_acc = units(dtype, device)
    fresh = lambda terms: SAFETY * (u + math.sqrt(terms) * u_acc)  # noqa: E731  (one sum of `terms` products)
    k = x.shape[-1]
    x_op = x.detach().double().cpu().requires_grad_(True)
    h = x_op.reshape(math.prod(x.shape[:-1]), k)
    err_h = torch.zeros_like(h)
    params, kept = [], []
    for w, b, activation, slope in layers:
        fn, bounds = REFERENCE[activation]
        w = w.detach().double().cpu().requires_grad_(True)
        b = None if b is None else b.detach().double().cpu().requires_grad_(True)
        params.append((w, b))
        z = F.linear(h, w, b)
        mag = h.detach().abs() @ w.detach().abs().t() + (0 if b is None else b.detach().abs())
        err_z = fresh(w.shape[1]) * mag + err_h @ w.detach().abs().t()
        z.retain_grad()
        a = fn(z, slope)
        za, zd = a.detach().abs(), z.detach().abs()
        err_a = bounds.max_slope(zd, slope) * err_z + SAFETY * u * (za + zd)
        a.retain_grad()
        kept.append((h, err_h, z, err_z, err_a, a))
        h, err_h = a, err_a
    lead = x.shape[:-1]
    out = {"output": (h.detach().reshape(*lead, h.shape[-1]), err_h.reshape(*lead, h.shape[-1]))}
    if grad is None:
        return out
    h.backward(grad.detach().double().cpu().reshape(h.shape))
    err_da = torch.zeros_like(h)
    for i in range(len(layers) - 1, -1, -1):
        activation, slope = layers[i][2], layers[i][3]
        bounds = REFERENCE[activation][1]
        (w, b), (xi, err_x, z, err_z, err_a, a) = params[i], kept[i]
        da = a.grad.abs() + err_da
        zd = z.detach()
        g1 = bounds.max_slope(zd.abs(), slope)
        dz = z.grad.abs()
        err_dz = g1 * err_da + SAFETY * u * da * (g1 + 1 + zd.abs())
        if bounds.smooth:
            err_dz = err_dz + 2 * da * (err_z + err_a)
        for point, jump in bounds.kinks:
            err_dz = err_dz + torch.where((zd - point).abs() <= err_z, jump(slope) * da, 0.0)
        xa, wa = xi.detach().abs(), w.detach().abs()
        m, n = zd.shape
        out[f"weight{i}"] = (w.grad, fresh(m) * (dz.t() @ xa) + err_dz.t() @ xa + dz.t() @ err_x)
        if b is not None:
            out[f"bias{i}"] = (b.grad, fresh(m) * dz.sum(0) + err_dz.sum(0))
        err_da = fresh(n) * (dz @ wa) + err_dz @ wa
    out["input"] = (x_op.grad, err_da.reshape(x.shape))
    return out


def compare(got, ref, bound, dtype) -> tuple[float, bool, str]:
    """(relative error, ok, note) of ``got`` against ``ref`` with per-element ``bound`` (module doc)."""
    tol = tolerance(dtype)
    if got is None:
        return math.inf, False, "missing"
    if tuple(got.shape) != tuple(ref.shape):
        return math.inf, False, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got = got.detach().double().cpu()
    diff = (got - ref).abs()
    diff = torch.where(got == ref, 0.0, diff)  # equal infinities
    diff = torch.where(torch.isnan(diff), math.inf, diff)
    if diff.numel() == 0:
        return 0.0, True, ""
    rel = torch.where(diff == 0, 0.0, diff * tol / bound)
    worst = int(rel.argmax())
    value = float(rel.reshape(-1)[worst])
    ok = value <= tol
    note = "" if ok else (f"at {tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), rel.shape))}: "
                          f"got {got.reshape(-1)[worst].item():.6g}, want {ref.reshape(-1)[worst].item():.6g}")
    return value, ok, note


# ---- one case: the call under test beside its float64 reference --------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    lead: tuple  # leading dimensions of x
    k: int
    widths: tuple  # out_features of each layer (two: a chain)
    bias: bool
    x_layout: str = "contiguous"
    w_layout: str = "contiguous"


# Odd shapes: batch 1 (dW as an outer product), tile remainders, 3-D input; sizes where the CPU
# kernels run on the thread team (2·M·N·K >= 2 MFLOP) and in row bands (M >= 1024).
_SHAPES = [
    ("1x1->1", (1,), 1, (1,), "contiguous", "contiguous"),
    ("7x13->5", (7,), 13, (5,), "contiguous", "contiguous"),
    ("2x3x13->7", (2, 3), 13, (7,), "contiguous", "contiguous"),
    ("37x33->17 x transposed", (37,), 33, (17,), "transposed", "contiguous"),
    ("19x21->11 x row-padded, w transposed", (19,), 21, (11,), "row-padded", "transposed"),
    ("9x20->13 x expanded, w column-strided, b strided", (9,), 20, (13,), "expanded", "column-strided"),
    ("129x130->65 w row-padded", (129,), 130, (65,), "contiguous", "row-padded"),
    ("257x100->70 x transposed", (257,), 100, (70,), "transposed", "contiguous"),
    ("1031x32->31", (1031,), 32, (31,), "contiguous", "contiguous"),
    ("chain 23x17->9->6", (23,), 17, (9, 6), "contiguous", "transposed"),
]
_QUICK = {"7x13->5", "37x33->17 x transposed", "9x20->13 x expanded, w column-strided, b strided",
          "257x100->70 x transposed", "chain 23x17->9->6"}


def cases(quick: bool = False) -> list[Case]:
    return [Case(f"{name} {'bias' if bias else 'no bias'}", lead, k, widths, bias, xl, wl)
            for name, lead, k, widths, xl, wl in _SHAPES if not quick or name in _QUICK for bias in (True, False)]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor with the values of 2-D ``t`` and the memory layout ``layout`` (a view of a new storage)."""
    if layout == "contiguous":
        return t.clone()
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "row-padded":
        return torch.cat([t, t[:, :3]], dim=1)[:, : t.shape[1]]
    if layout == "column-strided":  # strided columns, at a storage offset
        return torch.stack([t, t], dim=2).reshape(t.shape[0], -1)[:, 1::2]
    if layout == "expanded":  # stride-0 rows: every row the first
        return t[:1].expand(t.shape)
    raise ValueError(layout)


def _strided_bias(b: torch.Tensor) -> torch.Tensor:
    """Bias with stride 2 at a storage offset."""
    return torch.stack([b, b]).t().reshape(-1)[1::2]


def run_case(case: Case, activation: str, dtype, device, seed: int) -> dict:
    """The call under test (``fused_linear`` or, for two layers, ``fused_chain``) on ``device`` in
    ``dtype`` against the float64 reference. Returns ``{name: (rel error, ok, note)}`` per tensor."""
    g = torch.Generator().manual_seed(seed)
    slope = 0.2
    x64 = torch.randn(*case.lead, case.k, generator=g, dtype=torch.float64)
    if case.x_layout == "expanded":
        x64 = x64[..., :1, :].expand(x64.shape).clone()
    params, k = [], case.k
    for n in case.widths:
        bound = 1 / math.sqrt(k)  # nn.Linear's initialisation: Z stays O(1)
        w64 = (torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1) * bound
        b64 = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * bound if case.bias else None
        params.append((w64, b64))
        k = n
    grad64 = torch.randn(*case.lead, case.widths[-1], generator=g, dtype=torch.float64)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    x = _layout(to(x64.reshape(-1, case.k)), case.x_layout).reshape(x64.shape).requires_grad_(True) \
        if len(case.lead) == 1 else to(x64).requires_grad_(True)
    layers = []
    for i, (w64, b64) in enumerate(params):
        w = to(w64).requires_grad_(True)
        w_op = _layout(w, case.w_layout if i == len(params) - 1 or len(params) == 1 else "contiguous")
        b_op = None
        if b64 is not None:
            b = to(b64).requires_grad_(True)
            b_op = _strided_bias(b) if case.w_layout == "column-strided" else b * 1
        for t in (w_op, b_op):
            if t is not None:
                t.retain_grad()
        layers.append((w_op, b_op, activation, slope))
    out = fused_linear(x, *layers[0]) if len(layers) == 1 else fused_chain(x, layers)
    out.backward(to(grad64))
    want = reference(x, layers, to(grad64), device)
    got = {"output": out, "input": x.grad}
    for i, (w_op, b_op, _, _) in enumerate(layers):
        got[f"weight{i}"] = w_op.grad
        if b_op is not None:
            got[f"bias{i}"] = b_op.grad
    return {name: compare(got.get(name), ref, bound, dtype) for name, (ref, bound) in want.items()}
