"""The reference model and its data: the classic MNIST MLP, the bundled digits, IDX files.

Bundled data: ``fusedlinear/data/mnist_10k.npz``, 10,000 real MNIST digits (see the README beside
it for provenance and the CC BY-SA 3.0 attribution). The train/test split is deterministic:
``numpy.random.default_rng(0).permutation(10000)``; its first 8,000 indices are the training
set, the last 2,000 the test set.

IDX files (``--data-dir``): the standard ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally gzipped, as shipped for
MNIST and Fashion-MNIST (Debian's ``dataset-fashion-mnist`` installs the latter under
``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import nn

SPLIT_SEED = 0
N_TRAIN = 8000
# The usual MNIST normalisation constants (mean and std of the training pixels in [0, 1]).
MEAN, STD = 0.1307, 0.3081


class NeuralNetwork(nn.Module):
    """Flatten -> Linear(784, 512) -> ReLU -> Linear(512, 512) -> ReLU -> Linear(512, 10)."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


@dataclass
class Dataset:
    """Images as float tensors (N, 28, 28), normalised; labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def _normalise(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD


def bundled_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled 10,000 digits: images (10000, 28, 28) uint8, labels (10000,) uint8."""
    with resources.files("fusedlinear.data").joinpath("mnist_10k.npz").open("rb") as f:
        with np.load(f) as npz:
            return npz["images"], npz["labels"]


def load_bundled() -> Dataset:
    images, labels = bundled_arrays()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return Dataset(
        _normalise(images[train]), torch.from_numpy(labels[train].astype(np.int64)),
        _normalise(images[test]), torch.from_numpy(labels[test].astype(np.int64)),
        source=f"bundled MNIST (10,000 digits, split {N_TRAIN}/{len(labels) - N_TRAIN}, seed {SPLIT_SEED})",
    )


IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # labels (unsigned bytes, 1-D) and images (3-D)


class IDXError(ValueError):
    """A missing, truncated or malformed IDX file; the message names the file."""


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (gzip if the name ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise IDXError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:  # bad gzip stream, truncated gzip, permissions
        raise IDXError(f"cannot read IDX file {path}: {exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"IDX file {path} is truncated: {len(data)} bytes, the header alone needs {header}")
    magic = int.from_bytes(data[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise IDXError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{IDX_MAGIC[ndim]:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); is it the right file?"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise IDXError(
            f"IDX file {path} holds {len(data)} bytes but its header {shape} needs {expected}: "
            f"{'truncated' if len(data) < expected else 'trailing bytes'}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}


def _find(data_dir: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise IDXError(f"IDX file not found: {os.path.join(data_dir, stem)}[.gz] (in --data-dir {data_dir})")


def load_idx_dir(data_dir: str) -> Dataset:
    """MNIST-format data from a directory of IDX files (train and t10k sets)."""
    if not os.path.isdir(data_dir):
        raise IDXError(f"--data-dir {data_dir} is not a directory")
    arrays = {key: read_idx(_find(data_dir, stem), ndim) for key, (stem, ndim) in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise IDXError(f"{split} images in {data_dir} are {images.shape[1:]}, the model needs 28x28")
        if len(images) != len(labels):
            raise IDXError(f"{split} set in {data_dir}: {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise IDXError(f"{split} labels in {data_dir} go up to {labels.max()}; the model has 10 classes")
    return Dataset(
        _normalise(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        _normalise(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        source=f"IDX files in {data_dir} ({len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test)",
    )


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip if the name ends in .gz); used by the tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = IDX_MAGIC[array.ndim].to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
