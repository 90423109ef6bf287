"""src/fusedlinear/mnist.py: the reference model, the bundled digits and their split, the IDX
loader (round trip, corrupt files named, the full Fashion-MNIST directory)."""

import os

import numpy as np
import pytest
import torch
from torch import nn

import fusedlinear
from conftest import write_idx_set
from fusedlinear import mnist

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
