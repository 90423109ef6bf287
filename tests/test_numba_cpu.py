"""backend/numba_cpu.py, the CPU backend: launch plans (cached per call signature, never stale,
owning every buffer they point into), the BLAS choice (FUSEDLINEAR_CPU_BLAS, measured once per
machine) and its tuning file."""

import json
import tracemalloc

import pytest
import torch
import torch.nn.functional as F

import fusedlinear
from conftest import (
    ACTIVATIONS,
    LAYOUTS,
    TOL,
    assert_close,
    check_against_reference,
    make_inputs,
    reference,
    run_python,
)
from fusedlinear.backend import numba_cpu

# A fused layer in a fresh process (the BLAS choice is read once, at the first fused call): the
# largest difference of output and dW from float64 PyTorch, at 40 rows (below 64: MKL's range in
# "auto" on AVX2) and 300 rows (OpenBLAS's), on 2 threads.
_BLAS_CHECK = """
import torch, fusedlinear
torch.set_num_threads(2)
torch.manual_seed(0)
worst = 0.0
for rows in (40, 300):
    x, w = torch.randn(rows, 190), torch.randn(170, 190, requires_grad=True)
    out = fusedlinear.fused_linear(x, w, None, "tanh")
    out.sum().backward()
    wr = w.detach().double().requires_grad_(True)
    ref = torch.tanh(x.double() @ wr.T)
    ref.sum().backward()
    worst = max(worst, (out.double() - ref).abs().max().item(), (w.grad.double() - wr.grad).abs().max().item())
print(worst)
"""


# The library blas_functions names for a batch of 1 row and of 4096 (one library at every size when
# forced), and a relu layer's value, in the same fresh process.
_WHICH_BLAS = ("from fusedlinear.backend import numba_cpu; "
               "x = torch.randn(3, 5); w = torch.randn(4, 5); "
               "ok = torch.allclose(fusedlinear.fused_linear(x, w, None, 'relu'), torch.relu(x @ w.T), atol=1e-5); "
               "print(ok, numba_cpu.blas_functions(1)['library'], numba_cpu.blas_functions(4096)['library'], sep='|')\n")


@pytest.mark.parametrize("blas, library", [("mkl", "MKL"), ("openblas", "OpenBLAS")], ids=["mkl", "openblas"])
def test_cpu_blas_environment_variable(blas, library):
    """FUSEDLINEAR_CPU_BLAS in a real process (it is read once, not per call): the kernels compute the
    right thing with it, blas_functions names the forced library at every batch size, and so does
    `fusedlinear info`."""
    from fusedlinear.backend import numba_cpu

    if blas == "mkl" and "mkl" not in numba_cpu.blas_libraries():
        pytest.skip("this PyTorch has no MKL")
    out = run_python(_BLAS_CHECK + _WHICH_BLAS + "from fusedlinear.cli import main; main(['info'])",
                     FUSEDLINEAR_CPU_BLAS=blas)
    assert out.returncode == 0, out.stderr[-2000:]
    worst, which, info = out.stdout.split("\n", 2)
    # float32, K = 190 terms of N(0,1) products: |error| ~ sqrt(190) * 6e-8 * 190 ~ 2e-4 at most
    assert float(worst) < 1e-3, worst
    ok, small, large = which.strip().split("|")
    assert ok == "True" and small.startswith(library) and large.startswith(library), out.stdout
    (line,) = [line for line in info.splitlines() if "BLAS per tile" in line]
    assert line.split(": ", 1)[1].startswith({"mkl": "MKL (PyTorch's)", "openblas": "OpenBLAS (scipy's"}[blas])
    assert " below " not in line  # one library at every batch size


def test_cpu_blas_environment_variable_rejects_an_unknown_library():
    out = run_python("import torch, fusedlinear; fusedlinear.fused_linear(torch.randn(3, 4), torch.randn(2, 4))",
                      FUSEDLINEAR_CPU_BLAS="cublas")
    assert out.returncode != 0 and "FUSEDLINEAR_CPU_BLAS='cublas'" in out.stderr and "openblas" in out.stderr
    last = out.stderr.strip().splitlines()[-1]  # one clear error: the last line says it all
    assert "FUSEDLINEAR_CPU_BLAS='cublas'" in last and "auto, mkl, openblas" in last, out.stderr[-2000:]


def test_more_signatures_than_the_plan_cache_holds_stay_exact():
    """200 distinct call signatures (2 plans each, forward and backward: more than the 256 the
    backend keeps), then the first ones again: every result still against float64 PyTorch."""
    x, w, b = make_inputs((40,), 6, 5, torch.float64)
    signatures = [(rows, act) for rows in range(1, 41) for act in ACTIVATIONS[:5]]
    for rows, act in signatures:
        slope = 0.1
        check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, act, slope),
                                x[:rows], w, b, act, slope)
    for rows in (1, 7, 40):
        check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "gelu"), x[:rows], w, b, "gelu")


def test_same_shape_with_other_strides_gets_its_own_plan():
    """One weight, one input shape, three memory layouts of X one after another: a plan made for one
    layout must not serve another."""
    x, w, b = make_inputs((33,), 20, 11, torch.float64)
    for _ in range(2):
        for layout in ("row-major", "transposed", "col-padded", "row-padded"):
            check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, "sigmoid"), x, w, b, "sigmoid",
                                    layout=LAYOUTS.get(layout, lambda t: t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_copied_weight_is_not_kept_across_updates(dtype):
    """A weight with strided columns and a strided bias are copied for the kernels; after an in-place
    update of them (an optimizer step) the next call must see the new values, not an earlier copy
    (and the copies must live as long as the call that reads them)."""
    x, w, b = make_inputs((17,), 12, 9, dtype)
    storage, b_storage = torch.stack([w, w], dim=2).reshape(9, 24), torch.stack([b, b], dim=1).reshape(18)
    strided, b_strided = storage[:, ::2], b_storage[::2]  # the values of w and b, stride 2: copied
    for step in range(3):
        for bias in (b_strided, None):
            torch.testing.assert_close(fusedlinear.fused_linear(x, strided, bias, "tanh").double(),
                                       reference(x.double(), strided.double(), None if bias is None else bias.double(),
                                                 "tanh"), **TOL[dtype])
        with torch.no_grad():
            storage.mul_(0.5).add_(0.25)
            b_storage.add_(1.0)


# Large enough for several output tiles, small enough to stay quick.
M, K, N = 37, 40, 20


def _fused(activation, slope=0.01):
    return lambda x, w, b: fusedlinear.fused_linear(x, w, b, activation, slope)


def _check_strided(dtype, activation, weight_view, bias_view, w_cols, b_len):
    """fused_linear on views of W and b (the leaves hold the full tensors) against float64
    PyTorch: output and every gradient, three times (the later calls may find a kept plan)."""
    x, w_full, b_full = make_inputs((M,), w_cols, b_len, dtype)
    x = x[:, :K].contiguous()
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_full, b_full)]
        refs = [t.detach().double().requires_grad_(True) for t in (x, w_full, b_full)]
        w, b = weight_view(leaves[1]), bias_view(leaves[2])
        assert not (w.is_contiguous() and b.is_contiguous())
        out = fusedlinear.fused_linear(leaves[0], w, b, activation)
        ref = reference(refs[0], weight_view(refs[1]), bias_view(refs[2]), activation)
        assert_close(out, ref, dtype, "output")
        grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out.backward(grad.to(dtype))
        ref.backward(grad)
        for name, got, want in zip(("dX", "dW", "db"), leaves, refs):
            assert_close(got.grad, want.grad, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_strided_weight(dtype):
    """W[:, ::2] has no contiguous rows or columns: the backend copies it; the copy must live
    until the kernels (forward and backward) have returned."""
    _check_strided(dtype, "gelu", lambda w: w[:, ::2], lambda b: b, 2 * K, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_bias(dtype):
    _check_strided(dtype, "tanh", lambda w: w[:N, ::2], lambda b: b[::2], 2 * K, 2 * N)


def test_strided_weight_and_bias_in_a_chain():
    x, w_full, b_full = make_inputs((M,), 2 * K, 2 * K, torch.float64)
    x = x[:, :K].contiguous()
    w1, b1 = w_full[:K, ::2], b_full[::2]  # (K, K), (K,): both copied
    w2 = w_full[K:K + N, 1::2]
    fn = lambda x, w, b: fusedlinear.fused_chain(x, [(w, b, "silu", 0.01), (w2, None, "relu", 0.01)])
    ref = torch.relu(F.linear(F.silu(F.linear(x, w1, b1)), w2))
    torch.testing.assert_close(fn(x, w1, b1), ref, atol=1e-9, rtol=1e-9)  # float64: summation order only


def test_plan_evicted_while_its_call_runs(monkeypatch):
    """Another thread may evict every cached plan while a call is running one (a bias-free plan
    points into a zero bias it made). Simulated deterministically: the first kernel launch of the
    call first fills the plan cache with other plans, then runs."""
    x, w, _ = make_inputs((M,), K, N, torch.float32, seed=3)
    fused = _fused("relu")
    with torch.no_grad():
        fused(x, w, None)  # the plan is cached now
    launch = numba_cpu._launch
    state = {"busy": False}

    def evict_then_launch(*args):
        if not state["busy"]:
            state["busy"] = True  # the calls below launch too
            for rows in range(1, numba_cpu._MAX_PLANS + 2):
                with torch.no_grad():
                    fused(torch.ones(rows, 3), torch.ones(2, 3), None)
            junk = [torch.full((N,), 7.0e30) for _ in range(64)]  # reuse freed blocks with garbage
            del junk
            state["busy"] = False
        return launch(*args)

    monkeypatch.setattr(numba_cpu, "_launch", evict_then_launch)
    with torch.no_grad():
        got = fused(x, w, None)
    torch.testing.assert_close(got.double(), torch.relu(x.double() @ w.double().T), atol=1e-4, rtol=1e-4)  # float32, K=40


def _signbits(t):
    return torch.signbit(t).tolist()


@pytest.mark.parametrize("first, second", [(0.0, -0.0), (-0.0, 0.0)])
def test_negative_zero_slope_is_its_own_plan(first, second):
    """leaky_relu with slope -0.0 gives +0.0 for negative z (and 0.0 gives -0.0), as PyTorch does:
    the two slopes must not share a plan (they are equal as floats, not as bits)."""
    x, w, b = make_inputs((M,), K, N, torch.float64, seed=4)
    for slope in (first, second):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fusedlinear.fused_linear(xg, wg, b, "leaky_relu", slope)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = F.leaky_relu(F.linear(xr, wr, b), slope)
        assert (out < 0).sum() == 0 and (ref < 0).sum() == 0 and (ref == 0).any()
        assert _signbits(out) == _signbits(ref), f"slope {slope!r}: signs of zeros differ from PyTorch"
        grad = torch.ones_like(ref)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(wg.grad, wr.grad, atol=1e-9, rtol=1e-9)  # float64: summation order only


def test_distinct_slopes_use_bounded_memory():
    """200,000 distinct slopes (a slope swept per step) once grew an unbounded cache (+390 MB);
    the caches are bounded, so memory levels off."""
    x, w, b = make_inputs((2,), 3, 4, torch.float32, seed=5)
    with torch.no_grad():
        for i in range(300):  # warm: fill the bounded caches first
            fusedlinear.fused_linear(x, w, b, "leaky_relu", 1.0 + i * 1e-7)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(6000):
                fusedlinear.fused_linear(x, w, b, "leaky_relu", 2.0 + i * 1e-7)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    # Unbounded, each slope kept ~2 kB (12 MB here); bounded, only a full cache's worth of
    # plans, replaced, remains: well under 1 MB.
    assert grown < 1_000_000, f"{grown} bytes kept for 6000 distinct slopes"


def test_launch_plans_keep_no_weight_alive():
    """The CPU backend caches launch plans by call signature; a plan must not keep the caller's
    weight (or bias) alive after the model is gone."""
    import gc
    import weakref

    w = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    fusedlinear.fused_linear(torch.randn(8, 32), w, b, "relu").sum().backward()
    refs = [weakref.ref(w), weakref.ref(b)]
    del w, b
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.fixture
def fresh_tuning(tmp_path, monkeypatch):
    """The backend as a new process finds it, with its tuning file in tmp_path; returns
    (restart, timed): ``restart()`` forgets what this 'process' measured and planned, ``timed``
    lists the candidates timed so far."""
    from fusedlinear.backend import numba_cpu
    from fusedlinear.kernels import cpu_cache

    if numba_cpu.blas_libraries().keys() != {"mkl", "openblas"}:
        pytest.skip("needs both PyTorch's MKL and scipy's OpenBLAS")
    monkeypatch.setattr(cpu_cache, "cache_dir", lambda: str(tmp_path))  # the tuning file only; kernels stay
    monkeypatch.setattr(numba_cpu, "BLAS_CHOICE", "auto")
    timed = []
    time_plans = numba_cpu._time_plans

    def counting(plans, *args):
        timed.extend(plans)
        return time_plans(plans, *args)

    monkeypatch.setattr(numba_cpu, "_time_plans", counting)
    monkeypatch.setattr(numba_cpu, "_busy", lambda: None)  # a quiet machine unless a test says otherwise:
    monkeypatch.setattr(numba_cpu, "TUNE_CLEAN_SHARE", 0.0)  # no run counts as descheduled (the suite's load)

    def restart():
        monkeypatch.setattr(numba_cpu, "_tuning", {"choices": None, "spent": 0.0, "announced": True, "rechecked": set()})
        monkeypatch.setattr(numba_cpu, "_plans", {})

    restart()
    return restart, timed


def _layer_call():
    import fusedlinear

    x, w = torch.randn(64, 300), torch.randn(200, 300, requires_grad=True)
    out = fusedlinear.fused_linear(x, w, None, "relu")
    torch.testing.assert_close(out, torch.relu(x @ w.T), atol=1e-4, rtol=1e-4)  # float32, K = 300
    return out


def test_blas_choice_is_measured_once_then_read_from_the_machines_file(fresh_tuning, tmp_path):
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    _layer_call()
    candidates = len(timed)
    assert candidates >= 2  # both libraries (and, with 2+ threads, both tile layouts)
    (path,) = tmp_path.glob("tuning_*.json")
    choices = json.loads(json.loads(path.read_text())["payload"])
    assert list(choices) == [numba_cpu._shape_class(torch.zeros(64, 300), torch.zeros(200, 300), None)]
    restart()  # a new process: reads the file, times nothing
    _layer_call()
    assert len(timed) == candidates
    assert numba_cpu._choices() == choices


@pytest.mark.parametrize("changed", ["cpu", "vector_bits", "openblas", "torch", "forced"])
def test_another_cpu_or_library_version_tunes_again(fresh_tuning, tmp_path, monkeypatch, changed):
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    _layer_call()
    first = len(timed)
    key = numba_cpu.machine_key()
    monkeypatch.setattr(numba_cpu, "machine_key", lambda: {**key, changed: f"another {key[changed]}"})
    restart()
    _layer_call()
    assert len(timed) == 2 * first  # timed again, into a second file
    assert len(list(tmp_path.glob("tuning_*.json"))) == 2


def test_forced_blas_is_not_measured(fresh_tuning, monkeypatch):
    from fusedlinear.backend import numba_cpu
    from fusedlinear.kernels import cpu_params as slots

    restart, timed = fresh_tuning
    monkeypatch.setattr(numba_cpu, "BLAS_CHOICE", "mkl")
    restart()
    _layer_call()
    assert timed == []
    (plan,) = numba_cpu._plans.values()
    assert all(template[slots.P_GEMM] == numba_cpu.blas_libraries()["mkl"]["float32"] for _, _, template, _ in plan.launches)


@pytest.mark.parametrize("choice", ["mkl/whole", "mkl/bands", "openblas/columns"])
def test_every_layout_the_tuner_can_pick_computes_the_right_values(fresh_tuning, monkeypatch, choice):
    """With 2 threads MKL's whole-matrix calls are a measured candidate beside the tiles (never
    OpenBLAS's: its own threads would be a second pool); each choice runs, forward and backward,
    float32 and float64, with the values of float64 PyTorch."""
    import fusedlinear
    from conftest import torch_threads
    from fusedlinear.backend import numba_cpu
    from fusedlinear.kernels import cpu_params as slots

    restart, timed = fresh_tuning
    with torch_threads(2):
        numba_cpu.forward(torch.randn(300, 200), torch.randn(100, 200), None, "relu", 0.0)
        assert set(timed) == {"mkl/whole", "mkl/columns", "mkl/bands", "openblas/columns", "openblas/bands"}
        restart()
        monkeypatch.setattr(numba_cpu, "_choose", lambda *args: choice)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
            x, w = torch.randn(300, 200, dtype=dtype), torch.randn(100, 200, dtype=dtype, requires_grad=True)
            out = fusedlinear.fused_linear(x, w, None, "relu")
            out.backward(torch.ones_like(out))
            z = x.double() @ w.detach().double().T
            torch.testing.assert_close(out.double(), z.relu(), atol=tol, rtol=tol)
            torch.testing.assert_close(w.grad.double(), (z > 0).double().T @ x.double(), atol=tol * 10, rtol=tol)
        wholes = {template[slots.P_WHOLE] for plan in numba_cpu._plans.values() for _, _, template, _ in plan.launches}
        assert (1 in wholes) == (choice == "mkl/whole")


@pytest.mark.parametrize("threads", [1, 2])
def test_on_one_thread_a_descheduled_run_does_not_look_slow(fresh_tuning, monkeypatch, threads):
    """A shared machine that takes the CPU away for a second in every run: on one thread the
    runs are timed in this thread's CPU time, and the choice is still measured; with a team
    (wall time) every run looks too slow, and the table's choice is taken."""
    import time as real_time
    import types

    from conftest import torch_threads
    from fusedlinear.backend import numba_cpu

    restart, _ = fresh_tuning
    wall = [0.0]

    def descheduled():  # each reading a second later than the last
        wall[0] += 1.0
        return wall[0]

    monkeypatch.setattr(numba_cpu, "time", types.SimpleNamespace(perf_counter=descheduled, thread_time=real_time.thread_time))
    results = []
    time_plans = numba_cpu._time_plans
    monkeypatch.setattr(numba_cpu, "_time_plans", lambda *args: results.append(time_plans(*args)) or results[-1])
    with torch_threads(threads):
        _layer_call()
    assert results and (results[0][0] is not None) == (threads == 1)


def test_a_damaged_tuning_file_is_measured_again_with_one_warning(fresh_tuning, tmp_path):
    restart, timed = fresh_tuning
    _layer_call()
    first = len(timed)
    (path,) = tmp_path.glob("tuning_*.json")
    path.write_bytes(path.read_bytes()[:-20])
    restart()
    with pytest.warns(RuntimeWarning, match="tuning_.*is damaged.*rebuilding it"):
        _layer_call()
    assert len(timed) == 2 * first
    restart()
    _layer_call()  # whole again
    assert len(timed) == 2 * first


def _tuning_file(tmp_path) -> dict:
    (path,) = tmp_path.glob("tuning_*.json")
    return json.loads(json.loads(path.read_text())["payload"])


def test_a_choice_measured_on_a_busy_machine_is_provisional_until_a_quiet_process_measures_it(
        fresh_tuning, tmp_path, monkeypatch, capsys):
    """Measured under load, the winner can be the wrong one (784->512, B=64, 2 threads: 45% slower
    than the quiet machine's choice): it is used, kept as provisional, reused without timing while
    the machine stays busy, and measured again by the first process that finds the machine quiet."""
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    monkeypatch.setattr(numba_cpu, "_busy", lambda: "load average 9.0 on 2 CPUs")
    _layer_call()
    first = len(timed)
    assert first >= 2
    ((key, entry),) = _tuning_file(tmp_path).items()
    assert entry["provisional"] == "load average 9.0 on 2 CPUs" and entry["choice"] in timed
    restart()  # a new process, the machine still busy: the provisional choice, nothing timed
    _layer_call()
    assert len(timed) == first
    monkeypatch.setattr(numba_cpu, "_busy", lambda: None)
    restart()  # a new process on a quiet machine: measured again, now settled ...
    numba_cpu._tuning["announced"] = False
    capsys.readouterr()
    _layer_call()
    assert len(timed) == 2 * first
    assert "timing" not in capsys.readouterr().err  # ... silently: the first measurement said it once
    assert _tuning_file(tmp_path)[key] in timed[first:]
    restart()
    _layer_call()
    assert len(timed) == 2 * first


def test_a_provisional_choice_is_measured_again_once_per_process(fresh_tuning, tmp_path, monkeypatch):
    """A machine busy while a quiet-looking process measures again: provisional again, and that
    process does not time it a third time (a busy test suite must not pay for tuning per call)."""
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    busy = ["load average 9.0 on 2 CPUs"]
    monkeypatch.setattr(numba_cpu, "_busy", lambda: busy[0])
    _layer_call()
    first = len(timed)
    restart()
    calls = iter([None])  # quiet at the lookup, busy from then on
    monkeypatch.setattr(numba_cpu, "_busy", lambda: next(calls, "load average 5.0 on 2 CPUs"))
    _layer_call()
    assert len(timed) == 2 * first
    monkeypatch.setattr(numba_cpu, "_plans", {})  # same process, plans forgotten: no third timing
    _layer_call()
    assert len(timed) == 2 * first
    assert "provisional" in next(iter(_tuning_file(tmp_path).values()))


def test_deterministic_algorithms_keep_a_provisional_choice(fresh_tuning, tmp_path, monkeypatch):
    """Measuring again may pick another BLAS or tiling, whose last bits differ: not while
    torch.use_deterministic_algorithms(True) is on (results then equal earlier processes')."""
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    monkeypatch.setattr(numba_cpu, "_busy", lambda: "load average 9.0 on 2 CPUs")
    _layer_call()
    first = len(timed)
    monkeypatch.setattr(numba_cpu, "_busy", lambda: None)
    restart()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _layer_call()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(timed) == first
    assert "provisional" in next(iter(_tuning_file(tmp_path).values()))


def test_a_choice_descheduled_on_a_quiet_looking_machine_is_timed_once_per_process(fresh_tuning, tmp_path, monkeypatch):
    """The load average says quiet but every timing run is descheduled (another process takes the
    CPU in bursts): each process times the shape once, not on every new plan."""
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    monkeypatch.setattr(numba_cpu, "TUNE_CLEAN_SHARE", 2.0)  # no run is clean
    _layer_call()
    first = len(timed)
    assert next(iter(_tuning_file(tmp_path).values()))["provisional"] == "timed runs were descheduled"
    monkeypatch.setattr(numba_cpu, "_plans", {})  # a new plan, same process: not timed again
    _layer_call()
    assert len(timed) == first
    restart()  # a new process: measured again, once
    _layer_call()
    monkeypatch.setattr(numba_cpu, "_plans", {})
    _layer_call()
    assert len(timed) == 2 * first


def test_descheduled_timing_runs_make_a_choice_provisional(fresh_tuning, tmp_path, monkeypatch):
    """Runs during which the timing thread ran only a tenth of the wall time: not trusted."""
    import types

    from conftest import torch_threads
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    clock = {"wall": 0.0, "cpu": 0.0}

    def tick(name, step):
        def read():
            clock[name] += step
            return clock[name]
        return read

    monkeypatch.setattr(numba_cpu, "TUNE_CLEAN_SHARE", 0.9)
    monkeypatch.setattr(numba_cpu, "time", types.SimpleNamespace(perf_counter=tick("wall", 1e-3),
                                                                 thread_time=tick("cpu", 1e-4)))
    with torch_threads(1):
        _layer_call()
    (entry,) = _tuning_file(tmp_path).values()
    assert entry["provisional"] == "timed runs were descheduled"


def test_a_provisional_entry_never_replaces_a_settled_one_another_process_wrote(fresh_tuning, tmp_path, monkeypatch):
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    _layer_call()
    ((key, settled),) = _tuning_file(tmp_path).items()
    restart()
    numba_cpu._choices()  # this process read the file ...
    numba_cpu._record(key, {"choice": "openblas/bands", "provisional": "load average 9.0 on 2 CPUs"})  # ... then measured
    assert _tuning_file(tmp_path) == {key: settled}
    assert numba_cpu._choices()[key]["choice"] == "openblas/bands"  # this process keeps its own choice
    numba_cpu._record("another key", {"choice": "mkl/columns", "provisional": "load average 9.0 on 2 CPUs"})
    assert _tuning_file(tmp_path)["another key"]["choice"] == "mkl/columns"


@pytest.mark.parametrize("load, expected", [(3.5, "load average 3.5 on 2 CPUs"), (1.9, None), (OSError, None)])
def test_busy_is_a_load_average_above_the_machines_cpus(monkeypatch, load, expected):
    from fusedlinear.backend import numba_cpu

    def getloadavg():
        if load is OSError:
            raise OSError("no load average here")
        return (load, 0.0, 0.0)

    monkeypatch.setattr(numba_cpu.os, "getloadavg", getloadavg)
    monkeypatch.setattr(numba_cpu.os, "cpu_count", lambda: 2)
    assert numba_cpu._busy() == expected


@pytest.mark.parametrize("load, expected", [(10.0, None), (70.0, "load average 70.0 on 64 CPUs")])
def test_a_process_pinned_to_a_few_cpus_compares_the_load_with_the_whole_machine(monkeypatch, load, expected):
    """The load average counts the whole machine (containers and batch jobs on a shared node too):
    a job given 2 of 64 cores, the node at load 10, is not busy (else it never settles a choice)."""
    from fusedlinear.backend import numba_cpu

    monkeypatch.setattr(numba_cpu.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(numba_cpu.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(numba_cpu.os, "cpu_count", lambda: 64)
    assert numba_cpu._busy() == expected


def test_a_settled_choice_a_call_cannot_use_is_timed_once_per_process_on_a_busy_machine(fresh_tuning, tmp_path, monkeypatch):
    """A settled choice the call cannot run (an edited or stale file: "mkl/bands" where m=3 on 2
    threads has no row bands) is kept in the file, the busy measurement only provisional, and a new
    plan of m=3 must not time it again (nor any later one, until the budget)."""
    from conftest import torch_threads
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    with torch_threads(2):
        x, w = torch.randn(3, 300), torch.randn(200, 300)
        key = numba_cpu._shape_class(x, w, None)
        numba_cpu._choices()
        numba_cpu._record(key, "mkl/bands")  # what a quiet process measured at m=4
        restart()
        monkeypatch.setattr(numba_cpu, "_busy", lambda: "load average 9.0 on 2 CPUs")
        for _ in range(3):
            monkeypatch.setattr(numba_cpu, "_plans", {})  # a new plan: another W, an unkept plan
            a, _ = numba_cpu.forward(x, w, None, "relu", 0.0)
            torch.testing.assert_close(a, torch.relu(x @ w.T), atol=1e-4, rtol=1e-4)
    assert timed and "mkl/bands" not in timed and len(set(timed)) == len(timed)  # timed once
    assert _tuning_file(tmp_path)[key] == "mkl/bands"


def test_a_run_too_slow_because_descheduled_leaves_the_tables_choice_provisional(fresh_tuning, tmp_path, monkeypatch):
    """On a team runs are timed in wall time: a run descheduled for a second looks too slow, and
    the table's choice is taken, but only as provisional (measured again when the machine is quiet)."""
    import time as real_time
    import types

    from conftest import torch_threads
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    wall = [0.0]

    def descheduled():  # each reading a second later than the last
        wall[0] += 1.0
        return wall[0]

    monkeypatch.setattr(numba_cpu, "TUNE_CLEAN_SHARE", 0.9)
    monkeypatch.setattr(numba_cpu, "time", types.SimpleNamespace(perf_counter=descheduled, thread_time=real_time.thread_time))
    with torch_threads(2):
        _layer_call()
        (entry,) = _tuning_file(tmp_path).values()
        assert entry == {"choice": numba_cpu._table_choice(64, 2), "provisional": "timed runs were descheduled"}


@pytest.mark.parametrize("load, expected", [(3.5, "load average 3.5 on 2 CPUs"), (1.9, None)])
def test_busy_without_cpu_affinity_counts_the_machines_cpus(monkeypatch, load, expected):
    """macOS has a load average but no os.sched_getaffinity: the load is still compared."""
    from fusedlinear.backend import numba_cpu

    monkeypatch.setattr(numba_cpu.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.delattr(numba_cpu.os, "sched_getaffinity")
    monkeypatch.setattr(numba_cpu.os, "cpu_count", lambda: 2)
    assert numba_cpu._busy() == expected


def test_busy_without_a_load_average_is_never_busy(monkeypatch):
    """Windows has no os.getloadavg: no measurement is provisional for the load."""
    from fusedlinear.backend import numba_cpu

    monkeypatch.delattr(numba_cpu.os, "getloadavg")
    assert numba_cpu._busy() is None


@pytest.mark.parametrize("junk", [None, 5, ["mkl/columns"]])
def test_a_damaged_entry_is_replaced_by_a_provisional_measurement(fresh_tuning, tmp_path, monkeypatch, junk):
    """A hand-edited entry that is no choice at all is not a settled one: a busy machine's
    measurement replaces it (else every busy process times that shape again)."""
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    _layer_call()
    ((key, _),) = _tuning_file(tmp_path).items()
    numba_cpu._record(key, junk)
    restart()
    monkeypatch.setattr(numba_cpu, "_busy", lambda: "load average 9.0 on 2 CPUs")
    _layer_call()
    first = len(timed)
    assert _tuning_file(tmp_path)[key]["provisional"] == "load average 9.0 on 2 CPUs"
    restart()
    _layer_call()
    assert len(timed) == first


def test_row_counts_of_one_class_with_other_candidates_keep_their_own_choices(fresh_tuning, tmp_path):
    """On 2 threads m=4 may tile in row bands and m=3 may not, both in the class m<=4: each set of
    candidates is measured and kept for itself, so a process starting with m=3 does not replace
    what m=4 measured (and the next m=4 process does not measure again)."""
    from conftest import torch_threads
    from fusedlinear.backend import numba_cpu

    restart, timed = fresh_tuning
    w = torch.randn(200, 300)
    with torch_threads(2):
        numba_cpu.forward(torch.randn(4, 300), w, None, "relu", 0.0)
        first = list(timed)
        assert "mkl/bands" in first
        restart()
        numba_cpu.forward(torch.randn(3, 300), w, None, "relu", 0.0)
        second = timed[len(first):]
        assert sorted(second) == sorted(c for c in first if not c.endswith("/bands"))
        restart()
        numba_cpu.forward(torch.randn(4, 300), w, None, "relu", 0.0)
    assert len(timed) == len(first) + len(second)  # the last m=4 process timed nothing
    choices = _tuning_file(tmp_path)
    assert len(choices) == 2 and all(key.startswith("float32 forward m<=4 ") for key in choices), choices
