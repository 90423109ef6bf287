"""fusedlinear: fused Linear + activation layers for PyTorch.

Numba kernels on the CPU, CuPy raw-CUDA kernels on NVIDIA GPUs, plain PyTorch as the reference;
nothing to compile at install. See README.md.
"""

from . import _startup  # noqa: F401  first: Ctrl-C during the command's imports below is one line

from .backend import available as available_backends
from .backend import use_backend
from .kernels import NAMES as ACTIVATIONS
from . import torch_ext
from .torch_ext import *  # noqa: F401,F403  the layers, fuse and the functional API (torch_ext.__all__)

__version__ = "0.1.0"

# torch_ext's public names (one list: a fused class added there is exported here too), less the
# chain's autograd.Function, reached as fusedlinear.torch_ext.FusedChainFunction.
__all__ = ["ACTIVATIONS", "available_backends", "use_backend", "__version__",
           *(name for name in torch_ext.__all__ if name != "FusedChainFunction")]
