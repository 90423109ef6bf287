"""What the commands write down about a run: the machine and versions it ran on, dtype names, and
files (JSON, state dicts, figures) written whole or not at all.

Used by ``train``, ``bench`` and ``parity``, and by ``benchmarks/`` (through ``bench.machine_info``).
"""

from __future__ import annotations

import os
import platform
import tempfile

import numpy
import torch

from .backend import numba_cpu

DTYPES = {str(dtype).removeprefix("torch."): dtype
          for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the name of :data:`DTYPES`, and of ``--dtype``)."""
    return str(dtype).removeprefix("torch.")


def machine_info() -> dict:
    """The machine and versions a run used: CPU model, cores, Python, torch, numpy, numba, torch's
    threads, the OpenBLAS kernels the fused CPU path calls (and OPENBLAS_CORETYPE), the GPU if any."""
    import numba  # here, not at the top: ~0.3 s of import that only a finished run pays

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"machine": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "")}
    try:  # the kernels scipy's OpenBLAS (the fused CPU path's BLAS) actually runs
        info["openblas_core"] = numba_cpu.blas_libraries()["openblas"]["core"]
    except ImportError:
        pass
    info["numba"] = numba.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def pyplot(extra: str):
    """matplotlib.pyplot on the Agg backend; RuntimeError naming ``pip install 'fusedlinear[extra]'``
    if matplotlib is missing. Imported here, not at the top: matplotlib is optional and costs
    ~0.25 s to import, paid only by ``--plot``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(f"--plot needs matplotlib: pip install 'fusedlinear[{extra}]'") from None
    return plt


def save_figure(fig, path: str) -> None:
    """``fig`` (made by :func:`pyplot`'s module) as a PNG at ``path``, written whole or not at all; then closed."""
    import matplotlib.pyplot as plt  # loaded already: fig came from it

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
