"""Backend "torch": plain PyTorch ops. The reference, and the fallback for what no kernel covers.

Forward is PyTorch's own ``F.linear`` and activation; backward evaluates the activation
table's derivative formula with torch ops (in float32 for half-precision inputs, as PyTorch's
own activation backward kernels do), then the three matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import activations as _acts
from . import activations as _registry

FORWARD = {name: entry.torch for name, entry in _registry.REGISTRY.items()}  # (z, s) -> g(z)

_NAMESPACE = {"exp": torch.exp, "log1p": torch.log1p, "tanh": torch.tanh, "erf": torch.erf, "sigmoid": torch.sigmoid, "where": torch.where}
_BACKWARD = {name: compile(act.backward, f"<{name} backward>", "eval") for name, act in _acts.ACTIVATIONS.items()}


def forward(x, w, b, activation, slope):
    z = F.linear(x, w, b)
    a = FORWARD[activation](z, slope)
    keep_z = _acts.ACTIVATIONS[activation].keeps_z
    return a, (z if keep_z else w.new_empty(0))  # w, not x: x may be sparse


def grad_z(grad, saved, activation, slope):
    """dZ = dA ⊙ g'(saved), from the activation table's formula."""
    act = _acts.ACTIVATIONS[activation]
    compute = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    env = {"da": grad.to(compute), "s": slope}
    if _acts.saved_name(act):
        env[_acts.saved_name(act)] = saved.to(compute)
    dz = eval(_BACKWARD[activation], dict(_NAMESPACE), env)
    return dz.to(grad.dtype)


def layer(x, w, b, activation, slope):
    """``activation(F.linear(x, w, b))`` alone: any input shape or layout torch takes (nested,
    sparse), any tensor subclass or functorch transform; every op differentiable."""
    return FORWARD[activation](F.linear(x, w, b), slope)


def backward(grad, saved, x, w, activation, slope, mask):
    """Every op is a differentiable torch op, so with grad mode on (``create_graph=True``) the
    result carries a graph in ``grad``, ``saved``, ``x`` and ``w`` (and so second derivatives are
    autograd's), and it runs on functorch's batched tensors (vmap, ``is_grads_batched``)."""
    dz = grad_z(grad, saved, activation, slope)
    dx = dz @ w if mask[0] else w.new_empty(0)  # (w: x may be sparse)
    dw = dz.t() @ x if mask[1] else w.new_empty(0)
    db = dz.sum(0) if mask[2] else w.new_empty(0)
    return dx, dw, db
