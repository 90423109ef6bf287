"""The activation table: the one place where each g and its derivative is written.

A layer computes ``Z = X Wᵀ + b`` and ``A = g(Z)``; backward, given ``dA``, needs
``dZ = dA ⊙ g'(·)``. Each formula below is a small expression in a subset that is valid
Python *and* valid C++ (after literals become ``T(...)``), so the Numba kernels
(:mod:`fusedlinear.kernels.cpu`), the CUDA kernels (:mod:`fusedlinear.kernels.cuda`) and the
plain-PyTorch backend all evaluate the very same text:

* names: ``z`` (pre-activation), ``a`` (the output ``g(z)``), ``da`` (incoming gradient),
  ``s`` (the leaky-ReLU negative slope);
* functions: ``exp``, ``log1p``, ``tanh``, ``erf``, ``sigmoid(x)``, ``where(cond, x, y)`` (a
  select, not a branch: both sides are evaluated, and the side not taken may be inf or NaN).

``saves`` says what backward needs from forward: ``"a"`` (the output, free: autograd keeps
it anyway), ``"z"`` (one extra (B, N) tensor) or ``"none"``. ReLU, sigmoid and tanh get g'
from A alone (A>0, A(1-A), 1-A²). Leaky ReLU saves Z because with a negative slope the sign
of A no longer tells the sign of Z.

The backward formulas are written as ``dz = ...`` with selects (not ``da * g'``) where PyTorch
selects, so that an infinite ``da`` where g' = 0 gives 0 like PyTorch and not inf*0 = NaN.
Stability at |z| = 1e4: ``exp(-z)`` may overflow to inf, and every formula then divides by it
or multiplies it by 0-free terms, giving the finite limit (``1/(1+inf) = 0``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Activation:
    name: str
    forward: str  # a = g(z)
    backward: str  # dz = dA ⊙ g'(...), in terms of da and the saved tensor
    saves: str  # "a", "z" or "none"

    @property
    def keeps_z(self) -> bool:
        """Whether forward must keep Z (one extra (B, N) tensor) for backward."""
        return self.saves == "z"


# 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2*pi) = 0.3989422804014327, sqrt(2/pi) = 0.7978845608028654
# (the constants of PyTorch's GeluKernel; gelu_tanh's derivative is PyTorch's, term by term).
_TABLE = (
    Activation("identity", "z", "da", "none"),
    Activation("relu", "where(z <= 0.0, 0.0, z)", "where(a <= 0.0, 0.0, da)", "a"),
    Activation("sigmoid", "sigmoid(z)", "da * (1.0 - a) * a", "a"),
    Activation("tanh", "tanh(z)", "da * (1.0 - a * a)", "a"),
    Activation(
        "gelu",
        "0.5 * z * (1.0 + erf(z * 0.7071067811865476))",
        "da * (0.5 * (1.0 + erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * exp(-0.5 * z * z))",
        "z",
    ),
    Activation(
        "gelu_tanh",
        "0.5 * z * (1.0 + tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))",
        "da * (0.5 * (1.0 + tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))"
        " + 0.5 * z * (1.0 - tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))"
        " * tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))"
        " * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z))",
        "z",
    ),
    Activation("silu", "z * sigmoid(z)", "da * sigmoid(z) * (1.0 + z * (1.0 - sigmoid(z)))", "z"),
    Activation("leaky_relu", "where(z > 0.0, z, z * s)", "where(z > 0.0, da, da * s)", "z"),
    # CLIP's default: z·σ(1.702 z) (HF QuickGELUActivation); dz as autograd computes it for that product,
    # operation for operation (mul's dA·σ, plus sigmoid_backward's ((dA·z)·(1-σ))·σ, times 1.702), so
    # overflow and NaN come out as autograd's: at |z| ~ float max (1.702 z = ±inf, (1-σ)·σ = 0) the second
    # term is finite·0 = 0 and g' is 1 or 0, not inf·0 = NaN as 1.702·z·σ(1-σ) gave.
    Activation(
        "quick_gelu",
        "z * sigmoid(1.702 * z)",
        "da * sigmoid(1.702 * z) + da * z * (1.0 - sigmoid(1.702 * z)) * sigmoid(1.702 * z) * 1.702",
        "z",
    ),
    # HF FastGELUActivation ("gelu_fast"): gelu_tanh with sqrt(2/pi) cut to 0.7978845608 and the
    # cube factored; differs from gelu_tanh by ~1e-12, so it is its own entry, written as HF writes it.
    Activation(
        "gelu_fast",
        "0.5 * z * (1.0 + tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)))",
        "da * (0.5 * (1.0 + tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)))"
        " + 0.5 * z * (1.0 - tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z))"
        " * tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)))"
        " * 0.7978845608 * (1.0 + 0.044715 * 3.0 * z * z))",
        "z",
    ),
    # F.relu6 is hardtanh(z, 0, 6): autograd's g' is 0 at both ends (z <= 0 or z >= 6), which A tells.
    Activation("relu6", "where(z <= 0.0, 0.0, where(z >= 6.0, 6.0, z))",
               "where(a <= 0.0, 0.0, where(a >= 6.0, 0.0, da))", "a"),
    # squared ReLU (HF "relu2": square(relu(z))): g' = 2z for z > 0, 0 at and below 0 like autograd.
    Activation("relu2", "where(z <= 0.0, 0.0, z * z)", "where(z <= 0.0, 0.0, 2.0 * z * da)", "z"),
    # PyTorch's hardswish z·min(max(z+3, 0), 6)/6; its backward takes g' = 0 at z = -3 and 1 at z = 3.
    Activation(
        "hardswish",
        "z * where(z + 3.0 <= 0.0, 0.0, where(z + 3.0 >= 6.0, 6.0, z + 3.0)) / 6.0",
        "where(z <= -3.0, 0.0, where(z < 3.0, da * (z / 3.0 + 0.5), da))",
        "z",
    ),
    # PyTorch's hardsigmoid backward is 0 at z = ±3 and multiplies by the *float* 1/6
    # (0.1666666716337204) in every dtype, so float64 gradients match autograd only with that constant.
    Activation(
        "hardsigmoid",
        "where(z + 3.0 <= 0.0, 0.0, where(z + 3.0 >= 6.0, 6.0, z + 3.0)) / 6.0",
        "where(z > -3.0, where(z < 3.0, da * 0.1666666716337204, 0.0), 0.0)",
        "z",
    ),
    # F.mish: z·tanh(log1p(exp(z))), no threshold (exp overflows to inf, tanh(inf) = 1: a = z);
    # g' is PyTorch's mish_backward term by term.
    Activation(
        "mish",
        "z * tanh(log1p(exp(z)))",
        "da * (tanh(log1p(exp(z))) + z * sigmoid(z) * (1.0 - tanh(log1p(exp(z))) * tanh(log1p(exp(z)))))",
        "z",
    ),
    # F.softplus with its defaults beta = 1, threshold = 20: z itself above 20, as PyTorch does.
    Activation("softplus", "where(z > 20.0, z, log1p(exp(z)))",
               "where(z > 20.0, da, da * exp(z) / (exp(z) + 1.0))", "z"),
)

ACTIVATIONS: dict[str, Activation] = {act.name: act for act in _TABLE}
# Kernels receive the activation as a small integer: its position in the table.
ACTIVATION_IDS: dict[str, int] = {act.name: i for i, act in enumerate(_TABLE)}
NAMES: tuple[str, ...] = tuple(ACTIVATIONS)


def check_activation(name: str) -> Activation:
    """The table entry for ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; valid activations are {', '.join(NAMES)}"
        ) from None


def saved_name(act: Activation) -> str:
    """The variable the backward formula reads besides ``da``: ``"a"``, ``"z"`` or ``""``."""
    return "" if act.saves == "none" else act.saves


def table_digest() -> str:
    """A hash of every formula: compiled kernels are valid only for the table they were built from."""
    text = "\n".join(f"{a.name}|{a.forward}|{a.backward}|{a.saves}" for a in _TABLE)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?)")


def to_cpp(expr: str) -> str:
    """The C++ form of a table expression: float literals become ``T(...)`` so float kernels stay in float."""
    return _FLOAT_LITERAL.sub(r"T(\1)", expr)
