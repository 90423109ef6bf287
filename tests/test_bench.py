"""`fusedlinear bench` runs end to end on tiny sizes (the numbers themselves live in benchmarks/RESULTS.md)."""

import csv
import subprocess
import sys

import pytest


def test_bench_layer_and_step_write_csv(tmp_path):
    path = tmp_path / "bench.csv"
    for what in ("layer", "step"):
        out = subprocess.run([sys.executable, "-m", "fusedlinear", "bench", what, "--providers", "fused,eager,blas",
                              "--batches", "1,3", "--rounds", "1", "--reps", "2", "--min-seconds", "0",
                              "--shape", "16x8", "--csv", str(path)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "paired /eager" in out.stdout
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 * 3 * 2  # two benchmarks x three providers x two batches
    assert {r["provider"] for r in rows} == {"fused", "eager", "blas"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["machine"] and r["torch"] and r["timestamp"]
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])


def test_bench_rejects_unknown_provider():
    out = subprocess.run([sys.executable, "-m", "fusedlinear", "bench", "layer", "--providers", "tensorflow"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "unknown provider 'tensorflow'" in out.stderr


def test_csv_from_another_version_is_kept_and_rows_go_beside_it(tmp_path):
    from fusedlinear.bench import append_csv

    path = tmp_path / "old.csv"
    path.write_text("kernel,median_ms\nstep,1.0\n")
    append_csv(str(path), [{"kernel": "step", "median_ms": 2.0, "openblas_core": "SkylakeX"}])
    assert path.read_text() == "kernel,median_ms\nstep,1.0\n"
    (other,) = [p for p in tmp_path.iterdir() if p != path]
    assert list(csv.DictReader(other.open())) == [{"kernel": "step", "median_ms": "2.0", "openblas_core": "SkylakeX"}]


def test_bench_infer_writes_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "infer.csv", tmp_path / "infer.png"
    out = subprocess.run([sys.executable, "-m", "fusedlinear", "bench", "infer", "--providers", "fused,eager",
                          "--batches", "2,5", "--rounds", "1", "--reps", "2", "--min-seconds", "0",
                          "--csv", str(path), "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(path.open()))
    assert [(r["kernel"], r["provider"], r["batch"]) for r in rows] == [
        ("infer", p, b) for b in ("2", "5") for p in ("fused", "eager")]
    assert all(float(r["median_ms"]) > 0 and float(r["gflops"]) > 0 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_coldstart_runs_empty_then_warm(tmp_path):
    """Three fresh processes on one new JIT cache: the first compiles, the next two load."""
    path = tmp_path / "cold.csv"
    out = subprocess.run([sys.executable, "-m", "fusedlinear", "bench", "coldstart", "--csv", str(path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(path.open()))
    assert [r["cache"] for r in rows] == ["empty", "warm", "warm"]
    for r in rows:
        assert 0 < float(r["import_s"]) < float(r["process_s"]) and float(r["first_call_s"]) > 0
    assert out.stdout.count("JIT cache") == 3
