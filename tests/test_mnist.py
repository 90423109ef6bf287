"""The main job: the MNIST model, its data, the IDX loader, convergence and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import fusedlinear
from fusedlinear import mnist, train
from conftest import fusedlinear_cli, write_idx_set

FASHION = "/usr/share/datasets/fashion-mnist"


def test_model_is_the_reference_mlp_and_fuses():
    model = mnist.NeuralNetwork()
    assert [type(m) for m in model.linear_relu_stack] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    fused = fusedlinear.fuse(model)
    assert isinstance(fused.linear_relu_stack[0], fusedlinear.FusedLinearReLU)
    assert list(fused.state_dict()) == list(model.state_dict())


def test_bundled_data_and_split_are_deterministic():
    images, labels = mnist.bundled_arrays()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    a, b = mnist.load_bundled(), mnist.load_bundled()
    assert len(a.train_labels) == 8000 and len(a.test_labels) == 2000
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_images, b.test_images)
    order = np.random.default_rng(0).permutation(10000)
    assert torch.equal(a.test_labels, torch.from_numpy(labels[order[8000:]].astype(np.int64)))


@pytest.mark.parametrize("dtype,tol", [
    # float32: eager and fused GEMMs differ in blocking (OpenBLAS tiles vs PyTorch's GEMM): ~1e-7
    # relative per step, which 50 SGD steps do not amplify past 1e-5; 1e-4 is the bound.
    (torch.float32, 1e-4),
    # float64: the same at ~1e-16 per step.
    (torch.float64, 1e-10),
], ids=["f32", "f64"])
def test_convergence_eager_vs_fused(dtype, tol):
    """Liger-Kernel style: same seed, 50 optimizer steps; loss at every step and final parameters agree."""
    data = mnist.load_bundled()
    losses, params = [], []
    for fused in (False, True):
        model = train.make_model(fused, seed=0, device="cpu", dtype=dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        run = []
        for _ in range(50):
            idx = torch.randint(0, 8000, (64,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.train_images[idx].to(dtype)), data.train_labels[idx])
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(torch.tensor(run, dtype=torch.float64))
        params.append([p.detach().double() for p in model.parameters()])
    assert losses[0][-1] < 0.5 * losses[0][0], "the run should actually learn"
    torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=0)
    for p1, p0 in zip(params[1], params[0]):
        torch.testing.assert_close(p1, p0, rtol=tol, atol=tol)




@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(str(tmp_path), gz=gz)
    data = mnist.load_idx_dir(str(tmp_path))
    assert torch.equal(data.train_labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)))
    expected = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32)) / 255 - mnist.MEAN) / mnist.STD
    torch.testing.assert_close(data.test_images, expected)


def _corrupt(path, how):
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[:-5]
    elif how == "magic":
        data = b"\x00\x00\x08\x05" + data[4:]
    elif how == "header":
        data = data[:6]
    elif how == "trailing":
        data = data + b"\x00"
    open(path, "wb").write(data)


@pytest.mark.parametrize("how,pattern", [
    ("missing", r"not found: .*t10k-labels-idx1-ubyte"),
    ("truncated", r"t10k-labels-idx1-ubyte is truncated|truncated"),
    ("magic", r"t10k-labels-idx1-ubyte has magic number 0x00000805, expected 0x00000801"),
    ("header", r"t10k-labels-idx1-ubyte is truncated"),
    ("trailing", r"t10k-labels-idx1-ubyte .*trailing bytes"),
])
def test_idx_errors_name_the_file(tmp_path, how, pattern):
    write_idx_set(str(tmp_path))
    path = os.path.join(tmp_path, "t10k-labels-idx1-ubyte")
    if how == "missing":
        os.remove(path)
    else:
        _corrupt(path, how)
    with pytest.raises(mnist.IDXError, match=pattern):
        mnist.load_idx_dir(str(tmp_path))


def test_idx_corrupt_gzip_names_the_file(tmp_path):
    write_idx_set(str(tmp_path), gz=True)
    path = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(mnist.IDXError, match="train-images-idx3-ubyte.gz"):
        mnist.load_idx_dir(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"{FASHION} not installed (Debian: dataset-fashion-mnist)")
def test_full_fashion_mnist_directory():
    data = mnist.load_idx_dir(FASHION)
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10




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


# ---- train options, in-process on a tiny IDX set (64 training, 32 test images: a few steps) --------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-idx")
    write_idx_set(str(directory), n_train=64, n_test=32)
    return str(directory)


def _train(tiny, tmp_path, *args):
    """`fusedlinear train` on the tiny set in this process; its JSON summary."""
    from fusedlinear.cli import main

    path = str(tmp_path / f"run-{len(list(tmp_path.iterdir()))}.json")
    assert main(["train", "--epochs", "1", "--batch-size", "16", "--no-progress", "--data-dir", tiny,
                 "--json", path, *args]) == 0
    return json.loads(open(path).read())


def test_train_seed_reproduces_and_changes_the_run(tiny, tmp_path):
    first, again, other = (_train(tiny, tmp_path, "--seed", seed) for seed in ("3", "3", "4"))
    assert first["history"]["step_losses"] == again["history"]["step_losses"]  # bitwise: same seed, same run
    assert first["history"]["step_losses"][0] != other["history"]["step_losses"][0]  # other initial weights
    assert first["config"]["seed"] == 3 and other["config"]["seed"] == 4


def test_train_optimizer_sgd(tiny, tmp_path):
    adam, sgd = _train(tiny, tmp_path, "--optimizer", "adam"), _train(tiny, tmp_path, "--optimizer", "sgd")
    assert sgd["config"]["optimizer"] == "sgd" and adam["config"]["optimizer"] == "adam"
    # the same first step (same weights and batch, before any update), then different updates
    assert sgd["history"]["step_losses"][0] == adam["history"]["step_losses"][0]
    assert sgd["history"]["step_losses"][1] != adam["history"]["step_losses"][1]


def test_train_shift(tiny, tmp_path):
    plain, shifted = _train(tiny, tmp_path, "--shift", "0"), _train(tiny, tmp_path, "--shift", "3")
    assert plain["config"]["shift"] == 0 and shifted["config"]["shift"] == 3
    assert plain["history"]["step_losses"][0] != shifted["history"]["step_losses"][0]  # other images in the batch
    out = fusedlinear_cli("train", "--no-progress", "--shift", "9")
    assert out.returncode != 0 and "--shift must be between 0 and 8 pixels, got 9" in out.stderr, out.stderr


def test_train_nproc_equals_one_process(tiny, tmp_path, capsys):
    """--nproc 2 splits each global batch over two processes: the same steps as one process on the
    same global batches (no shifts: each process would draw its own)."""
    one = _train(tiny, tmp_path, "--shift", "0", "--nproc", "1")
    two = _train(tiny, tmp_path, "--shift", "0", "--nproc", "2")
    assert two["processes"] == 2
    # float32; the halves' gradients are averaged by gloo in another summation order (~1e-7 per
    # step relative), over 4 steps
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
    from fusedlinear.cli import main

    for nproc, message in (("3", "multiple of --nproc 3"), ("0", "--nproc")):
        capsys.readouterr()
        code = main(["train", "--epochs", "1", "--batch-size", "16", "--no-progress", "--data-dir", tiny,
                     "--nproc", nproc])
        assert code == 2 and message in capsys.readouterr().err  # one line, exit 2, before any work
