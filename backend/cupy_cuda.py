"""Backend "cupy": CUDA tensors of every float dtype, through fusedlinear.kernels.cuda.

Two engines, chosen once per process by ``FUSEDLINEAR_CUDA_GEMM`` (``fusedlinear info`` shows it):

* ``vendor`` (default): the GEMMs are PyTorch's (``torch.addmm``/``torch.mm``: cuBLAS/cuBLASLt,
  with the bias added in cuBLASLt's epilogue as ``nn.Linear`` does, the TF32 setting
  ``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision``, graph-safe
  workspaces); the element-wise work is ours, one pass each: forward A = g(Z) (in place over Z
  when backward keeps A), backward dZ = dA ⊙ g'(A or Z) together with db's column sums (one
  launch). Launches per layer, GEMMs included: forward 1 (identity) or 2; backward at most 3
  (dZ+db pass, dX, dW) — as eager PyTorch (tests/test_cuda_emulation.py asserts the counts).
  ``torch._addmm_activation`` (cuBLASLt's RELU/GELU epilogues) is not used: its GELU is the tanh
  approximation, returns no Z (which gelu_tanh's backward needs), and cuBLASLt's ReLU epilogue
  (max(z, 0)) is not documented to propagate NaN as ``torch.relu`` does.
* ``own``: our tiled SIMT GEMM with the forward epilogue fused in (float32/float64; the 16-bit
  dtypes take the vendor path), the same dZ+db pass, and our GEMMs for dX and dW.

Both: launches go to PyTorch's *current* CUDA stream of the tensor's device (they order with the
surrounding torch ops and are captured by CUDA graphs); every output and workspace is allocated
by PyTorch (its caching allocator and graph pools); nothing synchronises with the host; no
atomics, so results are deterministic. float16/bfloat16: element-wise math and db in float32.
Operands may have padded rows (read in place); other layouts are copied (``.contiguous()``) for
the own GEMM only, PyTorch's GEMMs take any strides; the dZ+db pass reads dA with any strides
(stride 0 too: the expanded gradient of ``.sum()`` is not copied). The element-wise kernels
move 16 bytes per load and store (8 float16/bfloat16, 4 float32 or 2 float64 elements) where the
addresses allow it, element by element elsewhere, with the same results either way.

Host cost per call (benchmarks/host_overhead.py measures it with the CuPy launch stubbed): plans
are cached per shape and carry their prebuilt argument blocks (kernels.cuda.Plan); with one
visible GPU no device query happens per launch.

``forward``/``backward`` run on the GPU; ``vendor_forward`` etc. take the launcher as an argument,
which is how tests/test_cuda_emulation.py runs this very code on CPU tensors through the C++
emulation of the kernels.
"""

from __future__ import annotations

import os

import torch

from ..kernels import activations as _acts
from ..kernels import cuda as _cuda
from .layout import DTYPE_NAMES, matrix_operand

ENGINE_VAR = "FUSEDLINEAR_CUDA_GEMM"
ENGINES = ("vendor", "own")
_SAVES = {name: act.saves for name, act in _acts.ACTIVATIONS.items()}  # what backward needs: "a", "z" or "none"


def _read_engine() -> tuple[str | None, str | None]:
    value = os.environ.get(ENGINE_VAR, "vendor") or "vendor"
    if value not in ENGINES:
        return None, (f"{ENGINE_VAR}={value!r} is not a CUDA GEMM engine; use one of {', '.join(ENGINES)} "
                      f"(or unset it for 'vendor')")
    return value, None


ENGINE, _ENGINE_ERROR = _read_engine()  # read once, at import


def engine() -> str:
    """The CUDA GEMM engine this process uses: ``"vendor"`` or ``"own"``."""
    if ENGINE is None:
        raise ValueError(_ENGINE_ERROR)
    return ENGINE


_one_device: bool | None = None  # one visible GPU: a tensor's device is the current one, no query per launch


def gpu_launch(plan, buffers: dict, device: torch.device) -> None:
    """Run ``plan`` on ``buffers`` (name -> tensor on ``device``) on PyTorch's current stream there."""
    global _one_device
    if not plan:
        return
    reason = _cuda.unavailable_reason()
    if reason:
        raise RuntimeError(f"fusedlinear backend 'cupy': {reason}; or use use_backend('torch')")
    index = device.index
    if _one_device is None:
        _one_device = torch.cuda.device_count() == 1
    if _one_device or index == torch.cuda.current_device():
        # public API (a private raw-stream call broke across releases); no device argument to parse
        stream = torch.cuda.current_stream().cuda_stream
        _cuda.run_plan(plan, buffers, index, stream)
    else:
        with torch.cuda.device(index):
            _cuda.run_plan(plan, buffers, index, torch.cuda.current_stream().cuda_stream)


def vendor_forward(x, w, b, activation, slope, launch):
    """Z = X Wᵀ + b by PyTorch (cuBLASLt adds the bias, as in nn.Linear), then A = g(Z) by one
    kernel: in place over Z unless backward keeps Z."""
    z = torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())
    if not z.is_contiguous():
        z = z.contiguous()
    keep_z = _SAVES[activation] == "z"
    a = torch.empty_like(z) if keep_z else z
    launch(_cuda.act_forward_plan(DTYPE_NAMES[x.dtype], z.numel(), activation, float(slope)), {"a": a, "z": z}, x.device)
    return a, (z if keep_z else x.new_empty(0))


def _rows_readable(t) -> bool:
    """Whether the own GEMM reads ``t`` (2-D) in place: row-major, rows possibly padded."""
    (m, n), (s0, s1) = t.shape, t.stride()
    return (s1 == 1 or n == 1) and (m == 1 or s0 >= n)


def _grad_pass(grad, saved, x, activation, slope, mask, launch, rows_needed=False):
    """dZ (when dX or dW needs it) and db, in one launch and one pass over dA (any strides, 0
    included: an expanded gradient from ``.sum()`` is read in place) and the saved tensor:
    (dZ, db). For the identity, dZ is dA itself, unless ``rows_needed`` (the own GEMMs read
    row-major operands) and dA is not: then the pass writes dZ = dA, instead of a separate copy."""
    m, n = grad.shape
    in_place = activation == "identity" and not (rows_needed and not _rows_readable(grad))
    want_dz = (mask[0] or mask[1]) and not in_place
    want_db = bool(mask[2])
    dz = grad if in_place else (x.new_empty(m, n) if want_dz else None)
    db = x.new_empty(n) if want_db else x.new_empty(0)
    if want_dz or want_db:
        buffers = {"da": grad, "db": db}
        if want_dz:
            buffers["dz"] = dz
        if _SAVES[activation] != "none":
            buffers["saved"] = saved if saved.is_contiguous() else saved.contiguous()
        launch(_cuda.grad_plan(DTYPE_NAMES[x.dtype], m, n, grad.stride(), activation, float(slope), want_dz, want_db),
               buffers, x.device)
    return dz, db


def vendor_backward(grad, saved, x, w, activation, slope, mask, launch):
    """The dZ + db pass, then dX = dZ W and dW = dZᵀ X by PyTorch."""
    dz, db = _grad_pass(grad, saved, x, activation, slope, mask, launch)
    dx = torch.mm(dz, w) if mask[0] else x.new_empty(0)
    dw = torch.mm(dz.t(), x) if mask[1] else x.new_empty(0)
    return dx, dw, db


def own_forward(x, w, b, activation, slope, launch):
    """The own GEMM with the epilogue fused in (float32/float64; other dtypes: vendor_forward)."""
    dtype = DTYPE_NAMES[x.dtype]
    if dtype not in _cuda.GEMM_DTYPES:
        return vendor_forward(x, w, b, activation, slope, launch)
    (m, k), n = x.shape, w.shape[0]
    xk, ldx, _ = matrix_operand(x, transposed_ok=False)
    wk, ldw, _ = matrix_operand(w, transposed_ok=False)
    a = x.new_empty(m, n)
    z = x.new_empty(m, n) if _SAVES[activation] == "z" else x.new_empty(0)
    buffers = {"a": a, "z": z, "x": xk, "w": wk}
    if b is not None:
        buffers["b"] = b if b.is_contiguous() else b.contiguous()
    launch(_cuda.gemm_forward_plan(dtype, m, n, k, ldx, ldw, b is not None, activation, float(slope)),
           buffers, x.device)
    return a, z


def own_backward(grad, saved, x, w, activation, slope, mask, launch):
    """The dZ + db pass, then dX and dW by the own GEMM (float32/float64; other dtypes: vendor)."""
    dtype = DTYPE_NAMES[x.dtype]
    if dtype not in _cuda.GEMM_DTYPES:
        return vendor_backward(grad, saved, x, w, activation, slope, mask, launch)
    (m, k), n = x.shape, w.shape[0]
    dz, db = _grad_pass(grad, saved, x, activation, slope, mask, launch, rows_needed=True)
    dx = x.new_empty(m, k) if mask[0] else x.new_empty(0)
    dw = x.new_empty(n, k) if mask[1] else x.new_empty(0)
    if mask[0] or mask[1]:
        dz, ld_dz, _ = matrix_operand(dz, transposed_ok=False)  # never copies: see rows_needed
        xk, ldx, _ = matrix_operand(x, transposed_ok=False)
        wk, ldw, _ = matrix_operand(w, transposed_ok=False)
        launch(_cuda.gemm_backward_plan(dtype, m, n, k, ldx, ldw, ld_dz, bool(mask[0]), bool(mask[1])),
               {"dz": dz, "x": xk, "w": wk, "dx": dx, "dw": dw}, x.device)
    return dx, dw, db


def _refuse(*args):
    raise ValueError(_ENGINE_ERROR)


_ENGINE_FUNCTIONS = {"vendor": (vendor_forward, vendor_backward), "own": (own_forward, own_backward)}
_forward, _backward = _ENGINE_FUNCTIONS.get(ENGINE, (_refuse, _refuse))


def forward(x, w, b, activation, slope):
    if torch.is_autocast_enabled("cuda"):  # our GEMMs must run in x's dtype, whatever autocast says
        with torch.autocast("cuda", enabled=False):
            return _forward(x, w, b, activation, slope, gpu_launch)
    return _forward(x, w, b, activation, slope, gpu_launch)


def backward(grad, saved, x, w, activation, slope, mask):
    if torch.is_autocast_enabled("cuda"):
        with torch.autocast("cuda", enabled=False):
            return _backward(grad, saved, x, w, activation, slope, mask, gpu_launch)
    return _backward(grad, saved, x, w, activation, slope, mask, gpu_launch)


def unavailable_reason() -> str | None:
    return _ENGINE_ERROR or _cuda.unavailable_reason()
