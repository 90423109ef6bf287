"""src/fusedlinear/cli.py, the fusedlinear command: train reaches its target, --compare and
--idx-dir, --plot, info; bad input is one line and exit status 2; Ctrl-C is one line and 130."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import fusedlinear_cli, write_idx_set
from fusedlinear import mnist, train


@pytest.mark.slow
def test_default_train_reaches_target(tmp_path):
    """`fusedlinear train` as a new user runs it: >= 0.96 test accuracy on the bundled split."""
    out = fusedlinear_cli("train", "--no-progress", "--json", str(tmp_path / "run.json"), "--save", str(tmp_path / "m.pt"))
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run.json").read_text())
    for key in ("test_accuracy", "final_loss", "epochs", "seconds", "samples_per_s", "device", "backend"):
        assert key in summary
    assert summary["backend"] == "numba" and summary["device"] == "cpu" and summary["epochs"] == 10
    assert summary["test_accuracy"] >= 0.96, summary["test_accuracy"]
    model = mnist.NeuralNetwork()
    model.load_state_dict(torch.load(tmp_path / "m.pt"), strict=True)
    data = mnist.load_bundled()
    assert abs(train.evaluate(model, data.test_images, data.test_labels) - summary["test_accuracy"]) < 1e-9


def test_compare_and_idx_dir_cli(tmp_path):
    write_idx_set(str(tmp_path), n_train=64, n_test=32)
    out = fusedlinear_cli("train", "--compare", "--epochs", "2", "--batch-size", "16", "--no-progress", "--data-dir",
               str(tmp_path), "--json", str(tmp_path / "c.json"))
    assert out.returncode == 0, out.stderr
    assert "largest per-step loss difference" in out.stdout and "speed of eager" in out.stdout
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["max_loss_difference"] < 1e-4 and summary["epochs"] == 2


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--data-dir", "/nonexistent/dir"], "/nonexistent/dir is not a directory"),
    (["--device", "cuda:7"], "CUDA GPU(s); use --device cpu"),
])
def test_cli_bad_options(args, message):
    out = fusedlinear_cli("train", "--no-progress", *args)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_info_runs():
    out = fusedlinear_cli("info")
    assert out.returncode == 0, out.stderr
    assert "numba" in out.stdout and "cpu" in out.stdout and "JIT caches" in out.stdout


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = fusedlinear_cli("train", "--epochs", "2", "--no-progress", "--compare", "--plot", str(tmp_path / "curves.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CASES = [
    # (environment, arguments, what the one line must say)
    ({"FUSEDLINEAR_CPU_BLAS": "bogus"}, ["info"], "FUSEDLINEAR_CPU_BLAS='bogus' is not a BLAS choice: use one of auto, mkl, openblas"),
    ({"FUSEDLINEAR_BACKEND": "triton"}, ["train", "--epochs", "1"], "unknown backend 'triton' (environment variable FUSEDLINEAR_BACKEND)"),
    ({"FUSEDLINEAR_BACKEND": "triton"}, ["info"], "valid backends are numba, cupy, torch"),
    ({}, ["bench", "layer", "--batches", "abc"], "--batches: 'abc' is not a comma-separated list of batch sizes"),
    ({}, ["bench", "layer", "--batches", "1,0"], "--batches: '1,0' is not a comma-separated list of batch sizes >= 1"),
    ({}, ["bench", "layer", "--shape", "10"], "--shape: '10' is not in_features x out_features (e.g. 784x512)"),
    ({}, ["bench", "layer", "--activation", "ReLU"], "--activation: 'ReLU' is not an activation; choose from identity, relu"),
    ({}, ["bench", "layer", "--rounds", "0"], "--rounds: '0' must be a finite number of at least 1"),
    ({}, ["bench", "layer", "--reps", "0"], "--reps: '0' must be a finite number of at least 1"),
    ({}, ["bench", "layer", "--min-seconds", "nan"], "--min-seconds: 'nan' must be a finite number of at least 0"),
    ({}, ["bench", "layer", "--providers", "fused,tensorflow"], "unknown provider 'tensorflow'; choose from fused"),
    ({}, ["bench", "layer", "--csv", "/nonexistent-dir/x.csv"], "directory /nonexistent-dir does not exist"),
    ({}, ["train", "--epochs", "-3"], "--epochs must be at least 1, got -3"),
    ({}, ["train", "--epochs", "two"], "--epochs: invalid int value: 'two'"),
    ({}, ["train", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ({}, ["train", "--lr", "nan"], "--lr must be a positive number, got nan"),
    ({}, ["train", "--shift", "-1"], "--shift must be between 0 and 8 pixels, got -1"),
    ({}, ["train", "--nproc", "0"], "--nproc must be at least 1, got 0"),
    ({}, ["train", "--data-dir", "/nonexistent/dir"], "--data-dir /nonexistent/dir is not a directory"),
    ({}, ["train", "--save", "/nonexistent-dir/model.pt"], "directory /nonexistent-dir does not exist; create it first"),
    ({}, ["train", "--json", "/"], "'/' is a directory; give a file name in it"),
    # Root may write anywhere but /proc: the real write up front fails there, before any training.
    ({}, ["train", "--save", "/proc/x.pt", "--epochs", "1"], "'/proc/x.pt' cannot be written here"),
    ({}, ["train", "--json", "/proc/x.json", "--epochs", "1"], "'/proc/x.json' cannot be written here"),
    ({}, ["train", "--plot", "/proc/x.png", "--epochs", "1"], "'/proc/x.png' cannot be written here"),
    ({}, ["bench", "layer", "--csv", "/proc/x.csv"], "'/proc/x.csv' cannot be written here"),
    ({"FUSEDLINEAR_BACKEND": "cupy"}, ["train", "--device", "cpu", "--epochs", "1"],
     "FUSEDLINEAR_BACKEND=cupy cannot run on --device cpu tensors; unset it or use numba/torch"),
    ({}, ["train", "--seed", "99999999999999999999"], "'99999999999999999999' is out of range; use a seed from 0 to 2**63 - 1"),
    ({}, ["train", "--seed", "-1"], "'-1' is out of range"),
    ({}, ["train", "--device", "mps"], "--device mps: only cpu and cuda are supported"),
    ({}, ["train", "--device", "tpu:0"], "--device 'tpu:0' is not a device name (try cpu or cuda)"),
    ({}, ["train", "--compare", "--nproc", "2"], "--compare runs in one process: drop --nproc"),
]


@pytest.mark.parametrize("env, args, message", CASES, ids=[" ".join(c[1]) + (f" {c[0]}" if c[0] else "") for c in CASES])
def test_bad_input_is_one_line_and_exit_2(env, args, message):
    out = fusedlinear_cli(*args, env=env, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-2000:]
    assert message in lines[0], lines[0]


def test_compare_with_save_is_refused_before_training(tmp_path):
    out = fusedlinear_cli("train", "--compare", "--save", str(tmp_path / "m.pt"), "--no-progress", timeout=300)
    assert out.returncode == 2 and "--save needs a single training run: drop --compare" in out.stderr, out.stderr
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1  # nothing trained, nothing printed
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_save_path_is_refused_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        out = fusedlinear_cli("train", "--save", str(locked / "m.pt"), "--no-progress", timeout=300)
    finally:
        locked.chmod(0o700)
    assert out.returncode == 2 and "cannot be written here; choose a writable path" in out.stderr, out.stderr
    assert out.stdout == ""


def test_forced_cpu_backend_refuses_cuda_device(monkeypatch):
    """FUSEDLINEAR_BACKEND=numba with --device cuda (no GPU here to reach it through the CLI)."""
    from fusedlinear import cli

    monkeypatch.setenv("FUSEDLINEAR_BACKEND", "numba")
    with pytest.raises(cli.UsageError, match=r"^FUSEDLINEAR_BACKEND=numba cannot run on --device cuda tensors; "
                                             r"unset it or use cupy/torch$"):
        cli._check_forced_backend("cuda")


def _sigint_as_in_a_terminal():
    """Run in the child before it starts: SIGINT at its default, as a terminal's foreground job has
    it. A shell starts background jobs (`cmd &`) with SIGINT ignored and children inherit that;
    Python then installs no KeyboardInterrupt handler, and a Ctrl-C test would test the shell."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_train_says_one_line_and_exits_130(tmp_path):
    """SIGINT (Ctrl-C) in the middle of training: one line on stderr saying what was interrupted and
    that the checkpoint was not written, exit status 130, no traceback, and no file (not even a
    half-written one) where --save points."""
    proc = subprocess.Popen([sys.executable, "-m", "fusedlinear", "train", "--epochs", "1000", "--no-progress",
                             "--save", str(tmp_path / "m.pt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_sigint_as_in_a_terminal,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        while not any(line.startswith("epoch 1/") for line in lines):  # training is under way
            line = proc.stdout.readline()
            assert line, f"train ended before its first epoch: {proc.wait()} {proc.stderr.read()[-2000:]}"
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    # Before the interrupt, stderr may hold the one-time notices of a cold kernel cache (compiling,
    # timing the BLAS choice: "fusedlinear: ..."); the interrupt itself is one line, the last.
    *before, last = err.strip().splitlines()
    assert "Traceback" not in err and not any("interrupt" in line.lower() for line in before), err[-2000:]
    assert last.startswith("fusedlinear train: interrupted (Ctrl-C); nothing saved") and str(tmp_path / "m.pt") in last
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file left behind


# Ctrl-C at a fixed moment of the startup: a sitecustomize sends this process SIGINT as torch's
# import begins (the ~0.5 s a user is most likely to hit), whichever way the command is started.
_INTERRUPT_AT_TORCH = """
import os, signal, sys

class _Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, _Interrupt())
"""


@pytest.mark.parametrize("how", ["module", "console script"])
def test_ctrl_c_while_the_command_imports_torch_is_one_line_and_130(tmp_path, how):
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT_AT_TORCH)
    script = os.path.join(os.path.dirname(sys.executable), "fusedlinear")
    if how == "console script" and not os.path.exists(script):
        pytest.skip("no fusedlinear console script beside this Python (not pip-installed)")
    command = [sys.executable, "-m", "fusedlinear", "info"] if how == "module" else [sys.executable, script, "info"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=_sigint_as_in_a_terminal)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr == "fusedlinear: interrupted (Ctrl-C) while starting; nothing done\n" and proc.stdout == ""


def test_importing_the_library_leaves_ctrl_c_alone():
    code = "import signal, fusedlinear; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=_sigint_as_in_a_terminal)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]
