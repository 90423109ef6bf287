"""src/fusedlinear/train.py: eager and fused training converge alike (loss at every step, final
parameters), the train options (seed, optimizer, shift, nproc), the kernels loaded before the
first step, and checkpoints (refused when wrong, never half written)."""

import json

import pytest
import torch
from torch import nn

import fusedlinear
from conftest import fusedlinear_cli, seeded, write_idx_set
from fusedlinear import mnist, train


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


def test_wrong_checkpoints_are_refused_and_change_nothing(tmp_path):
    """Checkpoints written by the project (`train.save_state_dict`, what `--save` writes) load into the
    fused model and the plain one with strict=True; a wrong-shaped or incomplete one raises naming the
    key and leaves the fused model as it was."""
    from fusedlinear import mnist, train

    fused = fusedlinear.fuse(mnist.NeuralNetwork())
    path = str(tmp_path / "ok.pt")
    train.save_state_dict(fused, path)
    plain = mnist.NeuralNetwork()
    plain.load_state_dict(torch.load(path), strict=True)
    x = seeded(3, 1, 28, 28)
    torch.testing.assert_close(plain(x), fused(x), atol=1e-5, rtol=1e-5)  # float32, K = 784: summation order
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    wrong = dict(before, **{"linear_relu_stack.2.weight": torch.zeros(3, 512)})
    with pytest.raises(RuntimeError, match=r"size mismatch for linear_relu_stack\.2\.weight"):
        fused.load_state_dict(wrong, strict=True)
    missing = {k: v for k, v in before.items() if k != "linear_relu_stack.0.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*linear_relu_stack\.0\.bias"):
        fused.load_state_dict(missing, strict=True)
    for k, v in fused.state_dict().items():  # nothing of the wrong checkpoints got in
        assert torch.equal(v, before[k]), k


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from fusedlinear import train

    path = str(tmp_path / "model.pt")
    model = fusedlinear.FusedLinearReLU(5, 4)
    train.save_state_dict(model, path)
    before = (tmp_path / "model.pt").read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_state_dict(fusedlinear.FusedLinearReLU(5, 4), path)
    assert (tmp_path / "model.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind
