"""kernels/cpu_cache.py, the CPU kernels' disk cache: keyed by what generates the kernels, filled
one kernel at a time, damaged files rebuilt, the warm path without Numba, unusable locations."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import run_python

# One fused layer, forward and backward with every gradient, printed as JSON: its largest
# difference from float64 PyTorch (with relu's formulas scaled by SCALE, 1 unless the table is
# patched) and the kernels this process loaded or compiled.
_RUN = """
import dataclasses, json, sys
import torch
import fusedlinear
from fusedlinear.kernels import activations

activations_run, dtype, scale = sys.argv[1].split(","), getattr(torch, sys.argv[2]), float(sys.argv[3])
# Processes compare their results bit for bit: a BLAS choice the suite's load made provisional
# must not be measured again (and changed) by a later, quieter process.
torch.use_deterministic_algorithms(True)
if scale != 1.0:  # an upgrade that changes relu's formulas (before any kernel is loaded)
    new = dataclasses.replace(activations.ACTIVATIONS["relu"], forward=f"where(z <= 0.0, 0.0, z * {scale})",
                              backward=f"where(a <= 0.0, 0.0, da * {scale})")
    activations._TABLE = tuple(new if a.name == "relu" else a for a in activations._TABLE)
    activations.ACTIVATIONS["relu"] = new

diff = 0.0
for activation in activations_run:  # several: their kernels are linked side by side in this process
    torch.manual_seed(0)
    x = torch.randn(37, 29, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 29, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, dtype=torch.float64, requires_grad=True)
    g = torch.randn(37, 23, dtype=torch.float64)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    out = fusedlinear.fused_linear(*leaves, activation)
    out.backward(g.to(dtype))
    act = {"relu": torch.relu, "tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[activation]
    reference = act(x @ w.T + b) * (scale if activation == "relu" else 1.0)
    reference.backward(g)
    diff = max([diff] + [float((got - want).abs().max()) for got, want in
                         zip([out] + [t.grad for t in leaves], [reference, x.grad, w.grad, b.grad])])
numba = "numba" in sys.modules  # whether this process needed the JIT at all
print(json.dumps({"diff": diff, "numba": numba}))
if sys.argv[4] == "report":
    from fusedlinear.kernels import cpu
    print(json.dumps({"diff": diff, "numba": numba, "loaded": [list(k) for k in cpu.loaded()]}))
"""


def _command(cache, activation="relu", dtype="float64", scale=1.0, report="", **env):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "FUSEDLINEAR_BACKEND": "numba", **env}
    return [sys.executable, "-c", _RUN, activation, dtype, str(scale), report], env


def _run(cache, activation="relu", dtype="float64", scale=1.0, report="", **env):
    command, env = _command(cache, activation, dtype, scale, report, **env)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _generated(cache):
    return sorted(name.rsplit("_", 1)[0] for name in os.listdir(cache / "fusedlinear-cpu") if name.endswith(".py"))


def _index_files(cache):
    return sorted(name for _, _, names in os.walk(cache) for name in names if name.endswith(".nbi"))


# float64 kernels against float64 PyTorch: the only differences are summation order in BLAS
# and in db over 37 rows of O(1) terms, far below 1e-10.
TOL = 1e-10


@pytest.mark.slow
def test_changed_activation_table_compiles_fresh_kernels(tmp_path):
    """A kernel cached from one version of the activation table is never served to another."""
    first, _ = _run(tmp_path)
    assert first["diff"] < TOL
    changed, _ = _run(tmp_path, scale=3.0)  # relu's formulas times 3: a stale kernel would give plain relu
    assert changed["diff"] < TOL, changed  # fails with a stale kernel: diff = 2x relu's output
    again, _ = _run(tmp_path)  # the first version's kernels are still cached and still right
    assert again["diff"] < TOL
    # Each version compiled its own relu kernels; backward_rows does not read the table and is shared.
    assert _generated(tmp_path) == sorted(["backward_columns_relu_float64"] * 2 + ["backward_rows_float64"]
                                          + ["forward_relu_float64"] * 2)


@pytest.mark.slow
def test_only_the_kernels_a_call_needs_are_compiled_and_the_message_says_so_once(tmp_path):
    """A fresh process on an empty cache compiles one activation's kernels for one dtype, says so
    in exactly one line on stderr, and a second process loads them silently."""
    cold, cold_err = _run(tmp_path, "tanh", "float32", report="report")
    # float32 kernels against float64 PyTorch: a sum of 29 float32 products, relative
    # error ~ 29 * 6e-8 on values of size ~10, and db's sum of 37 rows: 1e-3 bounds it.
    assert cold["diff"] < 1e-3
    assert cold["loaded"] == [["backward_columns", "tanh", "float32"], ["backward_rows", None, "float32"],
                              ["forward", "tanh", "float32"]]
    assert _generated(tmp_path) == ["backward_columns_tanh_float32", "backward_rows_float32", "forward_tanh_float32"]
    assert len(_index_files(tmp_path)) == 3  # Numba cached those three and nothing else
    lines = [line for line in cold_err.splitlines() if line.startswith("fusedlinear: compiling")]
    assert lines == [f"fusedlinear: compiling CPU kernels for tanh/float32 (first use; cached in "
                     f"{tmp_path / 'fusedlinear-cpu'})"], cold_err
    warm, warm_err = _run(tmp_path, "tanh", "float32", report="report")
    assert warm["diff"] == cold["diff"]  # the very same kernels
    assert "fusedlinear: compiling" not in warm_err
    assert len(_index_files(tmp_path)) == 3


@pytest.mark.slow
def test_kernels_compiled_in_different_processes_keep_their_own_activation(tmp_path):
    """Kernels compiled in separate processes, then loaded side by side from the cache in a third,
    each run their own activation. (Numba names a compiled function with a per-process counter:
    two activations' bodies compiled in two processes once got one symbol, and the first one
    linked ran for both — relu gave gelu's values.)"""
    for activation in ("gelu", "relu", "tanh"):
        alone, _ = _run(tmp_path, activation)
        assert alone["diff"] < TOL, activation
    together, _ = _run(tmp_path, "gelu,relu,tanh")
    assert together["diff"] < TOL, together


def _manifests(cache):
    folder = cache / "fusedlinear-cpu"
    return {name[:-5]: json.loads((folder / name).read_text()) for name in os.listdir(folder)
            if name.endswith(".json") and not name.startswith("tuning_")}


@pytest.mark.slow
def test_warm_start_runs_the_native_kernels_without_importing_numba(tmp_path):
    cold, _ = _run(tmp_path)
    assert cold["diff"] < TOL and cold["numba"]
    assert all(m["native"] for m in _manifests(tmp_path).values())  # a C linker is there: every kernel linked
    warm, warm_err = _run(tmp_path, report="report")
    assert warm["diff"] == cold["diff"]  # the very same machine code
    assert not warm["numba"], "a warm start imported Numba"
    assert len(warm["loaded"]) == 3 and "fusedlinear" not in warm_err
    # Its fallback, Numba's own cache, serves the same kernels when the native path is off.
    jit, jit_err = _run(tmp_path, FUSEDLINEAR_CPU_NATIVE="0")
    assert jit["diff"] == cold["diff"] and jit["numba"]
    assert "fusedlinear" not in jit_err


@pytest.mark.slow
def test_without_a_linker_the_warm_start_falls_back_to_numbas_cache(tmp_path):
    cold, _ = _run(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert cold["diff"] < TOL
    assert not any(m["native"] for m in _manifests(tmp_path).values())
    warm, warm_err = _run(tmp_path)  # CC is back, but a whole group is not rebuilt for its missing .so
    assert warm["diff"] == cold["diff"] and warm["numba"]
    assert "fusedlinear" not in warm_err  # loaded from Numba's cache: nothing compiled, nothing warned


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory):
    """One cold run's cache at a fixed path, and a copy of it to restore before each case (Numba
    names its cache directory after the absolute path of the source, so the path must not move)."""
    root = tmp_path_factory.mktemp("damage")
    cache, backup = root / "cache", root / "backup"
    first, _ = _run(cache)
    assert first["diff"] < TOL
    shutil.copytree(cache, backup, symlinks=True)
    return cache, backup, first


def _restore(cache, backup):
    shutil.rmtree(cache)
    shutil.copytree(backup, cache, symlinks=True)


def _file_of_kind(cache, kind):
    """The forward kernel group's file of ``kind``: its generated source, Numba's index or object
    code, the native shared object or the manifest itself."""
    (stem, manifest), = [(s, m) for s, m in _manifests(cache).items() if s.startswith("forward_relu_float64")]
    folder = cache / "fusedlinear-cpu"
    if kind == "manifest":
        return folder / f"{stem}.json"
    if kind == "tuning":
        (path,) = folder.glob("tuning_*.json")
        return path
    (path,) = [p for p in manifest["files"] if p.endswith({"source": ".py", "index": ".nbi", "object": ".nbc",
                                                              "native": ".so"}[kind])]
    return folder / path


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("kind", ["source", "index", "object", "native", "manifest", "tuning"])
def test_a_damaged_cache_file_is_rebuilt_with_one_warning(pristine_cache, kind, damage):
    """Each kind of cached file, truncated or overwritten with garbage (null bytes and random bytes,
    as a full disk or a crashed copy leaves them): the next process warns once, rebuilds that
    kernel and computes the right values; the process after it finds the cache whole again.
    (Null bytes in the generated module once killed every later process with SyntaxError.)"""
    cache, backup, first = pristine_cache
    _restore(cache, backup)
    path = _file_of_kind(cache, kind)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3] if damage == "truncated" else b"\0" * 64 + os.urandom(len(data)))
    rebuilt, err = _run(cache)
    assert rebuilt["diff"] == first["diff"], err[-3000:]
    assert err.count("rebuilding it") == 1, err[-3000:]
    damaged = err.split("rebuilding it")[0].splitlines()[-1]
    assert ("tuning_" if kind == "tuning" else "forward_relu_float64") in damaged, damaged
    again, again_err = _run(cache)
    assert again["diff"] == first["diff"] and not again["numba"]  # whole again, native included
    assert "fusedlinear" not in again_err


@pytest.mark.slow
def test_four_processes_cold_starting_on_one_empty_cache(tmp_path):
    """Four processes started together on one empty cache all compute the right values; each
    kernel is built once (the others wait on its lock, then load it), and the cache they leave is
    whole: a fifth process loads every kernel natively without a word."""
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command, env in [_command(tmp_path, "relu,tanh")] * 4]
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["diff"] < TOL
        assert "rebuilding" not in err
    assert sum(err.count("fusedlinear: compiling") for _, err in outs) >= 1
    assert len(_index_files(tmp_path)) == 5  # forward and backward_columns for two activations, backward_rows
    fifth, fifth_err = _run(tmp_path, "relu,tanh")
    assert fifth["diff"] < TOL and not fifth["numba"]
    assert "fusedlinear" not in fifth_err


@pytest.mark.slow
def test_kernels_built_for_another_cpu_are_never_loaded(tmp_path):
    # NUMBA_CPU_NAME=generic stands in for another machine's CPU sharing the cache directory.
    other, _ = _run(tmp_path, NUMBA_CPU_NAME="generic")
    generic = _manifests(tmp_path)
    assert all("cpu generic features " in m["target"] for m in generic.values())
    host, host_err = _run(tmp_path, report="report")  # the generic groups are not this host's: compiled again
    assert host["numba"] and "compiling CPU kernels" in host_err and host["diff"] < TOL
    assert "rebuilding" not in host_err  # each CPU has its own groups: Numba never rewrites another's index
    mine = {stem: m for stem, m in _manifests(tmp_path).items() if stem not in generic}
    assert len(mine) == len(generic) and all("cpu host features host" in m["target"] for m in mine.values())
    # A group under this host's name whose manifest says another CPU (a cache copied from elsewhere)
    # is neither loaded natively nor through Numba: rebuilt, with one warning.
    for stem, m in mine.items():
        (tmp_path / "fusedlinear-cpu" / f"{stem}.json").write_text(json.dumps({**m, "target": generic[next(iter(generic))]["target"]}))
    again, again_err = _run(tmp_path)
    assert again["numba"] and again["diff"] == host["diff"]
    assert again_err.count("was built for another CPU") == len(mine), again_err[-2000:]
    warm, warm_err = _run(tmp_path)
    assert not warm["numba"] and "fusedlinear" not in warm_err
    back, back_err = _run(tmp_path, NUMBA_CPU_NAME="generic")  # the other CPU's groups are still whole
    assert not back["numba"] and "fusedlinear" not in back_err and back["diff"] == other["diff"]


def test_impossible_cache_locations_still_work():
    """NUMBA_CACHE_DIR and HOME that cannot be written: the kernels fall back and still compute."""
    code = ("import torch, fusedlinear; x = torch.randn(5, 7, dtype=torch.float64); w = torch.randn(3, 7, dtype=torch.float64); "
            "print(torch.allclose(fusedlinear.fused_linear(x, w, None, 'relu'), torch.relu(x @ w.T)))")
    out = run_python(code, NUMBA_CACHE_DIR="/proc/fusedlinear-no-cache", HOME="/proc/fusedlinear-no-home")
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_no_cache_location_at_all_warns_once_and_works(monkeypatch):
    from numba.core import caching

    from fusedlinear.kernels import cpu

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    with pytest.warns(RuntimeWarning, match="no writable Numba cache location"):
        assert cpu._cache_available() is False


def _avx512_host() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not (_avx512_host() and shutil.which("objdump") and shutil.which("cc")),
                    reason="needs an AVX-512 host, objdump and a C compiler")
def test_native_kernels_respect_numba_cpu_name(tmp_path):
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from fusedlinear import backend\n"
            "backend.prepare_cpu_kernels(['relu'], 'float64')\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    objects = list((tmp_path / "fusedlinear-cpu").glob("*.so"))
    assert objects, "no native kernel was built"
    for so in objects:
        text = subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True, check=True).stdout
        assert "zmm" not in text and "%k1" not in text, f"{so.name} holds AVX-512 instructions"
