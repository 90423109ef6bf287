"""fusedlinear: fused Linear + activation layers for PyTorch.

Numba kernels on the CPU, CuPy raw-CUDA kernels on NVIDIA GPUs, plain PyTorch as the reference;
nothing to compile at install. See README.md.
"""

from . import _startup  # noqa: F401  first: Ctrl-C during the command's imports below is one line

from .backend import available as available_backends
from .backend import use_backend
from .kernels import NAMES as ACTIVATIONS
from .torch_ext import (
    FusedLinear,
    FusedLinearFunction,
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
    FuseReport,
    fuse,
    fused_chain,
    fused_linear,
    unfuse,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "FusedLinear", "FusedLinearFunction", "FusedLinearGELU", "FusedLinearLeakyReLU",
    "FusedLinearReLU", "FusedLinearSigmoid", "FusedLinearSiLU", "FusedLinearTanh", "FusedLinearQuickGELU", "FusedLinearFastGELU", "FusedLinearReLU6", "FusedLinearReLU2", "FusedLinearHardswish", "FusedLinearHardsigmoid", "FusedLinearMish", "FusedLinearSoftplus", "FusedActivation",
    "FusedSequential", "FuseReport",
    "available_backends", "fuse", "fused_chain", "fused_linear", "unfuse", "use_backend", "__version__",
]
