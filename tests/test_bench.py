"""`fusedlinear bench` runs end to end on tiny sizes (the numbers themselves live in benchmarks/RESULTS.md)."""

import csv
import subprocess
import sys


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
