"""Digit readers on fixture files written here in the real formats (idx, gzipped idx, bz2 LIBSVM),
the two offline domains, and the real MNIST/USPS test files when ../shared holds them."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dam_lightning.data.digits import MNIST, USPS, DigitDataset, SynDigits, UCIDigits

# CI clones the repository next to shared/, so the real files sit at <clone>/../shared/...
REAL_DIGITS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "digits"


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = False) -> Path:
    """An idx file: big-endian magic and dimensions, then the uint8 data (gzipped if asked)."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path, data = path.with_name(path.name + ".gz"), gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(folder: Path, split: str = "test", n: int = 5, compress: bool = False):
    """n images whose pixels count 0, 1, 2, ... (mod 256) and labels 0..n-1; returns both."""
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
    """A LIBSVM line giving every pixel ``value``, except index ``skip`` which is left out."""
    return " ".join([str(label), *(f"{i}:{value}" for i in range(1, 257) if i != skip)])


# ---- MNIST ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_mnist_reads_idx_files_exactly(tmp_path, compress):
    images, labels = write_mnist(tmp_path, compress=compress)
    ds = MNIST(str(tmp_path), split="test")
    assert isinstance(ds, DigitDataset) and len(ds) == 5 and ds.num_classes == 10
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.float32
    x, y = ds[3]
    assert x.shape == (1, 28, 28)
    assert torch.equal(x[0], torch.from_numpy(images[3].astype(np.float32) / 255.0))
    assert y.dtype == torch.int64 and y.ndim == 0 and y.item() == labels[3]
    assert ds.name == "MNIST-test" and repr(ds) == "MNIST(split='test', size=5)"


@pytest.mark.parametrize("layout", [("MNIST", "raw"), ("raw",)], ids=["MNIST/raw", "raw"])
def test_mnist_finds_torchvision_layouts_and_needs_no_train_split(tmp_path, layout):
    write_mnist(tmp_path.joinpath(*layout), split="test")
    assert len(MNIST(str(tmp_path), split="test")) == 5
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        MNIST(str(tmp_path), split="train")


def test_mnist_missing_folder_names_every_path_and_the_fix(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        MNIST(str(root), split="test")
    message = str(error.value)
    assert f"are not in {root} or its MNIST/raw, raw (download is off)" in message
    assert "t10k-images-idx3-ubyte[.gz]" in message and "`download: true`" in message


def test_mnist_without_download_never_touches_the_network(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although download=False")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    with pytest.raises(FileNotFoundError):
        MNIST(str(tmp_path), split="test")
    with pytest.raises(FileNotFoundError):
        USPS(str(tmp_path), split="test")


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_mnist_truncated_file_names_both_sizes_and_the_fix(tmp_path, compress):
    write_mnist(tmp_path)
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()[:-100]  # 16 + 5*784 = 3936 bytes
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    name = "t10k-images-idx3-ubyte" + (".gz" if compress else "")
    (tmp_path / name).write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(ValueError, match=rf"{name} is 3836 bytes.* 3936 bytes.*re-download"):
        MNIST(str(tmp_path), split="test")


def test_mnist_label_count_mismatch_names_both_files_and_counts(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4), 2049)
    with pytest.raises(
        ValueError, match=r"t10k-images-idx3-ubyte has 5 images but .*t10k-labels-idx1-ubyte has 4"
    ):
        MNIST(str(tmp_path), split="test")


def test_mnist_bad_label_wrong_magic_and_wrong_size(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 11, 2, 3]), 2049)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: label 11 .* not a digit 0\.\.9"):
        MNIST(str(tmp_path), split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5), 2051)
    with pytest.raises(
        ValueError, match=r"labels-idx1-ubyte: idx magic number 2051, expected 2049"
    ):
        MNIST(str(tmp_path), split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5), 2049)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 16, 16)), 2051)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: images are 16x16"):
        MNIST(str(tmp_path), split="test")


def test_mnist_corrupt_gzip_names_the_file(tmp_path):
    write_mnist(tmp_path, compress=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz cannot be decompressed"):
        MNIST(str(tmp_path), split="test")


# ---- USPS ----------------------------------------------------------------------------------------


def test_usps_reads_libsvm_bz2_exactly(tmp_path):
    write_usps(
        tmp_path / "USPS" / "usps.t.bz2",
        [usps_line(1, -1.0), usps_line(10, 1.0), usps_line(5, -1.0, skip=17)],
    )
    ds = USPS(str(tmp_path), split="test")
    assert ds.labels.tolist() == [0, 9, 4] and ds.labels.dtype == torch.int64
    assert ds.images.shape == (3, 1, 28, 28) and ds.images.dtype == torch.float32
    assert torch.equal(ds.images[0], torch.zeros(1, 28, 28))  # -1 -> 0
    assert torch.allclose(ds.images[1], torch.ones(1, 28, 28))  # +1 -> 1
    # Index 17 (row 1, column 0) is missing: raw 0, i.e. 0.5 after (x+1)/2, all else 0.
    expected = torch.zeros(1, 1, 16, 16)
    expected[0, 0, 1, 0] = 0.5
    expected = F.interpolate(expected, size=(28, 28), mode="bilinear", align_corners=False)
    assert torch.allclose(ds.images[2], expected[0])
    assert ds.images[2].max() > 0 and ds.name == "USPS-test"


@pytest.mark.parametrize(
    "line, message",
    [
        (usps_line(0, 0.0), r"line 2: label 0 is outside 1\.\.10"),
        (usps_line(11, 0.0), r"line 2: label 11 is outside 1\.\.10"),
        ("3 300:0.5", r"line 2: pixel index 300 is outside 1\.\.256"),
        ("3 1:2.5", r"line 2: pixel value 2\.5 is outside \[-1, 1\]"),
        ("3 1:abc", r"line 2: cannot parse 'abc' as a number"),
        ("x 1:0.5", r"line 2: cannot parse 'x' as an integer"),
        ("3 17", r"line 2: '17' is not an index:value pair"),
    ],
)
def test_usps_bad_line_names_file_line_value_and_fix(tmp_path, line, message):
    write_usps(tmp_path / "usps.t.bz2", [usps_line(1, 0.0), line])
    with pytest.raises(ValueError, match=rf"usps\.t\.bz2, {message}.*re-download"):
        USPS(str(tmp_path), split="test")


def test_usps_corrupt_empty_or_missing_file(tmp_path):
    (tmp_path / "usps.t.bz2").write_bytes(b"this is not bzip2 data")
    with pytest.raises(ValueError, match=r"usps\.t\.bz2 is not a readable bz2"):
        USPS(str(tmp_path), split="test")
    write_usps(tmp_path / "usps.t.bz2", [""])
    with pytest.raises(ValueError, match=r"usps\.t\.bz2 holds no samples"):
        USPS(str(tmp_path), split="test")
    with pytest.raises(FileNotFoundError, match=r"usps\.bz2 is not in .*download: true"):
        USPS(str(tmp_path), split="train")


# ---- offline domains -----------------------------------------------------------------------------


def test_syndigits_is_deterministic_per_seed_and_balanced():
    a, b, c = SynDigits(200, seed=0), SynDigits(200, seed=0), SynDigits(200, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (200, 1, 28, 28) and a.images.dtype == torch.float32
    assert a.labels.dtype == torch.int64
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert torch.bincount(a.labels, minlength=10).tolist() == [20] * 10
    # Every digit has ink and fits MNIST's layout: a 20 px box, shifted at most 2 px.
    assert (a.images.flatten(1).amax(1) > 0.5).all()
    assert a.images[..., :2, :].max() == 0 and a.images[..., -2:, :].max() == 0


def test_ucidigits_are_centred_like_mnist():
    ds = UCIDigits()
    assert len(ds) == 1797 and ds.images.shape[1:] == (1, 28, 28)
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert ds.images[..., :4, :].max() == 0 and ds.images[..., -4:, :].max() == 0
    assert ds.images[..., :4].max() == 0 and ds.images[..., -4:].max() == 0
    assert set(ds.labels.tolist()) == set(range(10))


# ---- real files ----------------------------------------------------------------------------------


def test_real_mnist_and_usps_test_files():
    if not REAL_DIGITS.is_dir():
        pytest.skip(f"real digits not available: {REAL_DIGITS} does not exist")
    mnist = MNIST(str(REAL_DIGITS), split="test")
    usps = USPS(str(REAL_DIGITS), split="test")
    assert len(mnist) == 10000 and len(usps) == 2007
    assert (torch.bincount(mnist.labels, minlength=10) > 0).all()
    assert (torch.bincount(usps.labels, minlength=10) > 0).all()
    assert 0.1 < mnist.images.mean() < 0.2  # MNIST's known pixel mean is 0.1325
