"""Digit datasets: readers for the real on-disk formats (MNIST idx, USPS LIBSVM) and two domains
that ship with the installed packages (SynDigits from matplotlib's fonts, UCIDigits from
scikit-learn). All give 1x28x28 float images in [0, 1]; nothing here downloads unless asked.
"""

from __future__ import annotations

import bz2
import gzip
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from dam_lightning.data.labels import DIGIT_CLASSES

__all__ = ["MNIST", "USPS", "DigitDataset", "SynDigits", "UCIDigits"]

Split = Literal["train", "test"]


class DigitDataset(Dataset):
    """In-memory digits: ``images`` (N, 1, 28, 28) float32 in [0, 1], ``labels`` (N,) int64."""

    classes = DIGIT_CLASSES

    def __init__(self, images: Tensor, labels: Tensor, description: str):
        if len(images) != len(labels):
            raise ValueError(f"{description}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.description = images, labels, description

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self)} images)"


# ---- MNIST ---------------------------------------------------------------------------------------

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049


class MNIST(DigitDataset):
    """MNIST from its idx files (``.gz`` or not), one split at a time.

    Looks in ``root``, ``root/MNIST/raw`` and ``root/raw``. Unlike torchvision's class it reads
    a folder that holds only the test split.

    Example:
        >>> ds = MNIST("../shared/data/digits", split="test")  # doctest: +SKIP
        >>> len(ds), ds[0][0].shape  # doctest: +SKIP
        (10000, torch.Size([1, 28, 28]))
    """

    def __init__(self, root: str, split: Split = "test", download: bool = False):
        _check_split(split)
        folders = [Path(root), Path(root) / "MNIST" / "raw", Path(root) / "raw"]
        found = _find_mnist(folders, split)
        if found is None and download:
            _download_mnist(Path(root) / "MNIST" / "raw")
            found = _find_mnist(folders, split)
        if found is None:
            names = " and ".join(f"{n}[.gz]" for n in _MNIST_FILES[split])
            raise FileNotFoundError(
                f"MNIST {split} files ({names}) not found in any of: "
                f"{', '.join(str(f) for f in folders)}. Pass root= the folder that holds them, "
                "or download=True on a machine with internet"
            )
        image_file, label_file = found
        images = _read_idx(image_file, _IDX_IMAGES)
        labels = _read_idx(label_file, _IDX_LABELS)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{image_file}: images are {images.shape[1:]}, MNIST's are 28x28")
        if len(images) != len(labels):
            raise ValueError(
                f"{image_file} has {len(images)} images but {label_file} has {len(labels)} "
                "labels: the pair is mismatched, re-download both files"
            )
        if len(labels) and labels.max() > 9:
            raise ValueError(f"{label_file}: label {labels.max()} is not a digit 0..9")
        super().__init__(
            torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
            f"split={split}, root={root}",
        )


def _find_mnist(folders: list[Path], split: str) -> tuple[Path, Path] | None:
    for folder in folders:
        paths = [_with_optional_gz(folder / name) for name in _MNIST_FILES[split]]
        if all(p is not None for p in paths):
            return paths[0], paths[1]
    return None


def _with_optional_gz(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file (big-endian header: magic, dims; then uint8 data), checking its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is corrupt ({err}); re-download the file") from err
    ndim = 3 if magic == _IDX_IMAGES else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is {len(data)} bytes, too short for an idx header")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise ValueError(
            f"{path}: idx magic number {found_magic}, expected {magic} "
            f"({'images' if magic == _IDX_IMAGES else 'labels'}); is it the right file?"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path} is {len(data)} bytes but its header announces {dims} -> {expected} bytes: "
            "the file is truncated or corrupt; re-download the file"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _download_mnist(folder: Path) -> None:
    from torchvision.datasets import MNIST as TorchvisionMNIST
    from torchvision.datasets.utils import download_and_extract_archive

    for filename, md5 in TorchvisionMNIST.resources:
        errors = []
        for mirror in TorchvisionMNIST.mirrors:
            try:
                download_and_extract_archive(mirror + filename, str(folder), md5=md5)
                break
            except Exception as err:  # noqa: BLE001 - try the next mirror, report all at the end
                errors.append(f"{mirror}: {err}")
        else:
            raise RuntimeError(
                f"downloading MNIST {filename} failed ({'; '.join(errors)}). Place the idx files "
                f"in {folder} by hand and pass download=False"
            )


# ---- USPS ----------------------------------------------------------------------------------------

_USPS_FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}


class USPS(DigitDataset):
    """USPS from its bz2-compressed LIBSVM files (``usps.bz2``, ``usps.t.bz2``).

    Lines are ``label idx:value ...`` with labels 1..10 for digits 0..9 and values in [-1, 1]
    (a missing index means 0, as in LIBSVM). Pixels are mapped ``(x+1)/2`` and the 16x16 images
    resized bilinearly to 28x28, as in the paper's code. Looks in ``root`` and ``root/USPS``.

    Example:
        >>> ds = USPS("../shared/data/digits", split="test")  # doctest: +SKIP
        >>> len(ds)  # doctest: +SKIP
        2007
    """

    def __init__(self, root: str, split: Split = "test", download: bool = False):
        _check_split(split)
        name = _USPS_FILES[split]
        candidates = [Path(root) / name, Path(root) / "USPS" / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None and download:
            _download_usps(Path(root), split)
            path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"USPS {split} file {name} not found in "
                f"{', '.join(str(c.parent) for c in candidates)}. Pass root= the folder that "
                "holds it, or download=True on a machine with internet"
            )
        pixels, labels = _read_libsvm(path, features=256)
        images = torch.from_numpy((pixels + 1.0) / 2.0).view(-1, 1, 16, 16)
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
        super().__init__(
            images.clamp(0.0, 1.0),
            torch.from_numpy(labels - 1),
            f"split={split}, root={root}",
        )


def _read_libsvm(path: Path, features: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse a bz2 LIBSVM file into (pixels float32 (N, features), labels int64 1..10)."""
    try:
        with bz2.open(path, "rt") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a readable bz2 file ({err}); re-download it") from err
    if not lines:
        raise ValueError(f"{path} holds no sample; re-download it")
    pixels = np.zeros((len(lines), features), dtype=np.float32)
    labels = np.zeros(len(lines), dtype=np.int64)
    for row, line in enumerate(lines):
        where = f"{path}, line {row + 1}"
        label, *pairs = line.split()
        labels[row] = _parse_number(label, where, int)
        if not 1 <= labels[row] <= 10:
            raise ValueError(f"{where}: label {label} is outside 1..10 (digits 0..9)")
        for pair in pairs:
            index, _, value = pair.partition(":")
            i, v = _parse_number(index, where, int), _parse_number(value, where, float)
            if not 1 <= i <= features:
                raise ValueError(f"{where}: feature index {i} is outside 1..{features}")
            if not -1.000001 <= v <= 1.000001:
                raise ValueError(f"{where}: pixel value {v} is outside [-1, 1]")
            pixels[row, i - 1] = v
    return pixels, labels


def _parse_number(token: str, where: str, kind):
    try:
        return kind(token)
    except ValueError:
        raise ValueError(
            f"{where}: cannot parse {token!r} as {kind.__name__}; the file is corrupt"
        ) from None


def _download_usps(root: Path, split: str) -> None:
    from torchvision.datasets import USPS as TorchvisionUSPS
    from torchvision.datasets.utils import download_url

    url, filename, md5 = TorchvisionUSPS.split_list[split]
    try:
        download_url(url, str(root), filename=filename, md5=md5)
    except Exception as err:
        raise RuntimeError(
            f"downloading USPS {filename} failed ({err}). Place it in {root} by hand and pass "
            "download=False"
        ) from err


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# ---- offline domains -----------------------------------------------------------------------------


class SynDigits(DigitDataset):
    """Synthetic digits rendered from the TrueType fonts bundled with matplotlib.

    Each image: a random font, size, rotation (±15°), stroke width and position, rendered
    white on black, then fitted into a 20x20 box centred in 28x28 like MNIST. Deterministic
    for a given ``(num_samples, seed)``. The labelled source domain of the offline demo.

    Example:
        >>> ds = SynDigits(num_samples=20, seed=0)
        >>> ds[0][0].shape, ds.num_classes
        (torch.Size([1, 28, 28]), 10)
    """

    canvas = 64

    def __init__(self, num_samples: int = 10000, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        rng = np.random.default_rng(seed)
        fonts = _digit_fonts()
        labels = rng.permutation(np.arange(num_samples) % 10)
        images = np.stack([self._render(int(d), fonts, rng) for d in labels])
        super().__init__(
            torch.from_numpy(images).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
            f"num_samples={num_samples}, seed={seed}",
        )

    def _render(self, digit: int, fonts: list[str], rng: np.random.Generator) -> np.ndarray:
        from PIL import Image, ImageDraw, ImageFilter, ImageFont

        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(30, 48)))
        image = Image.new("L", (self.canvas, self.canvas), 0)
        stroke = int(rng.integers(0, 3))
        ImageDraw.Draw(image).text(
            (self.canvas / 2, self.canvas / 2),
            str(digit),
            fill=255,
            font=font,
            anchor="mm",
            stroke_width=stroke,
            stroke_fill=255,
        )
        image = image.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
        return _centre_in_28(np.asarray(image, dtype=np.float32) / 255.0, rng)


def _centre_in_28(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Crop to the ink, scale the longer side to 20 px, paste centred (±1 px) in 28x28."""
    from PIL import Image

    rows, cols = np.nonzero(glyph > 0.05)
    if len(rows) == 0:
        raise ValueError("a font rendered an empty digit")
    crop = glyph[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = 20.0 / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = np.asarray(
        Image.fromarray((crop * 255).astype(np.uint8)).resize((w, h), Image.LANCZOS),
        dtype=np.float32,
    )
    out = np.zeros((28, 28), dtype=np.float32)
    top = (28 - h) // 2 + int(rng.integers(-1, 2))
    left = (28 - w) // 2 + int(rng.integers(-1, 2))
    top, left = min(max(top, 0), 28 - h), min(max(left, 0), 28 - w)
    out[top : top + h, left : left + w] = small / 255.0
    return np.clip(out, 0.0, 1.0)


_TEXT_FONTS = re.compile(
    r"^(DejaVu(Sans|Serif)(Mono)?(-\w+)?|STIXGeneral\w*|cm(r|ss|tt|b|ti)10)\.ttf$"
)
"""matplotlib's text fonts; its math-symbol fonts (cmex10, cmsy10, ...) map digits to symbols."""


def _digit_fonts() -> list[str]:
    """Paths of matplotlib's bundled text fonts that render all ten digits visibly."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    usable = []
    for path in sorted(folder.glob("*.ttf")):
        if not _TEXT_FONTS.match(path.name):
            continue
        try:
            font = ImageFont.truetype(str(path), 32)
        except OSError:
            continue
        inks = []
        for digit in "0123456789":
            image = Image.new("L", (48, 48), 0)
            ImageDraw.Draw(image).text((24, 24), digit, fill=255, font=font, anchor="mm")
            inks.append(np.asarray(image).astype(np.float32).sum())
        if min(inks) > 0 and len(set(inks)) > 5:  # symbol fonts draw boxes or nothing
            usable.append(str(path))
    if not usable:
        raise RuntimeError(f"no font in {folder} renders digits; reinstall matplotlib")
    return usable


class UCIDigits(DigitDataset):
    """The 1,797 handwritten 8x8 digits bundled with scikit-learn (UCI optical digits).

    Values 0..16 are scaled to [0, 1], the 8x8 images resized bilinearly to 20x20 and centred
    in 28x28 (a 4-pixel border), like MNIST. The unlabelled target domain of the offline demo.

    Example:
        >>> ds = UCIDigits()
        >>> len(ds), ds[0][0].shape
        (1797, torch.Size([1, 28, 28]))
    """

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
        images = F.pad(images, (4, 4, 4, 4)).clamp(0.0, 1.0)
        super().__init__(images, torch.from_numpy(digits.target.astype(np.int64)), "all")


