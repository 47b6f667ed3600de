"""Tiny Cityscapes, GTA5 and SYNTHIA trees written in the real on-disk formats, for tests.

Each writer returns a ``WrittenDataset`` holding exactly what it wrote (the item names the dataset
classes report, the RGB image and the raw label ids of every item), so tests can check reading and
mapping pixel by pixel. Labels are blocks of random ids (a mix of evaluated and ignored ids) and
every image pixel has the colour ``fixture_colour(id)`` of its label id, so image/mask alignment
after a transform can be checked too. Used by the data tests and the CLI end-to-end tests; keep
the files tiny (a few KiB) and the writers free of anything from ``dam_lightning`` but labels.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dam_lightning.data.labels import CITYSCAPES_LABEL_IDS

__all__ = [
    "CITYSCAPES_VOID_IDS",
    "WrittenDataset",
    "fixture_colour",
    "flip_byte",
    "png_chunk",
    "png_chunks",
    "truncate",
    "write_cityscapes",
    "write_gta5",
    "write_png16",
    "write_synthia",
]

CITYSCAPES_VOID_IDS = (0, 1, 4, 6, 9, 10, 14, 15, 16, 18, 29, 30)
"""Cityscapes labelIds the benchmark ignores (unlabelled, ego vehicle, static, ground, parking,
rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer): they must map to 255."""

SYNTHIA_IDS = tuple(range(23))
"""SYNTHIA-RAND-CITYSCAPES class ids 0 (void) .. 22 (lane marking), mapped and unmapped alike."""

BLOCK = 8
"""Side of the constant-id blocks labels are made of (pixels)."""


@dataclass
class WrittenDataset:
    """What a writer put on disk, keyed by item name (sorted, as the datasets order them).

    ``images[name]`` is (H, W, 3) uint8 RGB (any alpha channel written is not included);
    ``labels[name]`` is (h, w) int64 raw label ids as stored (Cityscapes labelIds, or SYNTHIA
    class ids from channel 0); ``instances`` holds SYNTHIA's channel-1 instance ids.
    """

    root: Path
    names: list[str] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    image_files: dict[str, Path] = field(default_factory=dict)
    label_files: dict[str, Path] = field(default_factory=dict)
    instances: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name, image, label, image_file, label_file, instances=None) -> None:
        self.names.append(name)
        self.names.sort()
        self.images[name], self.labels[name] = image, label.astype(np.int64)
        self.image_files[name], self.label_files[name] = image_file, label_file
        if instances is not None:
            self.instances[name] = instances


def fixture_colour(ids: np.ndarray) -> np.ndarray:
    """The RGB colour (uint8, shape ``ids.shape + (3,)``) fixture images give label id ``ids``:
    distinct for ids 0..255 and far apart for nearby ids."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([(ids * 67) % 256, (ids * 151 + 40) % 256, (ids * 29 + 90) % 256], -1).astype(
        np.uint8
    )


def block_labels(rng: np.random.Generator, size: tuple[int, int], ids: np.ndarray) -> np.ndarray:
    """An (H, W) map of ``BLOCK``-pixel squares of ids drawn from ``ids``; the first two blocks
    hold ``ids[0]`` and ``ids[-1]`` so every map has both ends of the list."""
    height, width = size
    rows, cols = -(-height // BLOCK), -(-width // BLOCK)
    blocks = rng.choice(ids, size=(rows, cols))
    blocks.flat[0], blocks.flat[1 % blocks.size] = ids[0], ids[-1]
    return np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=blocks.dtype))[:height, :width]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC32 of type and data."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_chunks(path: Path) -> list[tuple[bytes, int, int]]:
    """``(type, offset of the chunk's length field, data length)`` of every chunk of a PNG."""
    data, pos, chunks = path.read_bytes(), 8, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks.append((kind, pos, length))
        pos += 12 + length
    return chunks


def write_png16(
    path: Path,
    array: np.ndarray,
    interlaced: bool = False,
    extra_chunks: tuple[bytes, ...] = (),
) -> Path:
    """A 16-bit PNG of ``array`` ((H, W) or (H, W, C), C in 1..4, values < 65536), written by
    hand (PIL cannot write multi-channel 16-bit): grey, grey+alpha, RGB or RGBA, no filtering;
    Adam7-interlaced if ``interlaced``; ``extra_chunks`` (whole chunks, ``png_chunk``) go
    between IHDR and IDAT. ``torchvision.io.decode_png(..., ImageReadMode.UNCHANGED)`` reads it
    back exactly."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    height, width, channels = array.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    passes = (
        [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]
        if interlaced
        else [(0, 0, 1, 1)]
    )  # fmt: skip
    raw = b""
    for x0, y0, dx, dy in passes:  # each pass: its sub-image, filter type 0 on every row
        sub = array[y0::dy, x0::dx].astype(">u2")
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub.reshape(sub.shape[0], -1))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, int(interlaced))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + b"".join(extra_chunks)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )
    return path


def flip_byte(path: Path, offset: int) -> Path:
    """Invert every bit of the byte at ``offset`` (negative: from the end), as a bad disk or
    transfer would damage it."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to ``keep`` of its bytes, as an interrupted download or extraction would."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def _save_rgb(path: Path, image: np.ndarray, alpha: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if alpha:
        opaque = np.full(image.shape[:2] + (1,), 255, np.uint8)
        Image.fromarray(np.concatenate([image, opaque], -1)).save(path)  # mode "RGBA"
    else:
        Image.fromarray(image).save(path)  # mode "RGB"


def write_cityscapes(
    root: Path,
    split: str = "val",
    cities: tuple[str, ...] = ("aachen", "bochum"),
    per_city: int = 2,
    size: tuple[int, int] = (32, 64),
    seed: int = 0,
) -> WrittenDataset:
    """``per_city`` frames per city of ``split`` in Cityscapes' layout, (H, W) = ``size``:

    ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` (RGB) and
    ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (mode "L" labelIds, a mix
    of the 19 evaluated ids and ``CITYSCAPES_VOID_IDS``). Calling it again with another split
    adds that split to the same root. Item names are ``"<city>/<city>_<seq>_<frame>"``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = np.array(CITYSCAPES_LABEL_IDS + CITYSCAPES_VOID_IDS)
    written = WrittenDataset(root)
    for city in cities:
        for k in range(per_city):
            stem = f"{city}_{k:06d}_{19 + 7 * k:06d}"
            label = block_labels(rng, size, ids).astype(np.uint8)
            image = fixture_colour(label)
            image_file = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            label_file = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            _save_rgb(image_file, image)
            label_file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(label_file)  # uint8 (H, W): mode "L"
            written.add(f"{city}/{stem}", image, label, image_file, label_file)
    return written


def write_gta5(
    root: Path,
    n: int = 4,
    size: tuple[int, int] = (24, 44),
    mismatched: tuple[int, ...] = (1,),
    seed: int = 0,
) -> WrittenDataset:
    """``n`` GTA5 pairs ``images/NNNNN.png`` (RGB) + ``labels/NNNNN.png``, named 00001..n.

    Labels are palette ("P") PNGs whose indices are Cityscapes labelIds (evaluated and void
    ones) and whose palette colours are unrelated to the ids, as in the release: a reader that
    converts to RGB gets wrong values. The pairs at the 0-based positions ``mismatched`` get a
    label 2 rows and 3 columns smaller than their image (as a few released pairs are).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = np.array(CITYSCAPES_LABEL_IDS + CITYSCAPES_VOID_IDS)
    palette = rng.integers(0, 256, size=256 * 3).astype(np.uint8).tolist()
    written = WrittenDataset(root)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        name = f"{k + 1:05d}"
        label = block_labels(rng, size, ids).astype(np.uint8)
        image = fixture_colour(label)
        if k in mismatched:
            label = label[:-2, :-3]
        image_file, label_file = root / "images" / f"{name}.png", root / "labels" / f"{name}.png"
        _save_rgb(image_file, image)
        palette_image = Image.fromarray(label)
        palette_image.putpalette(palette)  # "L" + palette -> mode "P", indices unchanged
        palette_image.save(label_file)
        written.add(name, image, label, image_file, label_file)
    return written


def write_synthia(
    root: Path,
    n: int = 3,
    size: tuple[int, int] = (24, 40),
    seed: int = 0,
) -> WrittenDataset:
    """``n`` SYNTHIA-RAND-CITYSCAPES pairs ``RGB/NNNNNNN.png`` + ``GT/LABELS/NNNNNNN.png``.

    Labels are 16-bit PNGs: channel 0 the class id (0..22, mapped and unmapped), channel 1 an
    instance id (up to 60000, so the 16 bits matter), channel 2 zero; even items are 3-channel,
    odd items 4-channel (alpha 65535). Images are 8-bit, RGB for even items, RGBA for odd ones.
    Names are 0000000..n-1 (7 digits), as the release numbers them.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    written = WrittenDataset(root)
    (root / "RGB").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        name = f"{k:07d}"
        class_ids = block_labels(rng, size, np.array(SYNTHIA_IDS))
        instances = rng.integers(0, 60000, size=size)
        channels = [class_ids, instances, np.zeros(size, np.int64)]
        if k % 2:
            channels.append(np.full(size, 65535))
        image = fixture_colour(class_ids)
        image_file, label_file = (
            root / "RGB" / f"{name}.png",
            root / "GT" / "LABELS" / f"{name}.png",
        )
        _save_rgb(image_file, image, alpha=bool(k % 2))
        write_png16(label_file, np.stack(channels, -1))
        written.add(name, image, class_ids, image_file, label_file, instances)
    return written
