"""State of this process that the CPU kernels depend on: whether it was forked from a process that
may have had an OpenMP pool (:class:`FORK`, tracked from ``import fusedlinear`` on by an at-fork
hook). A leaf module of the backend package: it imports nothing of fusedlinear.
"""

from __future__ import annotations

import os


def _thread_count() -> int:
    """Threads in this process now (0 if unknown)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


class FORK:
    """Whether this process is a child forked from one that may have had an OpenMP pool, whoever
    started it (fusedlinear, PyTorch, MKL): libgomp's pool is not fork-safe (GOMP_parallel in the
    child waits for threads it does not have), so the CPU kernels then run on the calling thread.
    Tracked from ``import fusedlinear`` on: ``os.fork`` (multiprocessing, DataLoader) records the
    parent's thread count (more than one: a pool may exist); a fork that bypassed os.fork's hooks
    shows as a changed pid when the CPU backend next makes a launch plan (then assumed unsafe)."""

    unsafe = False
    pid = os.getpid()
    parent_threads = 1

    @classmethod
    def before(cls) -> None:
        cls.parent_threads = _thread_count()

    @classmethod
    def after_in_child(cls) -> None:
        cls.unsafe = cls.unsafe or cls.parent_threads != 1
        cls.pid = os.getpid()

    @classmethod
    def check(cls) -> None:
        if os.getpid() != cls.pid:
            cls.unsafe, cls.pid = True, os.getpid()


os.register_at_fork(before=FORK.before, after_in_child=FORK.after_in_child)
