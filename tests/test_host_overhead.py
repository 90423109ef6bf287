"""benchmarks/host_overhead.py runs (briefly) on the CPU build, so the harness cannot rot again: it
broke once when the CUDA backend began asking torch.cuda for its current stream, which the harness
did not stand in for. No timing is asserted: the numbers live in benchmarks/RESULTS.md."""

import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
ROWS = ("eager forward", "fused forward", "eager forward+backward", "fused forward+backward")


@pytest.mark.parametrize("args, launches", [((), 2), (("--cuda-valid",), 2), (("--backend", "numba"), 2)],
                         ids=["cupy stubbed", "cupy stubbed, old _valid", "numba"])
def test_harness_prints_its_table(args, launches):
    out = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--inner", "20", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # fwd+bwd of one relu layer: forward A = g(Z) (GEMM by torch on the CUDA path) and the dZ+db pass;
    # on the CPU: one forward kernel, one backward kernel (dX not needed: the input has no grad)
    assert f"our launches per fwd+bwd: {launches}" in out.stdout, out.stdout
    for row in ROWS:
        line = re.search(rf"^  {re.escape(row)} +([\d.]+) \(([\d.]+)-([\d.]+)\) µs CPU +(\d+) Python calls", out.stdout, re.M)
        assert line, (row, out.stdout)
        assert float(line.group(1)) > 0 and int(line.group(4)) > 0
