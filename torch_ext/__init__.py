"""PyTorch layer: autograd (``fused_linear``, ``FusedLinearFunction``) and modules. Calls the backend, never a kernel."""

from .modules import (
    FusedLinear,
    FusedLinearGELU,
    FusedLinearLeakyReLU,
    FusedLinearReLU,
    FusedLinearSigmoid,
    FusedLinearSiLU,
    FusedLinearTanh,
    fuse,
    unfuse,
)
from .ops import FusedLinearFunction, fused_linear

__all__ = [
    "FusedLinear", "FusedLinearGELU", "FusedLinearLeakyReLU", "FusedLinearReLU", "FusedLinearSigmoid",
    "FusedLinearSiLU", "FusedLinearTanh", "FusedLinearFunction", "fused_linear", "fuse", "unfuse",
]
