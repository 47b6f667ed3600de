"""Digit datasets: readers for the real on-disk formats (MNIST idx, USPS LIBSVM) and two offline
domains built from installed packages (SynDigits: matplotlib's fonts, UCIDigits: scikit-learn).
Each yields 1x28x28 float images in [0, 1], with no other transform; none downloads unless asked.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import math
import os
import re
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch import Tensor
from torch.utils.data import Dataset

from dam_lightning.data.attributes import InfoAttributes
from dam_lightning.data.labels import DIGITS_INFO
from dam_lightning.errors import DataError, MissingFileError, SetupError

__all__ = ["MNIST", "USPS", "DigitDataset", "SynDigits", "UCIDigits"]

Split = Literal["train", "test"]


class DigitDataset(InfoAttributes, Dataset):
    """In-memory digits: ``images`` (N, 1, 28, 28) float32 in [0, 1], ``labels`` (N,) int64 0..9.

    Subclasses only build the two tensors; indexing, sizes and naming live here.
    """

    info = DIGITS_INFO

    def __init__(self, images: Tensor, labels: Tensor, split: str):
        if images.shape[1:] != (1, 28, 28) or len(images) != len(labels):
            raise DataError(
                f"{type(self).__name__}: images {tuple(images.shape)} and labels "
                f"{tuple(labels.shape)} must be (N, 1, 28, 28) and (N,)"
            )
        self.images, self.labels, self.split = images, labels, split

    @property
    def name(self) -> str:
        """Dataset and split, e.g. ``"MNIST-test"``: short enough for logs and figure titles."""
        return f"{type(self).__name__}-{self.split}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, size={len(self)})"


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")


# ---- MNIST ---------------------------------------------------------------------------------------

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # 0x00000803 / 0x00000801: uint8 data, 3 / 1 dimensions


class MNIST(DigitDataset):
    """MNIST from its idx files, one split at a time; each file may be gzipped (``.gz``).

    Format: a big-endian header (magic 2051 for images with dims n, 28, 28; 2049 for labels with
    n) followed by n*28*28 (or n) uint8 values. Pixels are scaled to [0, 1] by /255. The files
    are looked for in ``root``, ``root/MNIST/raw`` (torchvision's layout) and ``root/raw``.
    Unlike torchvision's class, a folder holding only the test split is enough for ``"test"``.

    Example:
        >>> ds = MNIST("../shared/data/digits", split="test")  # doctest: +SKIP
        >>> len(ds), ds[0][0].shape, ds.name  # doctest: +SKIP
        (10000, torch.Size([1, 28, 28]), 'MNIST-test')
    """

    def __init__(self, root: str, split: Split = "train", download: bool = False):
        _check_split(split)
        folders = [Path(root), Path(root) / "MNIST" / "raw", Path(root) / "raw"]
        found = _find_mnist(folders, split)
        failure = None
        if found is None and download:
            failure = _download_mnist(folders[1], split)
            found = _find_mnist(folders, split)
        if found is None:
            files = " and ".join(f"{name}[.gz]" for name in _MNIST_FILES[split])
            raise MissingFileError(
                _missing_digits("MNIST", split, folders, files, folders[1], failure)
            )
        image_file, label_file = found
        images = _read_idx(image_file, _IDX_IMAGES)
        labels = _read_idx(label_file, _IDX_LABELS)
        _check_mnist(images, labels, image_file, label_file)
        super().__init__(
            torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
            split,
        )


def _find_mnist(folders: list[Path], split: str) -> tuple[Path, Path] | None:
    """The first folder's (images, labels) pair; both files must sit in the same folder."""
    for folder in folders:
        images, labels = (_plain_or_gz(folder / name) for name in _MNIST_FILES[split])
        if images is not None and labels is not None:
            return images, labels
    return None


def _plain_or_gz(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; an unreadable file (permissions, an I/O error) is a DataError."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(
            f"{path} cannot be read ({err.strerror or err}); check its permissions, or copy it "
            "again"
        ) from err


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file of uint8 data (gzipped when its name ends in ``.gz``), rejecting a
    damaged gzip stream (its CRC32 catches any flipped byte), an empty file, a wrong magic
    number and a length that does not fit the header. A plain idx file has no checksum: a
    flipped pixel byte cannot be told from a real pixel (a flipped label byte above 9 can)."""
    data = _read_bytes(path)
    if not data:
        raise DataError(f"{path} is empty (0 bytes); re-download the file")
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:  # not gzip, cut short, or corrupt
            raise DataError(
                f"{path} cannot be decompressed ({type(err).__name__}: {err}): the gzip file is "
                "corrupt or truncated; re-download the file"
            ) from err
    elif data[:2] == _GZIP_MAGIC:
        raise DataError(
            f"{path} is gzip-compressed but its name does not end in .gz; rename it to "
            f"{path.name}.gz (or gunzip it)"
        )
    ndim = 3 if magic == _IDX_IMAGES else 1
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(
            f"{path} is {len(data)} bytes, shorter than the {header}-byte idx header; "
            "re-download the file"
        )
    found_magic, *dims = np.frombuffer(data, dtype=">u4", count=1 + ndim).tolist()
    if found_magic != magic:
        kind = "images (2051)" if magic == _IDX_IMAGES else "labels (2049)"
        raise DataError(
            f"{path}: idx magic number {found_magic}, expected {magic} for {kind}; "
            "check the file name, or re-download the file"
        )
    expected = header + math.prod(dims)  # Python ints: no overflow from a damaged header
    if len(data) != expected:
        unpacked = " (decompressed)" if path.suffix == ".gz" else ""
        raise DataError(
            f"{path} is {len(data)} bytes{unpacked} but its header {dims} needs {expected} "
            "bytes: the file is truncated or has trailing data; re-download the file"
        )
    if dims[0] == 0:
        raise DataError(f"{path}: its header says it holds 0 items; re-download the file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _check_mnist(images: np.ndarray, labels: np.ndarray, image_file: Path, label_file: Path):
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{image_file}: images are {images.shape[1]}x{images.shape[2]}, MNIST's are 28x28; "
            "is it an MNIST file? Re-download the file"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels: "
            "the two files are from different downloads; re-download both"
        )
    bad = np.flatnonzero(labels > 9)  # uint8, so never below 0
    if len(bad):
        raise DataError(
            f"{label_file}: label {labels[bad[0]]} at index {bad[0]} is not a digit 0..9; "
            "re-download the file"
        )


def _missing_digits(name, split, folders, files, place, failure) -> str:
    """What to do when a digits split is not on disk: how to get it, and the reduced protocol
    for those who have only the test files."""
    root = Path(folders[0])
    inside = [os.path.relpath(f, root) for f in folders[1:]]  # root's subfolders, short
    looked = f"{root}" + (f" or its {', '.join(inside)}" if inside else "")
    place = f"into its {os.path.relpath(place, root)}" if Path(place) != root else "there"
    failure = failure if not failure or len(failure) <= 90 else failure[:87] + "..."
    why = f"the download failed: {failure}" if failure else "download is off"
    plural = " and " in files
    return (
        f"{name} {split} {'files' if plural else 'file'} {files} {'are' if plural else 'is'} "
        f"not in {looked} ({why}). Set `download: true` (internet), copy "
        f"{'them' if plural else 'it'} {place}, or set data.<source|target>.init_args.root"
        # the reduced protocol reads only test files: no help when a test file is missing
        + ("" if split == "test" else "; with test files only: --config "
           "configs/digits_reduced.yaml")
    )  # fmt: skip


def _download_mnist(folder: Path, split: str) -> str | None:
    """Fetch one split's two files from torchvision's mirrors, checking torchvision's md5s;
    returns why it failed (None on success)."""
    from torchvision.datasets import MNIST as TorchvisionMNIST
    from torchvision.datasets.utils import download_and_extract_archive

    prefix = "train" if split == "train" else "t10k"
    existed = _existing(folder)
    for filename, md5 in TorchvisionMNIST.resources:
        if not filename.startswith(prefix):
            continue
        errors = []
        for mirror in TorchvisionMNIST.mirrors:
            try:
                download_and_extract_archive(mirror + filename, str(folder), md5=md5)
                break
            except Exception as err:  # any mirror failure: try the next, report all at the end
                errors.append(f"{mirror}{filename}: {_short(err)}")
        else:
            _remove_created(folder, existed)
            return "; ".join(errors)
    return None


def _short(err: BaseException) -> str:
    """An exception's message without urllib's wrapping, e.g. "Name or service not known"."""
    reason = getattr(err, "reason", err)
    return str(getattr(reason, "strerror", None) or reason)


def _existing(folder: Path) -> set[Path]:
    """``folder`` and those of its parents that exist now."""
    return {p for p in (folder, *folder.parents) if p.exists()}


def _remove_created(folder: Path, existed: set[Path]) -> None:
    """Undo the empty folders a failed download created (e.g. data/digits/MNIST/raw)."""
    for path in (folder, *folder.parents):
        if path in existed:
            return
        try:
            path.rmdir()
        except OSError:  # not empty
            return


# ---- USPS ----------------------------------------------------------------------------------------

_USPS_FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}
_USPS_PIXELS = 256
_USPS_TOLERANCE = 1e-6  # the LIBSVM files print values like -1.000000 and 1.000001


class USPS(DigitDataset):
    """USPS from its bz2-compressed LIBSVM files: ``usps.bz2`` (train) and ``usps.t.bz2`` (test).

    Format: one image per line, ``label idx:value ...``; labels 1..10 stand for digits 0..9,
    indices 1..256 address a 16x16 row-major image, values lie in [-1, 1] and a missing index
    means 0 (LIBSVM's sparse convention). Pixels are mapped ``(x+1)/2`` into [0, 1] and resized
    bilinearly to 28x28. The file is looked for in ``root`` and ``root/USPS``.

    Example:
        >>> ds = USPS("../shared/data/digits", split="test")  # doctest: +SKIP
        >>> len(ds), ds[0][0].shape, ds.name  # doctest: +SKIP
        (2007, torch.Size([1, 28, 28]), 'USPS-test')
    """

    def __init__(self, root: str, split: Split = "train", download: bool = False):
        _check_split(split)
        name = _USPS_FILES[split]
        candidates = [Path(root) / name, Path(root) / "USPS" / name]
        path = next((p for p in candidates if p.is_file()), None)
        failure = None
        if path is None and download:
            failure = _download_usps(Path(root), split)
            path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            folders = [c.parent for c in candidates]
            raise MissingFileError(_missing_digits("USPS", split, folders, name, root, failure))
        pixels, labels = _read_libsvm(path)
        images = torch.from_numpy((pixels + 1.0) / 2.0).view(-1, 1, 16, 16)
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
        super().__init__(images.clamp(0.0, 1.0), torch.from_numpy(labels - 1), split)


def _read_libsvm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a USPS LIBSVM file into pixels (N, 256) float32 in [-1, 1] and labels (N,) 1..10."""
    data = _read_bytes(path)
    if not data:
        raise DataError(f"{path} is empty (0 bytes); re-download it")
    try:
        text = bz2.decompress(data).decode("ascii")
    except (OSError, EOFError, ValueError) as err:  # not bz2, corrupt, cut short, or not text
        what = (
            "it is corrupt or truncated"
            if data[:3] == b"BZh"
            else "it does not start with bzip2's signature 'BZh', so it is not a bz2 file (a "
            "decompressed copy must be compressed again: bzip2 <file>)"
        )
        raise DataError(
            f"{path} is not a readable bz2 text file ({type(err).__name__}: {err}): {what}; "
            "re-download it"
        ) from err
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path} holds no samples; re-download it")
    if not text.endswith("\n"):  # the released files end every line, the last one too
        raise DataError(
            f"{path}: its last line (line {lines[-1][0]}) has no line end, so the text was cut "
            "short inside an image (its missing pixels would read as 0); re-download it"
        )
    pixels = np.zeros((len(lines), _USPS_PIXELS), dtype=np.float32)
    labels = np.zeros(len(lines), dtype=np.int64)
    for row, (number, line) in enumerate(lines):
        labels[row], indices, values = _parse_libsvm_line(line, f"{path}, line {number}")
        pixels[row, indices - 1] = values
    return pixels, labels


def _parse_libsvm_line(line: str, where: str) -> tuple[int, np.ndarray, np.ndarray]:
    """One ``label idx:value ...`` line, validated; ``where`` (file, line) prefixes errors."""
    label_token, *pairs = line.split()
    fix = "the file is corrupt; re-download it"
    label = _parse_int(label_token, where, fix)
    if not 1 <= label <= 10:
        raise DataError(f"{where}: label {label} is outside 1..10 (digits 0..9); {fix}")
    split_pairs = [pair.split(":") for pair in pairs]
    if any(len(p) != 2 for p in split_pairs):
        bad = next(pair for pair, p in zip(pairs, split_pairs, strict=True) if len(p) != 2)
        raise DataError(f"{where}: {bad!r} is not an index:value pair; {fix}")
    index_tokens = [p[0] for p in split_pairs]
    value_tokens = [p[1] for p in split_pairs]
    # numpy converts a whole list of strings at once; only a line it rejects is converted token
    # by token, so that the error can name the bad token.
    try:
        indices = np.array(index_tokens, dtype=np.int64)
        values = np.array(value_tokens, dtype=np.float64)
    except ValueError:
        indices = np.array([_parse_int(t, where, fix) for t in index_tokens], dtype=np.int64)
        values = np.array([_parse_float(t, where, fix) for t in value_tokens], dtype=np.float64)
    bad = np.flatnonzero((indices < 1) | (indices > _USPS_PIXELS))
    if len(bad):
        raise DataError(
            f"{where}: pixel index {indices[bad[0]]} is outside 1..{_USPS_PIXELS}; {fix}"
        )
    limit = 1.0 + _USPS_TOLERANCE
    bad = np.flatnonzero(~((values >= -limit) & (values <= limit)))  # NaN fails both
    if len(bad):
        raise DataError(f"{where}: pixel value {value_tokens[bad[0]]} is outside [-1, 1]; {fix}")
    return label, indices, values


def _parse_int(token: str, where: str, fix: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataError(f"{where}: cannot parse {token!r} as an integer; {fix}") from None


def _parse_float(token: str, where: str, fix: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise DataError(f"{where}: cannot parse {token!r} as a number; {fix}") from None


def _download_usps(root: Path, split: str) -> str | None:
    """Fetch one split's file with torchvision's URL and md5, into ``root`` as torchvision does;
    returns why it failed (None on success)."""
    from torchvision.datasets import USPS as TorchvisionUSPS
    from torchvision.datasets.utils import download_url

    url, filename, md5 = TorchvisionUSPS.split_list[split]
    existed = _existing(root)
    try:
        download_url(url, str(root), filename=filename, md5=md5)
    except Exception as err:  # network, HTTP or checksum: all leave the same manual fix
        _remove_created(root, existed)
        return f"{url}: {_short(err)}"
    return None


# ---- SynDigits -----------------------------------------------------------------------------------

_TEXT_FONTS = re.compile(
    r"^(DejaVu(Sans|Serif)(Mono)?(-\w+)?|STIXGeneral\w*|cm(r|ss|tt|b|ti)10)\.ttf$"
)
"""matplotlib's text fonts. Its math fonts (cmex10, cmsy10, cmmi10) put symbols or oldstyle
figures where the digits are, and DejaVu*Display/STIXNonUni/STIXSiz* have no digits at all."""


class SynDigits(DigitDataset):
    """Synthetic digits rendered from the TrueType text fonts bundled with matplotlib.

    Format: none on disk; each image is drawn white on black on a 64x64 canvas with a random
    font, a digit height of 60-80% of the canvas, a rotation within ±15°, a stroke width of
    0-2 px and, for half the images, a slight Gaussian blur; it is then cropped to its ink,
    scaled (antialiased) to fit a 20x20 box and placed in 28x28 like MNIST, centred up to a
    random ±2 px shift. Labels are balanced over the ten digits. The same
    ``(num_samples, seed)`` gives bitwise-identical tensors. The labelled source domain of the
    offline demo.

    Example:
        >>> ds = SynDigits(num_samples=20, seed=0)
        >>> ds[0][0].shape, ds.num_classes, sorted(set(ds.labels.tolist())) == list(range(10))
        (torch.Size([1, 28, 28]), 10, True)
    """

    canvas = 64

    def __init__(self, num_samples: int = 10000, seed: int = 0):
        if num_samples < 1:
            raise DataError(f"num_samples must be at least 1, got {num_samples}")
        fonts = _digit_fonts()
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.arange(num_samples) % 10)
        images = np.stack([self._render(int(digit), fonts, rng) for digit in labels])
        super().__init__(
            torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), "all"
        )

    def _render(
        self, digit: int, fonts: tuple[tuple[str, float], ...], rng: np.random.Generator
    ) -> np.ndarray:
        # Each image makes the same draws whatever its branches (a blur's sigma is drawn even
        # when it does not blur), so tuning one option does not reshuffle every later image.
        font_index = int(rng.integers(len(fonts)))
        height = rng.uniform(0.6, 0.8) * self.canvas
        angle, stroke = float(rng.uniform(-15.0, 15.0)), int(rng.integers(0, 3))
        blur, sigma = bool(rng.random() < 0.5), float(rng.uniform(0.4, 1.2))
        shift = rng.integers(-2, 3, size=2)

        path, height_per_size = fonts[font_index]
        font = _font(path, round(height / height_per_size))
        left, top, right, bottom = font.getbbox(str(digit), stroke_width=stroke)
        origin = ((self.canvas - left - right) / 2, (self.canvas - top - bottom) / 2)
        image = Image.new("L", (self.canvas, self.canvas), 0)
        ImageDraw.Draw(image).text(
            origin, str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255
        )
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        ink = image.getbbox()  # before the blur, whose faint halo would inflate the box
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(sigma))
        return _fit_in_28(image, ink, shift)


def _fit_in_28(image: Image.Image, ink: tuple[int, int, int, int], shift: np.ndarray) -> np.ndarray:
    """Scale the ink box of ``image`` so its longer side is 20 px; paste it centred + shift."""
    width, height = ink[2] - ink[0], ink[3] - ink[1]
    scale = 20.0 / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    small = image.resize((w, h), Image.Resampling.LANCZOS, box=ink)
    top = min(max((28 - h) // 2 + int(shift[0]), 0), 28 - h)
    left = min(max((28 - w) // 2 + int(shift[1]), 0), 28 - w)
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + h, left : left + w] = np.asarray(small, dtype=np.float32) / 255.0
    return out


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """Loading a font parses the file; cached because 10k images reuse ~20 fonts x ~30 sizes."""
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=1)
def _digit_fonts() -> tuple[tuple[str, float], ...]:
    """(path, digit height per point of size) of each bundled text font that draws all digits.

    A font qualifies when its ten digits render non-empty, mutually different and different
    from the font's "missing glyph" box. The height ratio lets SynDigits pick a size that
    gives the digit height it wants, whatever the font's metrics.
    """
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    usable = []
    for path in sorted(folder.glob("*.ttf")):
        if not _TEXT_FONTS.match(path.name):
            continue
        try:
            font = _font(str(path), 48)
        except OSError:  # unreadable or not a TrueType file
            continue
        missing = _glyph_pixels(font, "\ue000")  # a private-use code point: no font has it
        glyphs = [_glyph_pixels(font, digit) for digit in "0123456789"]
        if all(g.any() for g in glyphs) and len({g.tobytes() for g in glyphs + [missing]}) == 11:
            heights = [font.getbbox(digit)[3] - font.getbbox(digit)[1] for digit in "0123456789"]
            usable.append((str(path), float(np.median(heights)) / 48))
    if not usable:
        raise SetupError(
            f"no font in {folder} draws the digits 0-9, so SynDigits cannot render; reinstall "
            "matplotlib (its fonts/ttf folder ships DejaVu Sans)"
        )
    return tuple(usable)


def _glyph_pixels(font: ImageFont.FreeTypeFont, text: str) -> np.ndarray:
    image = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(image).text((16, 8), text, fill=255, font=font)
    return np.asarray(image)


# ---- UCIDigits -----------------------------------------------------------------------------------


class UCIDigits(DigitDataset):
    """The 1,797 handwritten 8x8 digits bundled with scikit-learn (UCI optical digits), offline.

    Format: ``sklearn.datasets.load_digits`` gives 8x8 images with values 0..16 and digit
    labels. They are scaled /16, resized bilinearly to 20x20 and padded by 4 px to 28x28,
    like MNIST's 20x20 box. The unlabelled target domain of the offline demo.

    Example:
        >>> ds = UCIDigits()
        >>> len(ds), ds[0][0].shape, ds.name
        (1797, torch.Size([1, 28, 28]), 'UCIDigits-all')
    """

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
        images = F.pad(images, (4, 4, 4, 4)).clamp(0.0, 1.0)
        super().__init__(images, torch.from_numpy(digits.target.astype(np.int64)), "all")
