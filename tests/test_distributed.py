"""Multi-process training: DDP over gloo with fused layers gives single-process gradients."""

import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from distributed_helpers import gradients
from fusedlinear import distributed, mnist, train


@pytest.mark.slow
def test_two_processes_give_single_process_gradients(tmp_path):
    path = str(tmp_path / "grads.pt")
    mp.start_processes(gradients, args=(2, distributed.free_port(), 3, 64, path), nprocs=2,
                       join=True, start_method="spawn")
    ddp = torch.load(path)
    data = mnist.load_bundled()
    model = train.make_model(True, 3, "cpu")
    nn.functional.cross_entropy(model(data.train_images[:64]), data.train_labels[:64]).backward()
    for name, p in model.named_parameters():
        # float32; the two halves' gradients are averaged by gloo in another summation order
        torch.testing.assert_close(ddp[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_train_nproc_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fusedlinear", "train", "--nproc", "2", "--epochs", "1",
                          "--no-progress", "--json", str(tmp_path / "r.json"), "--save", str(tmp_path / "m.pt")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["processes"] == 2 and summary["test_accuracy"] > 0.85
    model = mnist.NeuralNetwork()
    model.load_state_dict(torch.load(tmp_path / "m.pt"), strict=True)


@pytest.mark.slow
def test_train_under_torchrun_matches_nproc(tmp_path):
    runs = {}
    for name, cmd in (("torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                                    "fusedlinear", "train"]),
                      ("nproc", [sys.executable, "-m", "fusedlinear", "train", "--nproc", "2"])):
        out = subprocess.run(cmd + ["--epochs", "1", "--no-progress", "--json", str(tmp_path / f"{name}.json")],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.count("data: bundled MNIST") == 1  # one rank reports
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["torchrun"]["final_loss"] == pytest.approx(runs["nproc"]["final_loss"], rel=1e-6)
    assert runs["torchrun"]["test_accuracy"] == runs["nproc"]["test_accuracy"]


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of --nproc 3"):
        train.check_batch(64, 3)
