"""The CPU kernels' disk cache: keyed by what generates the kernels, filled one kernel at a time.

Each test runs fresh processes sharing one empty NUMBA_CACHE_DIR, as a user's installs would.
"""

import json
import os
import subprocess
import sys

import pytest

# One fused layer, forward and backward with every gradient, printed as JSON: its largest
# difference from float64 PyTorch (with relu's formulas scaled by SCALE, 1 unless the table is
# patched) and the kernels this process loaded or compiled.
_RUN = """
import dataclasses, json, sys
import torch
import fusedlinear
from fusedlinear.kernels import activations

activations_run, dtype, scale = sys.argv[1].split(","), getattr(torch, sys.argv[2]), float(sys.argv[3])
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
print(json.dumps({"diff": diff}))
if sys.argv[4] == "report":
    from fusedlinear.kernels import cpu
    print(json.dumps({"diff": diff, "loaded": [list(k) for k in cpu.loaded()]}))
"""


def _run(cache, activation="relu", dtype="float64", scale=1.0, report=""):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "FUSEDLINEAR_BACKEND": "numba"}
    proc = subprocess.run([sys.executable, "-c", _RUN, activation, dtype, str(scale), report], capture_output=True,
                          text=True, env=env, timeout=900)
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


def test_train_loads_the_models_kernels_before_its_first_step():
    """`fusedlinear train` compiles (and announces) the model's kernels before its progress bar:
    the fused ReLU layers' and the plain final nn.Linear's, which runs as identity in the chain."""
    from fusedlinear import train
    from fusedlinear.kernels import cpu

    cfg = train.TrainConfig(device="cpu")
    if train.backend_for(cfg) != "numba":
        pytest.skip("the numba backend is not the one selected here")
    train.prepare_kernels(train.make_model(True, 0, "cpu"), cfg)
    assert {(phase, act, "float32") for phase in ("forward", "backward_columns") for act in ("relu", "identity")} | {
        ("backward_rows", None, "float32")} <= set(cpu.loaded())
