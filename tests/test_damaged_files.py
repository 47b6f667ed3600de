"""No damaged file crashes a run (issue 20): every damaged image or label of the segmentation
families (a flipped byte anywhere, truncation, a wrong mode or bit depth) raises DataError naming
the file and the fix, in the main process, in a DataLoader worker, and in a subprocess that
shows no signal killed it (torchvision's libpng decoder used to SIGSEGV on a damaged 16-bit
SYNTHIA label). The files are the real formats of tests/segmentation_fixtures; the digits'
formats (MNIST idx plain and gzipped, USPS bz2 LIBSVM) are written as tests/test_digits_data
writes them."""

from __future__ import annotations

import bz2
import gzip
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dam_lightning.cli import main
from dam_lightning.data import GTA5, SYNTHIA, Cityscapes
from dam_lightning.data.digits import MNIST, USPS
from dam_lightning.errors import DataError

from .conftest import REPO
from .segmentation_fixtures import (
    flip_byte,
    png_chunk,
    png_chunks,
    truncate,
    write_cityscapes,
    write_gta5,
    write_png16,
    write_synthia,
)
from .test_digits_data import usps_line, write_mnist, write_usps

FAMILIES = {
    "cityscapes": (write_cityscapes, lambda root: Cityscapes(root, "val")),
    "gta5": (write_gta5, GTA5),
    "synthia": (write_synthia, SYNTHIA),
}


def damaged_file(tmp_path, family: str, kind: str):
    """(a function building the dataset, the item index, the file) of the family's first item;
    ``kind`` is "image" or "label"."""
    write, build = FAMILIES[family]
    written = write(tmp_path / family)
    name = written.names[0]
    files = written.image_files if kind == "image" else written.label_files
    return (lambda: build(written.root)), 0, files[name]


def assert_names_file(build, index: int, path: Path, why: str = "") -> DataError:
    """Building the set and reading item ``index`` raises DataError naming ``path`` and a fix."""
    with pytest.raises(DataError, match=re.escape(str(path)) + why) as err:
        build()[index]
    return err.value


def offsets(path: Path) -> dict[str, int]:
    """Byte offsets of the places a flip is tried: signature, IHDR width, the IDAT length
    field, the middle of the IDAT data, the IDAT CRC, the IEND CRC (the last byte)."""
    chunks = {kind: (pos, length) for kind, pos, length in png_chunks(path)}
    idat, idat_length = chunks[b"IDAT"]
    return {
        "signature": 1,
        "IHDR": chunks[b"IHDR"][0] + 8 + 3,
        "IDAT length": idat + 2,
        "IDAT middle": idat + 8 + idat_length // 2,
        "IDAT CRC": idat + 8 + idat_length + 1,
        "IEND CRC": -1,
    }


@pytest.mark.parametrize("kind", ["image", "label"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flipped_bytes_and_truncation_name_the_file(tmp_path, family, kind):
    build, index, path = damaged_file(tmp_path, family, kind)
    original = path.read_bytes()
    for where, offset in offsets(path).items():
        flip_byte(path, offset)
        message = str(assert_names_file(build, index, path, " cannot be decoded"))
        assert "re-download or re-extract it" in message, (where, message)
        path.write_bytes(original)
    for keep in (0.0, 0.004, 0.5, 0.99):
        truncate(path, keep)
        assert_names_file(build, index, path, r" cannot be decoded \((truncated|the file is empty)")
        path.write_bytes(original)
    path.write_bytes(original[:-12])  # cut exactly before the IEND chunk
    assert_names_file(build, index, path, r" cannot be decoded \(truncated: .* before its IEND")
    path.write_bytes(b"")
    assert_names_file(build, index, path, r" cannot be decoded \(the file is empty\)")
    path.write_bytes(original)
    build()[index]  # the restored file reads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greyscale_or_16_bit_grey_image_is_refused(tmp_path, family):
    build, index, path = damaged_file(tmp_path, family, "image")
    with Image.open(path) as image:
        size = image.size
    Image.new("L", size, 7).save(path)  # a label in the images folder
    assert_names_file(build, index, path, " is an 8-bit greyscale PNG, not a colour image")
    Image.fromarray(np.full(size[::-1], 300, np.uint16)).save(path)  # Pillow would clip to 255
    assert_names_file(build, index, path, " is a 16-bit greyscale PNG, not a colour image")


@pytest.mark.parametrize("family", ["cityscapes", "gta5"])
def test_8_bit_families_refuse_labels_of_another_bit_depth_or_mode(tmp_path, family):
    build, index, path = damaged_file(tmp_path, family, "label")
    with Image.open(path) as label:
        ids, size = np.array(label), label.size
    Image.fromarray(ids.astype(np.uint16)).save(path)  # 16-bit grey: not the release's format
    error = assert_names_file(build, index, path, " is a 16-bit greyscale PNG, but label ids")
    assert "labelIds" in str(error)
    Image.new("RGB", size).save(path)
    assert_names_file(build, index, path, " is a 3-channel image, not a single-channel id PNG")


def test_synthia_label_resaved_as_8_bit_is_refused_naming_the_bit_depth(tmp_path):
    build, index, path = damaged_file(tmp_path, "synthia", "label")
    decoded = np.array(Image.open(path).convert("RGB"))  # PIL keeps the high byte: all ids 0
    assert decoded[..., 0].max() == 0
    Image.fromarray(decoded).save(path)  # the common conversion mistake
    error = str(assert_names_file(build, index, path, r" has bit depth 8 \(8-bit RGB PNG\)"))
    assert "16-bit" in error and "SYNTHIA-RAND-CITYSCAPES archive" in error
    assert "IMREAD_UNCHANGED" in error


def synthia_label_with(path: Path, header: bytes | None = None, idat: bytes | None = None):
    """Rewrite ``path`` (a SYNTHIA label) with a replaced IHDR payload or IDAT payload and
    correct CRCs: damage that no CRC shows, which libpng would meet."""
    data = path.read_bytes()
    chunks = {kind: (pos, length) for kind, pos, length in png_chunks(path)}
    ihdr, ihdr_length = chunks[b"IHDR"]
    idat_pos, idat_length = chunks[b"IDAT"]
    header = header or data[ihdr + 8 : ihdr + 8 + ihdr_length]
    idat = idat if idat is not None else data[idat_pos + 8 : idat_pos + 8 + idat_length]
    path.write_bytes(
        data[:8] + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def test_synthia_label_damage_behind_valid_crcs_never_reaches_libpng(tmp_path):
    build, index, path = damaged_file(tmp_path, "synthia", "label")
    original = path.read_bytes()
    chunks = {kind: (pos, length) for kind, pos, length in png_chunks(path)}
    pos, length = chunks[b"IDAT"]
    stream = bytearray(original[pos + 8 : pos + 8 + length])
    stream[len(stream) // 2] ^= 0xFF
    synthia_label_with(path, idat=bytes(stream))
    assert_names_file(build, index, path, " cannot be decoded \\(its image data")
    raw = bytearray(zlib.decompress(original[pos + 8 : pos + 8 + length]))
    raw[0] = 7  # the first row's filter type
    path.write_bytes(original)
    synthia_label_with(path, idat=zlib.compress(bytes(raw)))
    assert_names_file(build, index, path, r" cannot be decoded \(row 0 has filter type 7")
    path.write_bytes(original)
    width, height, *rest = struct.unpack(">IIBBBBB", original[16:29])
    synthia_label_with(path, header=struct.pack(">IIBBBBB", width, height + 1, *rest))
    assert_names_file(build, index, path, r" cannot be decoded \(its image data decompresses")
    path.write_bytes(original)
    synthia_label_with(path, idat=zlib.compress(bytes(raw[:-10])))
    assert_names_file(build, index, path, r" cannot be decoded \(its image data decompresses")


def test_synthia_16_bit_labels_decode_exactly_interlaced_and_with_ancillary_chunks(tmp_path):
    written = write_synthia(tmp_path / "synthia", n=2)
    for k, name in enumerate(written.names):
        channels = [written.labels[name], written.instances[name], written.labels[name] * 0]
        write_png16(
            written.label_files[name],
            np.stack(channels, -1),
            interlaced=k == 0,
            extra_chunks=(png_chunk(b"tEXt", b"Software\0test"), png_chunk(b"PLTE", b"\0" * 9)),
        )
    ds = SYNTHIA(written.root)
    for name in written.names:
        label = ds.read_label(written.label_files[name])
        assert torch.equal(label.long(), torch.from_numpy(written.labels[name]))


def test_a_damaged_file_read_in_a_dataloader_worker_reaches_the_main_process(tmp_path):
    build, index, path = damaged_file(tmp_path, "synthia", "label")
    flip_byte(path, offsets(path)["IDAT middle"])  # what made libpng SIGSEGV the worker
    loader = DataLoader(build(), batch_size=1, num_workers=1)
    with pytest.raises(DataError, match=re.escape(str(path)) + " cannot be decoded"):
        for _ in loader:
            pass


SWEEP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dam_lightning.data import GTA5, SYNTHIA, Cityscapes, SegmentationTransform
    from dam_lightning.errors import DataError
    from tests.segmentation_fixtures import flip_byte, write_cityscapes, write_gta5, write_synthia

    root, step, files = Path(sys.argv[1]), int(sys.argv[2]), SegmentationTransform(size=None)
    families = [
        (write_cityscapes, lambda r: Cityscapes(r, "val", transform=files)),
        (write_gta5, lambda r: GTA5(r, transform=files)),
        (write_synthia, lambda r: SYNTHIA(r, transform=files)),
    ]
    last = None
    for write, build in families:
        written = write(root / write.__name__)
        name, dataset = written.names[0], build(written.root)
        for path in (written.image_files[name], written.label_files[name]):
            original, raised = path.read_bytes(), 0
            every = 2 if path == written.label_files.get("0000000") else step
            offsets = range(0, len(original), every)
            for offset in offsets:
                flip_byte(path, offset)
                try:
                    dataset[0]
                except DataError as err:
                    assert str(path) in str(err), str(err)
                    raised, last = raised + 1, err
                path.write_bytes(original)
            print(path.relative_to(root), len(offsets), raised, flush=True)
    raise last
    """
)


def test_no_flipped_byte_crashes_the_process(tmp_path):
    """Bytes of each family's image and label, flipped one at a time (every second byte of
    SYNTHIA's 16-bit label, every fourth of the other files), each raise DataError when the item
    is read; the process ends with the last one (exit code 1), not a signal (a negative code)."""
    done = subprocess.run(
        [sys.executable, "-c", SWEEP, str(tmp_path), "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "dam_lightning.errors.DataError: " in done.stderr.strip().splitlines()[-1]
    assert "cannot be decoded" in done.stderr.strip().splitlines()[-1]
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == 6, done.stdout
    assert ["synthia" in file for file, _, _ in lines] == [False] * 4 + [True] * 2
    assert int(lines[-1][1]) > 1000  # the 16-bit label, swept nearly whole
    for file, tried, raised in lines:
        assert int(tried) == int(raised) > 0, (file, tried, raised)


def test_a_damaged_synthia_label_is_one_cli_line_from_a_worker(tmp_path, monkeypatch, capsys):
    written = write_synthia(tmp_path / "synthia", n=2)
    write_cityscapes(tmp_path / "cityscapes", "train", per_city=1)
    write_cityscapes(tmp_path / "cityscapes", "val", per_city=1)
    label = written.label_files["0000001"]
    flip_byte(label, offsets(label)["IDAT middle"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit", "--config", str(REPO / "configs" / "synthia_source.yaml"),
                "--config", str(REPO / "tests" / "conf" / "seg_tiny.yaml"),
                f"--data.source.init_args.root={tmp_path / 'synthia'}",
                f"--data.target.init_args.root={tmp_path / 'cityscapes'}",
                f"--data.target_val.init_args.root={tmp_path / 'cityscapes'}",
                "--data.num_workers=1",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {label} cannot be decoded (its IDAT chunk"), lines[-5:]
    assert lines[-1].endswith("re-download or re-extract it")
    assert not any("Traceback" in line for line in lines)


# ---- the digits' formats: MNIST idx (plain and .gz), USPS bz2 LIBSVM ---------------------------
# MNIST and USPS decode every file when the dataset is built (DigitDataset holds tensors; an item
# is an index into them), so a damaged file raises in the constructor, in the main process,
# before any DataLoader worker exists.

MNIST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def digits_file(tmp_path, fmt: str, which: int = 0):
    """(a function building the dataset, the file to damage) for ``fmt`` "idx", "idx.gz" or
    "usps"; ``which`` picks MNIST's images (0) or labels (1) file."""
    if fmt == "usps":
        path = write_usps(
            tmp_path / "usps.t.bz2", [usps_line(d % 10 + 1, d / 10 - 0.45) for d in range(12)]
        )
        return (lambda: USPS(str(tmp_path), split="test")), path
    write_mnist(tmp_path, n=3, compress=fmt == "idx.gz")
    path = tmp_path / (MNIST_FILES[which] + (".gz" if fmt == "idx.gz" else ""))
    return (lambda: MNIST(str(tmp_path), split="test")), path


def assert_digits_error(build, path: Path, why: str = "") -> str:
    with pytest.raises(DataError, match=re.escape(str(path)) + why) as err:
        build()
    message = str(err.value)
    assert "re-download" in message or "rename it" in message, message
    return message


DIGITS_CASES = [("idx", 0), ("idx", 1), ("idx.gz", 0), ("idx.gz", 1), ("usps", 0)]


@pytest.mark.parametrize(("fmt", "which"), DIGITS_CASES)
def test_every_flipped_byte_of_a_digits_file_raises_or_changes_nothing(tmp_path, fmt, which):
    """Each byte flipped in turn: DataError naming the file, or (a byte no check covers: the
    gzip header's MTIME/XFL/OS, bzip2's block-size digit...) exactly the original tensors, never
    other data. A plain idx images file has no checksum, so only its header is swept there (a
    flipped pixel byte is a valid pixel); every label byte ^ 0xFF is above 9 and is caught."""
    build, path = digits_file(tmp_path, fmt, which)
    reference, original = build(), path.read_bytes()
    sweep = range(16) if (fmt, which) == ("idx", 0) else range(len(original))
    raised = 0
    for offset in sweep:
        flip_byte(path, offset)
        try:
            ds = build()
        except DataError as err:
            assert str(path) in str(err) and "re-download" in str(err), (offset, str(err))
            raised += 1
        else:
            assert torch.equal(ds.images, reference.images), offset
            assert torch.equal(ds.labels, reference.labels), offset
        path.write_bytes(original)
    assert raised >= len(sweep) - 10, (raised, len(sweep))  # all but a few header bytes


@pytest.mark.parametrize(("fmt", "which"), DIGITS_CASES)
def test_truncated_or_empty_digits_file_names_it(tmp_path, fmt, which):
    build, path = digits_file(tmp_path, fmt, which)
    original = path.read_bytes()
    for keep in (0.01, 0.3, 0.5, 0.9, 0.999):
        truncate(path, keep)
        assert_digits_error(build, path)
        path.write_bytes(original)
    path.write_bytes(original[:-1])
    assert_digits_error(build, path)
    path.write_bytes(b"")
    assert_digits_error(build, path, r" is empty \(0 bytes\)")
    path.write_bytes(original)
    build()


def test_mnist_wrong_magic_header_and_compression_name_the_file(tmp_path):
    build, images = digits_file(tmp_path, "idx", 0)
    labels = tmp_path / MNIST_FILES[1]
    original_images, original_labels = images.read_bytes(), labels.read_bytes()
    labels.write_bytes(original_images)  # the images file under the labels' name
    assert_digits_error(build, labels, r": idx magic number 2051, expected 2049 for labels")
    labels.write_bytes(original_labels)
    images.write_bytes(b"\x00\x00\x08\x01" + original_images[4:])  # a 1-d magic, 3-d data
    assert_digits_error(build, images, r": idx magic number 2049, expected 2051 for images")
    images.write_bytes(b"\x00\x00\x0d\x03" + original_images[4:])  # float32 data type
    assert_digits_error(build, images, r": idx magic number 3331")
    header = original_images[:4] + (2**32 - 1).to_bytes(4, "big") * 3  # no overflow
    images.write_bytes(header + original_images[16:])
    assert_digits_error(build, images, r" is \d+ bytes but its header \[4294967295, ")
    images.write_bytes(original_images[:4] + bytes(4) + original_images[8:16])  # 0 images
    assert_digits_error(build, images, r": its header says it holds 0 items")
    images.write_bytes(gzip.compress(original_images))  # gzipped, named without .gz
    message = assert_digits_error(build, images, r" is gzip-compressed but its name does not end")
    assert f"rename it to {MNIST_FILES[0]}.gz" in message
    images.unlink()
    (tmp_path / (MNIST_FILES[0] + ".gz")).write_bytes(original_images)  # .gz, not gzipped
    assert_digits_error(
        build, tmp_path / (MNIST_FILES[0] + ".gz"), r" cannot be decompressed \(BadGzipFile"
    )


def test_mnist_gzip_with_a_corrupt_deflate_stream_is_a_data_error_not_a_zlib_error(tmp_path):
    """zlib.error (not an OSError) escaped the reader before: a flip inside the deflate data
    behind a valid gzip header."""
    build, path = digits_file(tmp_path, "idx.gz", 0)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # the first byte of the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot be decompressed \(error: Error -3") as err:
        build()
    assert isinstance(err.value.__cause__, zlib.error)
    assert "the gzip file is corrupt or truncated; re-download the file" in str(err.value)


def test_usps_not_bz2_or_not_text_names_the_file_and_the_fix(tmp_path):
    build, path = digits_file(tmp_path, "usps")
    text = bz2.decompress(path.read_bytes())
    path.write_bytes(text)  # a decompressed copy under the .bz2 name
    message = assert_digits_error(build, path, r" is not a readable bz2 text file")
    assert "does not start with bzip2's signature 'BZh'" in message
    path.write_bytes(bz2.compress(text[:4] + b"\xe9" + text[5:]))  # valid bz2, not ASCII
    assert_digits_error(build, path, r" is not a readable bz2 text file \(UnicodeDecodeError")
    path.write_bytes(bz2.compress(text[: len(text) // 2]))  # cut mid-line, then compressed
    assert_digits_error(build, path, r": its last line \(line 7\) has no line end")


def test_digits_decode_at_construction_so_a_loader_worker_never_meets_a_damaged_file(tmp_path):
    build, path = digits_file(tmp_path, "idx.gz", 1)
    good = build()
    batches = list(DataLoader(good, batch_size=2, num_workers=1))  # workers only index tensors
    assert torch.equal(torch.cat([x for x, _ in batches]), good.images)
    flip_byte(path, len(path.read_bytes()) // 2)
    with pytest.raises(DataError, match=re.escape(str(path)) + " cannot be decompressed"):
        DataLoader(build(), batch_size=2, num_workers=1)  # raised building the dataset


def test_a_damaged_mnist_file_is_one_cli_line(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "digits", n=3, compress=True)
    path = tmp_path / "digits" / (MNIST_FILES[0] + ".gz")
    flip_byte(path, len(path.read_bytes()) // 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit", "--config", str(REPO / "configs" / "mnist_usps_source.yaml"),
                "--config", str(REPO / "configs" / "digits_reduced.yaml"),
                f"--data.source.init_args.root={tmp_path / 'digits'}",
                f"--data.target.init_args.root={tmp_path / 'digits'}",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {path} cannot be decompressed ("), lines[-5:]
    assert lines[-1].endswith("re-download the file")
    assert not any("Traceback" in line for line in lines)
