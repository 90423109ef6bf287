"""``fusedlinear parity``: passes here, fails (exit 1) when a kernel is wrong or a backend silently
does not run, and refuses bad arguments with one line and exit status 2."""

import json
import re

import pytest
import torch

from fusedlinear import backend, cli, parity
from fusedlinear.backend import numba_cpu, reference
from fusedlinear.kernels import NAMES


def test_quick_run_passes_here_and_covers_every_backend_dtype_activation(tmp_path, capsys):
    path = tmp_path / "parity.json"
    assert cli.main(["parity", "--quick", "--json", str(path)]) == 0, capsys.readouterr().out[-3000:]
    rows = json.loads(path.read_text())["rows"]
    covered = {(r["backend"], r["dtype"], r["activation"]) for r in rows}
    want = {("numba", d, a) for d in ("float32", "float64") for a in NAMES}
    want |= {("torch", d, a) for d in ("float32", "float64", "float16", "bfloat16") for a in NAMES}
    assert want <= covered
    assert all(r["ok"] and r["error"] <= r["tolerance"] for r in rows)
    out = capsys.readouterr().out
    assert "rel. error" in out and f"{len(rows)} checks, 0 mismatches" in out


def _run_numba(tmp_path, dtype="float64"):
    """Exit status and rows of a quick numba run."""
    rc = cli.main(["parity", "--quick", "--backend", "numba", "--dtype", dtype, "--json", str(tmp_path / "p.json")])
    return rc, json.loads((tmp_path / "p.json").read_text())["rows"]


# one element off by this much of its size: 1000x float32's rounding bound at K = 100 is ~1e-3 (sqrt(K)·Σ|terms|
# with Σ|terms| ~ 10 and 8 unit roundoffs: 4e-5), float64 is ~1e-13 there.
WRONG_BY = {"float32": 1e-3, "float64": 1e-9}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_wrong_output_fails(monkeypatch, tmp_path, dtype):
    right = numba_cpu.forward

    def wrong(x, w, b, activation, slope):
        a, z = right(x, w, b, activation, slope)
        a[-1, -1] += WRONG_BY[dtype] * (1 + a[-1, -1].abs())
        return a, z

    monkeypatch.setattr(numba_cpu, "forward", wrong)
    rc, rows = _run_numba(tmp_path, dtype)
    assert rc == 1
    assert [r for r in rows if "output at" not in r["note"]] == []  # every row: a wrong output is not rounding


def test_a_wrong_weight_gradient_fails(monkeypatch, tmp_path):
    right = numba_cpu.backward

    def wrong(*args):
        dx, dw, db = right(*args)
        dw[0, 0] += WRONG_BY["float64"] * (1 + dw[0, 0].abs())
        return dx, dw, db

    monkeypatch.setattr(numba_cpu, "backward", wrong)
    rc, rows = _run_numba(tmp_path)
    assert rc == 1
    assert [r for r in rows if "weight0 at" not in r["note"]] == []


def test_a_silent_fallback_fails(monkeypatch, tmp_path):
    """Dispatch that quietly runs plain PyTorch instead of the numba kernels: right values, but
    the row must not pass."""
    monkeypatch.setattr(backend, "route", lambda x, w, b=None, **how: reference)
    rc, rows = _run_numba(tmp_path)
    assert rc == 1
    assert [r for r in rows if "did not run" not in r["note"]] == []


def _exit_status(argv) -> int:
    """What ``python -m fusedlinear ARGV`` exits with: main's return value, or argparse's SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("argv, message", [
    (["--backend", "bogus"], r"--backend 'bogus': unknown 'bogus'; choose from numba, cupy, torch"),
    (["--dtype", "int8"], r"--dtype 'int8': unknown 'int8'; choose from float64, float32, float16, bfloat16"),
    (["--dtype", ","], r"--dtype ',': unknown empty list"),
    (["--backend", "numba", "--dtype", "bfloat16"], r"nothing to check here .* numba runs float32/float64"),
    (["--json", "/no/such/dir/out.json"], r"directory '/no/such/dir' does not exist"),
    (["--quick", "extra"], r"unrecognized arguments: extra"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    assert _exit_status(["parity", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) <= 3, err  # argparse's own: usage + error


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine cupy may run")
def test_a_backend_that_cannot_run_here_is_named(capsys):
    assert _exit_status(["parity", "--backend", "cupy"]) == 2 and "cupy: cannot run here" in capsys.readouterr().err


def test_help_states_each_tolerance_and_its_reason(capsys):
    with pytest.raises(SystemExit):
        cli.main(["parity", "--help"])
    out = capsys.readouterr().out
    for dtype, reason in parity.TOLERANCE_REASONS.items():
        assert f"{dtype:9s} {reason}" in out


def test_every_activation_has_a_float64_reference():
    assert set(parity.REFERENCE) == set(NAMES)
