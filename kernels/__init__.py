"""Kernels: arrays and pointers in, no torch.

* :mod:`~fusedlinear.kernels.activations` — the activation table (the formulas, written once);
* :mod:`~fusedlinear.kernels.tiling` — tile and launch sizes (the tunables);
* :mod:`~fusedlinear.kernels.cpu` — Numba CPU kernels (imported on first use: it starts Numba);
* :mod:`~fusedlinear.kernels.cuda` — CUDA C kernels loaded with CuPy (imported on first use).
"""

from .activations import ACTIVATIONS, ACTIVATION_IDS, NAMES, check_activation

__all__ = ["ACTIVATIONS", "ACTIVATION_IDS", "NAMES", "check_activation"]
