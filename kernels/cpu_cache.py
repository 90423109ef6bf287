"""The CPU kernels' disk cache: where it lives, how its files are written and checked, and the
warm path that loads a cached kernel as a native shared object without importing Numba.

Plain Python (no Numba import), so a process whose kernels are all cached never starts the JIT.

One kernel is one *group* of files in ``cache_dir()``, all named after its key (``kernel_key``):
the generated module ``<name>_<key>.py`` Numba compiles, Numba's index and object code for it
(``.nbi``/``.nbc``, in Numba's cache directory), the same machine code linked as a shared object
``<name>_<key>.so`` when a C linker is there, and the manifest ``<name>_<key>.json`` that lists
every file of the group with its SHA-256. A group is used only when its manifest is whole and
every digest matches; otherwise (a truncated file, garbage, a half-finished write) the whole
group is removed and compiled again, with one warning. Every file is written to a temporary
name and renamed into place (a reader sees the old file or the new one, never half of one), and
a group is checked, built and its manifest written under an exclusive lock on ``<name>_<key>.lock``,
so processes cold-starting on one empty cache compile each kernel once and the others wait.

The key digests everything that generates a kernel: the activation's table entry (its formulas),
the sources of the generator (cpu.py, _numba_runtime.py, cpu_params.py, activations.py, this
file), the versions of Python, Numba, llvmlite and NumPy, and the CPU the machine code targets
(``cpu_target``) — so a change to any of them builds a fresh group instead of loading a stale one,
and a cache shared with (or copied to) another CPU is never run there: its groups are under other
names, and the manifest's ``target`` is checked again before a shared object is loaded. It is
computed from files, package metadata and /proc/cpuinfo, not by importing the compiler.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
import warnings

from . import activations as _acts

_HERE = os.path.dirname(os.path.abspath(__file__))
_GENERATOR_FILES = ("cpu.py", "_numba_runtime.py", "cpu_params.py", "activations.py", "cpu_cache.py")


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")
        probe.close()
        return True
    except OSError:
        return False


def _user_cache_dir() -> str:
    """Numba's user-wide cache directory (numba.misc.appdirs), without importing Numba on Linux."""
    if sys.platform.startswith("linux"):
        return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "numba")
    from numba.misc.appdirs import AppDirs

    return AppDirs(appname="numba", appauthor=False).user_cache_dir


@functools.lru_cache(maxsize=None)
def cache_dir() -> str | None:
    """Where the kernels' groups live: in Numba's own order, NUMBA_CACHE_DIR, ``__pycache__``
    beside this file, then the user-wide cache directory; None when none is writable."""
    candidates = []
    if os.environ.get("NUMBA_CACHE_DIR"):
        candidates.append(os.path.join(os.environ["NUMBA_CACHE_DIR"], "fusedlinear-cpu"))
    candidates.append(os.path.join(_HERE, "__pycache__", "fusedlinear-cpu"))
    candidates.append(os.path.join(_user_cache_dir(), "fusedlinear-cpu"))
    return next((path for path in candidates if _writable(path)), None)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.lru_cache(maxsize=None)
def generator_stamp() -> bytes:
    """What every kernel depends on besides its activation: the generator's sources and the
    versions of the compiler stack (read from package metadata, not by importing it)."""
    h = hashlib.sha256(" ".join(f"{p} {_version(p)}" for p in ("numba", "llvmlite", "numpy")).encode()
                       + sys.version.encode())
    for name in _GENERATOR_FILES:
        with open(os.path.join(_HERE, name), "rb") as f:
            h.update(f.read())
    return h.digest()


_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags",  # x86
               "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features", "isa")  # arm, riscv


@functools.lru_cache(maxsize=None)
def _host_cpu() -> str:
    """This CPU's model and instruction-set flags (the first processor's lines of /proc/cpuinfo;
    elsewhere, LLVM's name and features for it): machines that agree here run the same code."""
    fields = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                if name.strip() in _CPU_FIELDS:
                    fields.append(f"{name.strip()}={value.strip()}")
    except OSError:
        pass
    if not fields:
        import llvmlite.binding as ll

        fields = [ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten()]
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()[:16]


def cpu_target() -> str:
    """The CPU the kernels' machine code is compiled for, chosen as Numba chooses it:
    NUMBA_CPU_NAME and NUMBA_CPU_FEATURES where set (``generic`` alone means no extra features:
    code any CPU of the architecture runs), else this host (``_host_cpu``); NUMBA_ENABLE_AVX too."""
    name, features = os.environ.get("NUMBA_CPU_NAME"), os.environ.get("NUMBA_CPU_FEATURES")
    if features is None and name is not None and name.lower() == "generic":
        features = ""
    host = "" if name is not None and features is not None else f" host {_host_cpu()}"
    return f"cpu {name or 'host'} features {features if features is not None else 'host'}{host} " \
           f"avx {os.environ.get('NUMBA_ENABLE_AVX', 'default')}"


def kernel_name(phase: str, activation: str | None, dtype: str) -> str:
    """The file stem of a kernel's group: its phase, activation and dtype, then its key."""
    entry = repr(_acts.ACTIVATIONS[activation]) if activation else ""
    key = hashlib.sha256(generator_stamp() + f"{phase} {entry} {dtype} {cpu_target()}".encode()).hexdigest()[:20]
    return "_".join(part for part in (phase, activation, dtype, key) if part)


# ---- files: atomic writes, locks, manifests ---------------------------------------------------

def atomic_write(path: str, data: bytes) -> None:
    """``path`` holds ``data`` whole or is left as it was: written to a temporary file beside it,
    flushed to disk, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(stem: str):
    """An exclusive lock on ``stem + ".lock"`` (fcntl.flock; released when the process dies),
    or nothing where flock is unavailable."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(stem + ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def write_manifest(stem: str, files: list[str], **extra) -> None:
    """Record ``files`` with their digests, and ``extra``, as ``stem.json`` (paths relative to
    its directory, so a moved cache stays whole)."""
    here = os.path.dirname(stem)
    record = {"files": {os.path.relpath(path, here): _sha256(path) for path in files},
              **{k: os.path.relpath(v, here) if k == "native" and v else v for k, v in extra.items()}}
    atomic_write(stem + ".json", json.dumps(record, indent=1).encode())


def read_manifest(stem: str) -> tuple[dict | None, str | None]:
    """(the manifest, None) when it and every file it lists are intact; (None, None) when there is
    none; (None, why) when it or a file it lists is damaged or missing."""
    try:
        with open(stem + ".json", "rb") as f:
            record = json.loads(f.read().decode())
        files = record["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
        files = {os.path.join(os.path.dirname(stem), path): want for path, want in files.items()}
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        return None, f"unreadable manifest {stem}.json ({type(exc).__name__})"
    for path, want in files.items():
        got = _sha256(path)
        if got != want:
            return None, f"{path} is {'missing' if got is None else 'damaged (digest mismatch)'}"
    return {**record, "files": files}, None


def listed_files(stem: str) -> list[str]:
    """The files a manifest lists, whole or not (for removal), or []."""
    try:
        with open(stem + ".json", "rb") as f:
            files = json.loads(f.read().decode())["files"]
        here = os.path.dirname(stem)
        return [os.path.join(here, p) for p in files if isinstance(p, str)] if isinstance(files, dict) else []
    except Exception:  # a damaged manifest: nothing to learn from it
        return []


def remove(paths) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def write_record(path: str, payload: dict, **extra) -> None:
    """A small JSON record (e.g. measured choices) with the SHA-256 of its payload inside it."""
    body = json.dumps(payload, sort_keys=True)
    atomic_write(path, json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "payload": body, **extra},
                                  indent=1).encode())


def read_record(path: str) -> tuple[dict | None, str | None]:
    """(payload, None) for an intact record; (None, None) when there is none; (None, why) when damaged."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode())
        body = record["payload"]
        if hashlib.sha256(body.encode()).hexdigest() != record["sha256"]:
            raise ValueError("digest mismatch")
        payload = json.loads(body)
        if not isinstance(payload, dict):
            raise TypeError("not a mapping")
        return payload, None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        return None, f"{path} is damaged ({type(exc).__name__}: {exc})"


def warn_rebuild(what: str, why: str, state: str = "is damaged") -> None:
    warnings.warn(f"fusedlinear: cached CPU {what} {state}: {why}; rebuilding it", RuntimeWarning,
                  stacklevel=3)


# ---- the warm path: a cached kernel as a native shared object ---------------------------------

LOADED: set = set()  # (phase, activation or None, dtype) of the kernels loaded natively in this process
_native_libs: dict = {}  # stem -> the ctypes library (kept loaded for the process's life)
NATIVE = os.environ.get("FUSEDLINEAR_CPU_NATIVE", "1") != "0"  # "0": always through Numba (for tests)


def load_native(phase: str, activation: str | None, dtype: str) -> int | None:
    """The address of a cached kernel's native entry point, loaded with ctypes (no Numba), or
    None when there is none that is intact (the caller then goes through Numba, which rebuilds
    a damaged group with a warning)."""
    if not NATIVE or cache_dir() is None:
        return None
    stem = os.path.join(cache_dir(), kernel_name(phase, activation, dtype))
    record, _ = read_manifest(stem)
    if record is None or not record.get("native") or not record.get("symbol") \
            or record.get("target") != cpu_target():  # built for another CPU: Numba's path rebuilds it
        return None
    try:
        lib = _native_libs.get(stem) or ctypes.CDLL(os.path.join(os.path.dirname(stem), record["native"]))
        address = ctypes.cast(getattr(lib, record["symbol"]), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    _native_libs[stem] = lib
    LOADED.add((phase, activation, dtype))
    return address
