"""The backend's one-time notices: a fallback, a refusal to run in parallel, a size limit is said
once per process and kind (``key``), not on every call. A leaf module: it imports nothing of
fusedlinear."""

from __future__ import annotations

import warnings

_warned: set[tuple] = set()


def warn_once(key: tuple, message: str, stacklevel: int = 4) -> None:
    """``warnings.warn(message, RuntimeWarning)`` the first time ``key`` is seen in this process;
    ``stacklevel`` as warnings.warn's, counted from warn_once's caller (1 = that caller)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
