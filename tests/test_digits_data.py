"""Digit readers on fixture files written here in the real formats (idx, gzip idx, bz2 LIBSVM),
the two offline domains, and the real MNIST/USPS test files when ../shared has them."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from dam_lightning.data.digits import MNIST, USPS, SynDigits, UCIDigits

from .conftest import SHARED_DIGITS


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = False) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(folder: Path, split: str = "test", n: int = 5, compress: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "t10k" if split == "test" else "train"
    images = (np.arange(n * 28 * 28) % 256).reshape(n, 28, 28)
    labels = np.arange(n) % 10
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, 2051, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 2049, compress)
    return images, labels


def write_usps(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return path


def usps_line(label: int, value: float, skip: int | None = None) -> str:
    pairs = [f"{i}:{value}" for i in range(1, 257) if i != skip]
    return " ".join([str(label), *pairs])


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_mnist_reads_idx_files_exactly(tmp_path, compress):
    images, labels = write_mnist(tmp_path, compress=compress)
    ds = MNIST(str(tmp_path), split="test")
    assert len(ds) == 5 and ds.num_classes == 10
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(images[3] / 255.0).float())
    assert y.item() == labels[3] and y.dtype == torch.int64


def test_mnist_finds_torchvision_layout_and_needs_no_train_split(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", split="test")
    assert len(MNIST(str(tmp_path), split="test")) == 5
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        MNIST(str(tmp_path), split="train")


def test_mnist_missing_folder_names_the_paths_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*download=True"):
        MNIST(str(tmp_path / "nowhere"), split="test")


def test_mnist_truncated_file_is_reported_with_sizes(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte is 3836 bytes .* 3936 bytes"):
        MNIST(str(tmp_path), split="test")


def test_mnist_mismatched_pair_and_bad_labels(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4), 2049)
    with pytest.raises(ValueError, match="5 images but .*t10k-labels-idx1-ubyte has 4 labels"):
        MNIST(str(tmp_path), split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 11, 2, 3]), 2049)
    with pytest.raises(ValueError, match="label 11 is not a digit"):
        MNIST(str(tmp_path), split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5), 2051)  # an images header
    with pytest.raises(ValueError, match="labels-idx1-ubyte: idx magic number 2051, expected 2049"):
        MNIST(str(tmp_path), split="test")


def test_usps_reads_libsvm_bz2_exactly(tmp_path):
    write_usps(
        tmp_path / "usps.t.bz2",
        [usps_line(1, -1.0), usps_line(10, 1.0), usps_line(5, 1.0, skip=17)],
    )
    ds = USPS(str(tmp_path), split="test")
    assert ds.labels.tolist() == [0, 9, 4]  # LIBSVM labels 1..10 are digits 0..9
    assert ds.images.shape == (3, 1, 28, 28)
    assert torch.equal(ds.images[0], torch.zeros(1, 28, 28))  # -1 -> 0
    assert torch.allclose(ds.images[1], torch.ones(1, 28, 28))  # +1 -> 1
    # index 17 missing means raw value 0, i.e. pixel 0.5 at row 1, column 0 before resizing
    assert 0.4 < ds.images[2].min().item() < 1.0


@pytest.mark.parametrize(
    "line, message",
    [
        (usps_line(0, 0.0), "line 1: label 0 is outside 1..10"),
        (usps_line(11, 0.0), "line 1: label 11 is outside 1..10"),
        ("3 300:0.5", "line 1: feature index 300 is outside 1..256"),
        ("3 1:2.5", "line 1: pixel value 2.5 is outside"),
        ("3 1:abc", "line 1: cannot parse 'abc'"),
    ],
)
def test_usps_bad_values_name_file_line_and_value(tmp_path, line, message):
    write_usps(tmp_path / "usps.t.bz2", [line])
    with pytest.raises(ValueError, match=rf"usps\.t\.bz2, {message}"):
        USPS(str(tmp_path), split="test")


def test_usps_corrupt_or_missing_file(tmp_path):
    (tmp_path / "usps.t.bz2").write_bytes(b"this is not bzip2 data")
    with pytest.raises(ValueError, match=r"usps\.t\.bz2 is not a readable bz2 file"):
        USPS(str(tmp_path), split="test")
    with pytest.raises(FileNotFoundError, match=r"usps\.bz2 not found"):
        USPS(str(tmp_path), split="train")


def test_syndigits_is_deterministic_per_seed_and_covers_all_digits():
    a, b, c = SynDigits(200, seed=0), SynDigits(200, seed=0), SynDigits(200, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (200, 1, 28, 28)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert torch.bincount(a.labels).tolist() == [20] * 10


def test_ucidigits_are_centred_like_mnist():
    ds = UCIDigits()
    assert len(ds) == 1797 and ds.images.shape[1:] == (1, 28, 28)
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    border = torch.cat([ds.images[..., :4, :].flatten(), ds.images[..., -4:, :].flatten()])
    assert border.abs().max() == 0
    assert set(ds.labels.tolist()) == set(range(10))


def test_real_mnist_and_usps_test_files():
    if not SHARED_DIGITS.is_dir():
        pytest.skip(f"real digits not available: {SHARED_DIGITS} does not exist")
    mnist = MNIST(str(SHARED_DIGITS), split="test")
    usps = USPS(str(SHARED_DIGITS), split="test")
    assert len(mnist) == 10000 and len(usps) == 2007
    assert torch.bincount(mnist.labels, minlength=10).min() > 800
    assert torch.bincount(usps.labels, minlength=10).min() > 100
    assert 0.1 < mnist.images.mean() < 0.2  # MNIST's known mean is 0.1325
