"""No damaged file crashes a run (issue 20): every damaged image or label of the segmentation
families (a flipped byte anywhere, truncation, a wrong mode or bit depth) raises DataError naming
the file and the fix, in the main process, in a DataLoader worker, and in a subprocess that
shows no signal killed it (torchvision's libpng decoder used to SIGSEGV on a damaged 16-bit
SYNTHIA label). The files are the real formats of tests/segmentation_fixtures."""

from __future__ import annotations

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
