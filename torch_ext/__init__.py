"""PyTorch layer: autograd (``fused_linear``, ``FusedLinearFunction``) and modules. Calls the backend, never a kernel."""

from .modules import (
    FusedLinear,
    FusedLinearGELU,
    FusedLinearLeakyReLU,
    FusedLinearReLU,
    FusedLinearSigmoid,
    FusedLinearSiLU,
    FusedLinearTanh,
    FusedLinearQuickGELU,
    FusedLinearFastGELU,
    FusedLinearReLU6,
    FusedLinearReLU2,
    FusedLinearHardswish,
    FusedLinearHardsigmoid,
    FusedLinearMish,
    FusedLinearSoftplus,
    FusedActivation,
    FusedSequential,
)
from .fuse import FuseReport, fuse, unfuse
from .ops import FusedChainFunction, FusedLinearFunction, fused_chain, fused_linear

__all__ = [
    "FusedLinear", "FusedLinearGELU", "FusedLinearLeakyReLU", "FusedLinearReLU", "FusedLinearSigmoid",
    "FusedLinearSiLU", "FusedLinearTanh", "FusedLinearQuickGELU", "FusedLinearFastGELU", "FusedLinearReLU6", "FusedLinearReLU2", "FusedLinearHardswish", "FusedLinearHardsigmoid", "FusedLinearMish", "FusedLinearSoftplus", "FusedActivation", "FusedSequential", "FuseReport", "FusedChainFunction", "FusedLinearFunction", "fused_chain", "fused_linear", "fuse", "unfuse",
]
