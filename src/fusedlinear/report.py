"""What the commands write down about a run: the machine and versions it ran on, dtype names, and
files (JSON, state dicts, figures) written whole or not at all.

Used by ``train``, ``bench`` and ``parity``, and by ``benchmarks/`` (through ``bench.machine_info``).
"""

from __future__ import annotations

import os
import platform
import stat
import tempfile

import numpy
import torch

from .argtypes import output_target
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
    """Write through a temporary file in the same directory, then rename: never a half-written file.

    A symlink is followed (its target is replaced, the link stays). A path that is no regular file's
    name (a FIFO, a character device such as /dev/null, /dev/stdout) is written directly, appending,
    as a shell's ``>>`` would: renaming over it would replace the device node or the pipe itself.
    A new file gets ``0o666 & ~umask`` like ``open()``; a replaced one keeps its mode."""
    target, in_place = output_target(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"cannot write {path!r}: it is a directory; name a file inside it")
    if st is not None and stat.S_ISBLK(st.st_mode):
        raise OSError(f"refusing to write {path!r}: it is a block device (a disk); name a regular file")
    if in_place:
        with open(path, "ab") as f:
            write(f)
        return
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)
    else:
        umask = os.umask(0o022)  # the only way to read it; set back at once
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(target))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes 0600
            write(f)
        os.replace(tmp, target)
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
