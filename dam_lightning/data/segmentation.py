"""The base of the segmentation datasets: image/label file pairs, decoding, id -> trainId, checks.

Construction only lists (and pairs) files; decoding, the joint transforms and the id mapping (one
``lut[label]`` indexing op) happen in ``__getitem__``, i.e. in DataLoader workers. Family files
(``cityscapes.py``, ``gta5.py``, ``synthia.py``) only say where files are and which table maps
them; no class table is defined here (they all live in ``labels.py``).
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dam_lightning.data.attributes import InfoAttributes
from dam_lightning.data.labels import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_INFO, DatasetInfo
from dam_lightning.data.transforms import LabelSize, SegmentationTransform, resize_mask
from dam_lightning.errors import DataError, MissingFileError, UnreadableFileError, WrongTypeError

__all__ = [
    "DecodeError",
    "PngFile",
    "SegmentationDataset",
    "check_root",
    "damaged_file_error",
    "decode_error",
    "files_by_name",
    "folder_pairs",
    "no_files_error",
    "pair_by_name",
    "read_bytes",
    "read_png",
    "select_names",
]

DecodeError = (OSError, RuntimeError, SyntaxError, ValueError)
"""What PIL (OSError, SyntaxError, ValueError) and torchvision.io (RuntimeError) raise on a
corrupt or truncated file; ``__getitem__`` turns them into one message naming the file."""


class SegmentationDataset(InfoAttributes, Dataset):
    """Image/label pairs decoded on access: ``(image, label)``, or ``image`` when unlabelled.

    ``image`` is float32 (3, H, W), normalised; ``label`` is uint8 (h, w) holding trainIds
    ``0..num_classes-1`` or 255 (ignored): an eighth of int64's bytes through the loader and to
    the device, where ``EvaluatingModule`` widens it. ``transform`` (a
    ``SegmentationTransform``) says how: the network input ``size``, ``label_size``
    (``"input"``: labels resized, nearest, to ``size``; ``"native"``: file resolution),
    ``train_augment`` (joint random scale, crop, flip) and the normalisation. With
    ``labelled=False`` label files are never opened (an unlabelled target set) and may be
    omitted.

    Subclasses set ``info`` (what the labels mean, a ``DatasetInfo``) and the reading constants
    below where they differ, and find the files; ``read_label`` may be overridden for a format
    PIL cannot read (SYNTHIA's 16-bit PNGs).

    Args:
        images: image files.
        labels: label files (``labels[i]`` belongs to ``images[i]``); needed when labelled.
        names: relative names without extension for prediction files; default the file stems.
        split: the split name shown in ``name`` and ``repr`` (None: no split).
        transform: resize, augmentation and normalisation; a ``label_size`` of None becomes
            ``default_label_size(split)``.
        labelled: whether label files are read.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 4)).save(folder / "a.png")
        >>> ids = np.array([[7, 7, 26, 26, 3, 3, 26, 26]] * 4, np.uint8)
        >>> Image.fromarray(ids).save(folder / "a_ids.png")
        >>> transform = SegmentationTransform(size=(2, 4))
        >>> ds = SegmentationDataset(
        ...     [folder / "a.png"], [folder / "a_ids.png"], transform=transform
        ... )
        >>> image, label = ds[0]  # labelIds 7 road, 26 car, 3 void -> trainIds 0, 13, 255
        >>> tuple(image.shape), label.dtype, label.tolist()
        ((3, 2, 4), torch.uint8, [[0, 13, 255, 13], [0, 13, 255, 13]])
        >>> ds, ds.num_classes, ds.item_name(0)
        (SegmentationDataset(size=(2, 4), images=1), 19, 'a')
    """

    info: DatasetInfo = CITYSCAPES_INFO
    """What the labels mean: task, classes, palette, native label ids, class subsets."""
    id_to_train_id: Tensor = CITYSCAPES_ID_TO_TRAIN_ID
    """256-entry table: label file value -> trainId."""
    max_label_id: int = 33
    """Largest value a label file may hold (Cityscapes labelIds run 0..33, bicycle last)."""
    label_hint: str = "expected single-channel PNGs of Cityscapes labelIds 0..33"
    """What the label files should be, appended to a bad-value error."""
    size_mismatch: str = "error"
    """What an image/label size difference does at access: "error" or "resize" (nearest)."""

    def __init__(
        self,
        images: Sequence[str | Path],
        labels: Sequence[str | Path] | None = None,
        names: Sequence[str] | None = None,
        *,
        split: str | None = None,
        transform: SegmentationTransform = SegmentationTransform(),  # noqa: B008 (frozen)
        labelled: bool = True,
    ):
        cls = type(self).__name__
        if not isinstance(transform, SegmentationTransform):
            raise WrongTypeError(
                f"{cls}: transform must be a SegmentationTransform, got {type(transform).__name__}"
            )
        self.images = [Path(p) for p in images]
        self.labels = [Path(p) for p in labels] if labelled and labels is not None else None
        if labelled and self.labels is None:
            raise DataError(f"{cls}: labelled=True needs label files; pass labelled=False")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(
                f"{cls}: {len(self.images)} images but {len(self.labels)} labels were given"
            )
        self.names = list(names) if names is not None else [p.stem for p in self.images]
        if len(self.names) != len(self.images):
            raise DataError(f"{cls}: {len(self.images)} images but {len(self.names)} names")
        self.split, self.labelled = split, labelled
        if transform.label_size is None:
            transform = replace(transform, label_size=self.default_label_size(split))
        self.transform = transform
        """The resolved settings (``label_size`` is never None here) and the callable."""

    def default_label_size(self, split: str | None) -> LabelSize:
        """The ``label_size`` a ``transform`` with ``label_size=None`` gets: ``"input"``."""
        return "input"

    @property
    def size(self) -> tuple[int, int] | None:
        """The network input (H, W) images are resized to (None: file size)."""
        return self.transform.size

    @property
    def train_augment(self) -> bool:
        return self.transform.train_augment

    @property
    def label_size(self) -> LabelSize:
        """``"input"`` (labels resized to ``size``) or ``"native"`` (file resolution)."""
        return self.transform.label_size

    @property
    def name(self) -> str:
        """Dataset and split, e.g. ``"Cityscapes-val"``: short enough for logs and titles."""
        return type(self).__name__ + (f"-{self.split}" if self.split else "")

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.images[index]

    def label_path(self, index: int) -> Path | None:
        """The label file of item ``index`` (None when unlabelled)."""
        return None if self.labels is None else self.labels[index]

    def item_name(self, index: int) -> str:
        """A name unique in the set, without extension, for prediction files (``"00042"``)."""
        return self.names[index]

    def eval_view(self) -> SegmentationDataset:
        """A shallow copy without the random augmentation: the same item on every access."""
        view = copy.copy(self)
        view.transform = self.transform.eval_view()
        return view

    def without_labels(self) -> SegmentationDataset:
        """A shallow copy whose items are the images alone, label files never opened: the
        same images, the same random augmentation (its draws do not depend on the label)."""
        view = copy.copy(self)
        view.labels, view.labelled = None, False
        return view

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, Tensor]:
        image = self.read_image(self.images[index])
        if self.labels is None:
            return self.transform(image)
        label_file = self.labels[index]
        label = self.read_label(label_file)
        if label.shape != image.shape[-2:]:
            label = self._match_image_size(label, image, label_file, self.images[index])
        image, label = self.transform(image, label)
        train_ids = self.id_to_train_id.to(torch.uint8).numpy()  # 256 entries, all <= 255
        # np.take: half the time of fancy indexing on a 512x1024 uint8 label (0.5 against 1.0 ms)
        return image, torch.from_numpy(np.take(train_ids, label.numpy()))

    def read_image(self, path: Path) -> Tensor:
        """The image as uint8 (3, H, W) RGB (an alpha channel is dropped).

        A PNG is checked first (``read_png``: structure, every chunk's CRC, the IEND chunk) and
        must be a colour PNG (RGB, RGBA or palette; 16-bit colour is reduced to 8 bits exactly
        as Pillow does); other formats are left to Pillow, which reports what it cannot decode.
        """
        data = read_bytes(path)
        if _is_png(path, data):
            png = read_png(path, data)
            if png.colour_type in (0, 4):
                raise DataError(
                    f"{path} is {_a(png.kind)} {png.kind} PNG, not a colour image: images must "
                    "be RGB or RGBA (a label file in the images folder?); restore the dataset's "
                    "image"
                )
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))
        except DecodeError as err:
            raise decode_error(path, err) from err
        # (H, W, 3) seen as (3, H, W) without a copy: the resize reads this channels-last
        # layout directly (faster than from a contiguous copy; the same values)
        return torch.from_numpy(rgb).permute(2, 0, 1)

    def read_label(self, path: Path) -> Tensor:
        """The label file's raw values as uint8 (H, W), checked against ``max_label_id``.

        Palette ("P") PNGs give their index values, not colours (GTA5's labels are palette PNGs
        whose indices are Cityscapes labelIds). A PNG is checked first (``read_png``) and must
        be 8-bit greyscale or palette: other bit depths would not give the stored ids.
        """
        data = read_bytes(path)
        if _is_png(path, data):
            png = read_png(path, data)
            if png.channels > 1:
                raise DataError(
                    f"{path} is a {png.channels}-channel image, not a single-channel id PNG "
                    f"({_a(png.kind)} {png.kind} PNG): {self.label_hint}"
                )
            if png.colour_type == 0 and png.bit_depth != 8:
                raise DataError(
                    f"{path} is {_a(png.kind)} {png.kind} PNG, but label ids are read from 8-bit "
                    f"greyscale or palette PNGs (other bit depths are scaled): {self.label_hint}"
                )
        try:
            with Image.open(io.BytesIO(data)) as image:
                values = np.array(image)
        except DecodeError as err:
            raise decode_error(path, err) from err
        if values.ndim != 2:
            raise DataError(
                f"{path} is a {values.shape[-1]}-channel image, not a single-channel id PNG: "
                f"{self.label_hint}"
            )
        if values.dtype != np.uint8:  # "I;16"/"I"/"1" modes: compare in int32, then narrow
            values = values.astype(np.int32)
        return self.check_label_values(torch.from_numpy(values), path).to(torch.uint8)

    def check_label_values(self, label: Tensor, path: Path) -> Tensor:
        """``label`` unchanged if its largest value is at most ``max_label_id``, else raise."""
        peak = int(label.max())
        if peak > self.max_label_id:
            raise DataError(
                f"{path} holds the value {peak}, which is not a {type(self).__name__} label id "
                f"(0..{self.max_label_id}): {self.label_hint}"
            )
        return label

    def _match_image_size(self, label: Tensor, image: Tensor, label_file: Path, image_file: Path):
        if self.size_mismatch == "resize":
            return resize_mask(label, image.shape[-2:]).as_subclass(Tensor)
        raise DataError(
            f"label {label_file} is {_wxh(label.shape)} but its image {image_file} is "
            f"{_wxh(image.shape[-2:])}: the pair does not match; re-extract the dataset"
        )

    def __repr__(self) -> str:
        parts = [f"split={self.split!r}"] if self.split else []
        parts += [f"size={self.size}", f"images={len(self)}"]
        if self.train_augment:
            parts.append("train_augment=True")
        if not self.labelled:
            parts.append("labelled=False")
        return f"{type(self).__name__}({', '.join(parts)})"


def _wxh(shape: Sequence[int]) -> str:
    return f"{shape[-1]}x{shape[-2]}"


def damaged_file_error(path: Path, reason: str) -> DataError:
    """The error for a file that is damaged (``reason`` says how): names the file and the fix."""
    return DataError(
        f"{path} cannot be decoded ({reason}): the file is corrupt or truncated; re-download or "
        "re-extract it"
    )


def decode_error(path: Path, err: Exception) -> DataError:
    """The error to raise (from ``err``) when ``path`` cannot be decoded: names file and fix."""
    return damaged_file_error(path, f"{type(err).__name__}: {err}")


def read_bytes(path: Path, size: int = -1) -> bytes:
    """The file's bytes (the first ``size`` if given); a file that vanished or may not be read
    is refused naming it."""
    try:
        with open(path, "rb") as file:
            return file.read(size)
    except FileNotFoundError as err:
        raise MissingFileError(
            f"{path} does not exist (it did when the dataset was listed); restore it"
        ) from err
    except PermissionError as err:
        raise UnreadableFileError(f"{path} may not be read by this process: {err}") from err
    except OSError as err:
        raise decode_error(path, err) from err


# ---- PNG checks: no damaged file reaches a native decoder --------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_COLOURS = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # fmt: skip
"""The interlaced passes: (first column, first row, column step, row step)."""
_MAX_SIDE = 1_000_000
"""libpng's default width/height limit (beyond it libpng raises, which torchvision survives
badly); no dataset image comes near it."""


def _a(kind: str) -> str:
    """The article for ``kind`` (``"an 8-bit RGB"``, ``"a 16-bit RGB"``)."""
    return "an" if kind.startswith(("8-", "8 ")) else "a"


def _is_png(path: Path, data: bytes) -> bool:
    """Whether ``data`` must be a PNG: it says so, or its name does."""
    return data.startswith(PNG_SIGNATURE) or Path(path).suffix.lower() == ".png"


@dataclass(frozen=True)
class PngFile:
    """A PNG whose chunk structure and CRCs ``read_png`` checked, with its header fields.

    ``chunks`` holds ``(type, start, end)`` of each chunk's data in ``data`` up to IEND.
    """

    data: bytes
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool
    chunks: tuple[tuple[bytes, int, int], ...]

    @property
    def channels(self) -> int:
        return _CHANNELS[self.colour_type]

    @property
    def kind(self) -> str:
        """E.g. ``"16-bit RGB"``, ``"8-bit palette"``."""
        return f"{self.bit_depth}-bit {_COLOURS[self.colour_type]}"

    def _rows(self) -> list[tuple[int, int]]:
        """(rows, bytes per row without the filter byte) of each pass (one when not
        interlaced), empty passes left out."""
        passes = _ADAM7 if self.interlaced else ((0, 0, 1, 1),)
        bits = self.channels * self.bit_depth
        rows = []
        for x0, y0, dx, dy in passes:
            width, height = -(-(self.width - x0) // dx), -(-(self.height - y0) // dy)
            if width > 0 and height > 0:
                rows.append((height, -(-width * bits // 8)))
        return rows

    def check_pixels(self, path: Path) -> None:
        """Decompress the image data (zlib checks its own checksum) and check its size and
        every row's filter type: what libpng would stop at. Raises ``DataError`` naming
        ``path``; costs one decompression (``read_png`` alone costs a CRC pass)."""
        rows = self._rows()
        expected = sum(height * (1 + row) for height, row in rows)
        view = memoryview(self.data)
        stream = b"".join(view[s:e] for kind, s, e in self.chunks if kind == b"IDAT")
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(stream, expected + 1)
        except zlib.error as err:
            raise damaged_file_error(path, f"its image data does not decompress: {err}") from err
        if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail:
            found = f"{expected}+" if len(raw) > expected else str(len(raw))
            raise damaged_file_error(
                path,
                f"its image data decompresses to {found} bytes"
                f"{'' if inflater.eof else ' and does not end'}, not the {expected} bytes "
                f"{_a(self.kind)} {self.width}x{self.height} image holds",
            )
        if inflater.unused_data:
            raise damaged_file_error(path, "its image data has bytes after its end")
        pixels, offset = np.frombuffer(raw, np.uint8), 0
        for height, row in rows:
            filters = pixels[offset : offset + height * (row + 1) : row + 1]
            if filters.max() > 4:
                bad = int(np.argmax(filters > 4))
                raise damaged_file_error(
                    path, f"row {bad} has filter type {filters[bad]} (PNG has 0..4)"
                )
            offset += height * (row + 1)

    def essential(self) -> bytes:
        """The PNG with the chunks that make its pixels only (IHDR, IDAT, IEND, and PLTE for a
        palette image): no ancillary chunk (colour profile, text, ...) reaches a decoder."""
        keep = (b"IHDR", b"IDAT", b"IEND") + ((b"PLTE",) if self.colour_type == 3 else ())
        view = memoryview(self.data)
        return PNG_SIGNATURE + b"".join(
            view[s - 8 : e + 4] for kind, s, e in self.chunks if kind in keep
        )


def read_png(path: Path, data: bytes | None = None, header_only: bool = False) -> PngFile:
    """``data`` (default: the file's bytes) checked as a PNG, before any decoder sees it.

    Checks the signature, that every chunk lies inside the file with a valid type and a correct
    CRC32 (any flipped byte fails one), a valid IHDR first, consecutive IDAT chunks, a palette
    where one is needed, no unknown critical chunk, and the IEND chunk (a truncated file has
    none). Pixels are not decompressed (``PngFile.check_pixels`` does that). With
    ``header_only`` only the signature and the IHDR chunk are read and checked (33 bytes: the
    size without reading the file). Raises ``DataError`` naming ``path``, what is damaged and
    the fix.
    """
    if data is None:
        data = read_bytes(path, 33 if header_only else -1)
    if not data.startswith(PNG_SIGNATURE):
        if not data:
            raise damaged_file_error(path, "the file is empty")
        if PNG_SIGNATURE.startswith(data):
            raise damaged_file_error(path, f"truncated after {len(data)} bytes")
        raise damaged_file_error(
            path, f"not a PNG: it starts with {data[:8]!r}, not the PNG signature"
        )
    chunks, pos, end, view = [], len(PNG_SIGNATURE), len(data), memoryview(data)
    while True:
        if pos + 12 > end:
            raise damaged_file_error(path, f"truncated: it ends at byte {end}, before its IEND")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if not kind.isalpha() or length > 2**31 - 1:
            raise damaged_file_error(path, f"the chunk header at byte {pos} is damaged")
        start, stop = pos + 8, pos + 8 + length
        if stop + 4 > end:
            raise damaged_file_error(
                path, f"truncated: it ends at byte {end}, inside its {kind.decode()} chunk"
            )
        (crc,) = struct.unpack_from(">I", data, stop)
        if zlib.crc32(view[pos + 4 : stop]) != crc:
            raise damaged_file_error(
                path, f"its {kind.decode()} chunk at byte {pos} fails its CRC check"
            )
        chunks.append((kind, start, stop))
        pos = stop + 4
        if kind == b"IEND" or header_only:
            break
    kinds = [kind for kind, _, _ in chunks]
    if kinds[0] != b"IHDR" or chunks[0][2] - chunks[0][1] != 13 or kinds.count(b"IHDR") > 1:
        raise damaged_file_error(path, "its first chunk is not one IHDR (header) chunk")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(
        ">IIBBBBB", data, chunks[0][1]
    )
    if (
        not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE)
        or depth not in _BIT_DEPTHS.get(colour, ())
        or (compression, filtering) != (0, 0)
        or interlace > 1
    ):
        raise damaged_file_error(
            path,
            f"its header says {width}x{height}, bit depth {depth}, colour type {colour}, "
            f"compression {compression}, filter {filtering}, interlace {interlace}: not a valid "
            "PNG header",
        )
    if header_only:
        return PngFile(data, width, height, depth, colour, interlace == 1, tuple(chunks))
    idat = [i for i, kind in enumerate(kinds) if kind == b"IDAT"]
    if not idat or idat != list(range(idat[0], idat[-1] + 1)):
        raise damaged_file_error(path, "its image data (IDAT chunks) is missing or split")
    critical = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
    unknown = [kind for kind in kinds if kind[:1].isupper() and kind not in critical]
    if unknown:
        raise damaged_file_error(path, f"unknown critical chunk {unknown[0].decode()}")
    if colour == 3 and b"PLTE" not in kinds[: idat[0]]:
        raise damaged_file_error(path, "a palette image without a palette (PLTE) before its data")
    return PngFile(data, width, height, depth, colour, interlace == 1, tuple(chunks))


# ---- helpers the family subclasses share ---------------------------------------------------------


def check_root(root: str | Path, dataset: str, config_key: str, layout: str) -> Path:
    """``root`` as a Path, refusing a missing folder with the config key that probably sets it."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise MissingFileError(
            f"{dataset} root {str(root)!r} is not a folder. Set the dataset's root in the config "
            f"(e.g. {config_key}) to the folder that holds {layout}"
        )
    return path


def files_by_name(root: Path, pattern: str, suffix: str, keep_folder: bool = False):
    """``{name: path}`` for the files under ``root`` matching ``pattern`` (which ends in
    ``suffix``); the name is the file name without ``suffix``, prefixed by ``<folder>/`` when
    ``keep_folder`` (Cityscapes' ``aachen/aachen_000000_000019``)."""
    files = {}
    for path in sorted(root.glob(pattern)):
        folder = f"{path.parent.name}/" if keep_folder else ""
        files[folder + path.name[: -len(suffix)]] = path
    return files


def no_files_error(dataset: str, root: Path, pattern: str, fix: str) -> MissingFileError:
    """The error for an empty listing: names the glob pattern searched and the fix."""
    return MissingFileError(f"{dataset}: no files match {root / pattern}; {fix}")


def select_names(files: dict[str, Path], split_file: str | Path, digits: int, dataset: str):
    """The entries of ``files`` named in ``split_file`` (one name or number per line; ``42``,
    ``00042`` and ``images/00042.png`` all mean ``00042`` when ``digits=5``); '#' starts a
    comment. Refuses names with no file."""
    path = Path(split_file).expanduser()
    if not path.is_file():
        raise MissingFileError(f"{dataset}: split_file {str(split_file)!r} is not a file")
    wanted = []
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            stem = Path(entry).stem
            wanted.append(stem.zfill(digits) if stem.isdigit() else stem)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise MissingFileError(
            f"{dataset}: {len(missing)} of the {len(wanted)} names in {path} have no image "
            f"(first: {', '.join(missing[:5])}); fix the split file or restore those images"
        )
    if not wanted:
        raise DataError(f"{dataset}: split_file {path} lists no names")
    return {name: files[name] for name in sorted(set(wanted))}


def pair_by_name(
    dataset: str,
    images: dict[str, Path],
    labels: dict[str, Path],
    image_pattern: str,
    label_pattern: str,
    fix: str,
) -> list[str]:
    """The names (sorted) present in both ``images`` and ``labels``; refuses any unpaired file
    with one message giving the counts and the first few names on each side."""
    no_label = sorted(images.keys() - labels.keys())
    no_image = sorted(labels.keys() - images.keys())
    if no_label or no_image:
        parts = []
        if no_label:
            shown = ", ".join(str(images[n]) for n in no_label[:3])
            parts.append(f"{len(no_label)} of {len(images)} images have no label (first: {shown})")
        if no_image:
            shown = ", ".join(str(labels[n]) for n in no_image[:3])
            parts.append(f"{len(no_image)} of {len(labels)} labels have no image (first: {shown})")
        raise DataError(
            f"{dataset}: {'; '.join(parts)}. Images are {image_pattern} and labels "
            f"{label_pattern}, paired by name. {fix}"
        )
    return sorted(images)


def folder_pairs(
    dataset: str,
    root: Path,
    image_pattern: str,
    label_pattern: str,
    labelled: bool,
    split_file: str | Path | None = None,
    digits: int = 0,
) -> tuple[list[str], list[Path], list[Path] | None]:
    """(names, images, labels or None) of a flat image folder and label folder paired by file
    stem (GTA5, SYNTHIA), restricted to ``split_file``'s names if given; labels are only listed
    when ``labelled``."""
    images = files_by_name(root, image_pattern, ".png")
    if not images:
        raise no_files_error(dataset, root, image_pattern, "check root (the dataset's folder)")
    if split_file is not None:
        images = select_names(images, split_file, digits, dataset)
    names = sorted(images)
    if not labelled:
        return names, [images[name] for name in names], None
    labels = files_by_name(root, label_pattern, ".png")
    if split_file is not None:
        labels = {name: path for name, path in labels.items() if name in images}
    fix = (
        "Restore the missing files, pass split_file=... listing the pairs to use, or "
        "labelled=False for an unlabelled set."
    )
    pair_by_name(dataset, images, labels, image_pattern, label_pattern, fix)
    return names, [images[name] for name in names], [labels[name] for name in names]
