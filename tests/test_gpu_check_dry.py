"""benchmarks/gpu_check.sh on the CPU (GPU_CHECK_DRY=1): the same interpreter finding, install,
steps and timeouts the GPU machine gets, with stand-ins for nvidia-smi and compute-sanitizer (and
for pip, curl, wget: any call is recorded) on PATH, and an environment whose proxies lead nowhere.

One run, with the layer benchmark's limit set below what its slowed rows need, so that step is
killed by its timeout mid-way; the rest must pass."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _tool(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    bin_dir, out, calls = tmp / "bin", tmp / "out", tmp / "calls.log"
    bin_dir.mkdir()
    _tool(bin_dir, "python3", f'exec "{sys.executable}" "$@"')  # found by the script's own search (no $PYTHON)
    _tool(bin_dir, "nvidia-smi", 'echo "name, driver_version"; echo "Stand-in GPU, 0.0"')
    _tool(bin_dir, "compute-sanitizer",
          f'echo "compute-sanitizer $* caching=$PYTORCH_NO_CUDA_MEMORY_CACHING" >> "{calls}"\n'
          'echo "========= ERROR SUMMARY: 0 errors"')
    for name in ("pip", "pip3", "curl", "wget"):
        _tool(bin_dir, name, f'echo "NETWORK {name} $*" >> "{calls}"; exit 1')
    dead = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "OUT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(out), GPU_CHECK_DRY="1", GPU_CHECK_DRY_SLEEP="1.5",
               GPU_CHECK_LAYERS_LIMIT="12", GPU_CHECK_DRY_FAIL="fused-own", TMPDIR=str(tmp), http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead,
               HTTPS_PROXY=dead, ALL_PROXY=dead, no_proxy="", NO_PROXY="", PIP_INDEX_URL=dead + "/simple")
    proc = subprocess.run(["bash", SCRIPT], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    calls_text = calls.read_text() if calls.exists() else ""
    return proc, out, calls_text


def _read(out, name):
    return (out / name).read_text()


def test_at_most_8_files_at_most_2_folders_deep(dry_run):
    _, out, _ = dry_run
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert 0 < len(files) <= 8, files
    assert all(f.count(os.sep) <= 2 for f in files), files


def test_no_network_use(dry_run):
    proc, out, calls = dry_run
    assert "NETWORK" not in calls, calls
    with open(SCRIPT) as f:
        code = [line for line in f if not line.lstrip().startswith("#")]
    assert not any(re.search(r"\bpip\b.*\binstall\b|curl|wget", line) for line in code)
    assert "install: ok" in _read(out, "steps.txt")


def test_the_interpreter_search_and_the_staged_install_are_used(dry_run):
    _, out, _ = dry_run
    env = _read(out, "env.txt")
    assert "python: " in env and "fusedlinear-stage" in env  # imported from the staging copy
    assert "Stand-in GPU" in env


def test_every_step_is_bounded_and_reported(dry_run):
    proc, out, calls = dry_run
    steps = _read(out, "steps.txt")
    for name in ("gpu", "install", "import", "info", "tests", "parity", "memcheck", "bench layers",
                 "bench mnist graphs", "bench compile", "racecheck", "initcheck", "initcheck fl_ reports", "compile test"):
        assert re.search(rf"^{name}: ", steps, re.M), (name, steps, proc.stdout[-3000:], proc.stderr[-3000:])
    # every external command of the script runs through step() (under timeout)
    with open(SCRIPT) as f:
        lines = [line.strip() for line in f if not line.lstrip().startswith("#")]
    runs = [line for line in lines if re.search(r'"\$PY"|nvidia-smi|"\$\{SAN\[@\]\}"|"\$\{BENCH_RUN\[@\]\}"', line)
            and not re.match(r"(SAN|BENCH_RUN)=\(", line)]
    assert runs and all(line.startswith("step ") for line in runs), runs
    assert 'timeout -k 5 "$limit" "$@"' in "\n".join(lines)
    # the sanitizers: caching allocator off, the three tools; memcheck and racecheck on our kernels
    # only, initcheck on every kernel (it sees no write by a kernel it does not instrument)
    sanitizer = [line for line in calls.splitlines() if line.startswith("compute-sanitizer")]
    assert len(sanitizer) == 3 and all("caching=1" in s for s in sanitizer)
    assert all(("--kernel-name kns=fl_" in s) == ("--tool initcheck" not in s) for s in sanitizer), sanitizer
    # and only a report in one of our kernels fails the initcheck result
    assert all(("--error-exitcode" in s) == ("--tool initcheck" not in s) for s in sanitizer), sanitizer
    assert {t for s in sanitizer for t in ("memcheck", "racecheck", "initcheck") if f"--tool {t}" in s} == \
        {"memcheck", "racecheck", "initcheck"}


def test_steps_pass_and_rows_stream(dry_run):
    proc, out, _ = dry_run
    steps = _read(out, "steps.txt")
    for name in ("gpu", "install", "import", "info", "tests", "parity", "memcheck", "bench mnist graphs",
                 "bench compile", "racecheck", "initcheck", "initcheck fl_ reports", "compile test"):
        assert re.search(rf"^{name}: ok", steps, re.M), (name, steps)
    assert "row: torch" in _read(out, "parity.txt")  # parity rows printed as they complete
    bench = _read(out, "bench.md")
    assert re.search(r"\| mnist \| B=64 step \| fp32 \| fused-vendor \| [0-9.]+ ", bench)
    assert re.search(r"\| mnist \| B=64 step \| fp32 \| fused-vendor\+compile-reduce-overhead \| [0-9.]+ ", bench)
    # a row that raises (GPU_CHECK_DRY_FAIL) is written as FAILED and the rows after it still run
    failed = [i for i, line in enumerate(bench.splitlines()) if "| fused-own | FAILED RuntimeError" in line]
    assert failed and any(" | bf16 | eager | " in line for line in bench.splitlines()[failed[0]:])


def test_a_step_killed_by_its_timeout_keeps_its_rows(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 1
    assert re.search(r"^bench layers: TIMED OUT", _read(out, "steps.txt"), re.M)
    bench = _read(out, "bench.md")
    layer_rows = re.findall(r"^\| layers \| .* \| [0-9.]+ \(", bench, re.M)
    assert 1 <= len(layer_rows) < 27, bench  # some rows, not all 27 of them (21 layer rows, 6 dZ+db pass rows)
    assert re.search(r"^\| layers \| stopped: SIGTERM", bench, re.M), bench
