"""GTA5 (Playing for Data) in its released layout: images/NNNNN.png + palette labels/NNNNN.png.

Only says where the files are, checks that pairs match in size (reading PNG headers, not pixels)
and applies the policy for those that do not; decoding and mapping live in ``segmentation.py``.
Labels are read as palette indices (Cityscapes labelIds), never through their RGB colours.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from dam_lightning.data.segmentation import (
    SegmentationDataset,
    check_root,
    folder_pairs,
    read_png,
)
from dam_lightning.data.transforms import SegmentationTransform
from dam_lightning.errors import DataError

__all__ = ["GTA5"]

log = logging.getLogger(__name__)

SizeMismatch = Literal["resize", "skip", "error"]


class GTA5(SegmentationDataset):
    """GTA5 pairs ``images/NNNNN.png`` + ``labels/NNNNN.png``, the labelled source domain.

    Labels are palette ("P") PNGs whose indices are Cityscapes labelIds, mapped to the 19
    trainIds (``info``, the id table and the label range are Cityscapes', inherited). Item
    names are the 5-digit stems (``"00042"``). ``split_file`` optionally lists the items to
    use, one name or number per line. Unpaired files are refused (name the pairs to
    use with ``split_file``). A few released pairs differ in size by some pixels:
    ``size_mismatch="resize"`` resizes such labels (nearest) to their image's size, ``"skip"``
    drops the pairs, ``"error"`` refuses them; one warning says how many there were. An
    unlabelled set (``labelled=False``) never opens ``labels/``. See ``SegmentationDataset`` for
    the other arguments.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "images").mkdir(); (root / "labels").mkdir()
        >>> Image.new("RGB", (16, 8)).save(root / "images" / "00001.png")
        >>> label = Image.fromarray(np.full((8, 16), 24, np.uint8))
        >>> label.putpalette([0, 0, 0] * 24 + [220, 20, 60])  # now a "P" image: index 24 is red
        >>> label.save(root / "labels" / "00001.png")
        >>> ds = GTA5(root, transform=SegmentationTransform(size=(4, 8)))
        >>> ds, ds.item_name(0), ds[0][1].unique().tolist()  # labelId 24 (person) -> trainId 11
        (GTA5(size=(4, 8), images=1), '00001', [11])
        >>> len(GTA5("../shared/data/gta5"))  # doctest: +SKIP
        24966
    """

    label_hint = (
        "GTA5 labels are the palette PNGs of labels/ whose indices are Cityscapes labelIds "
        "0..33, not trainId or colour images"
    )

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path | None = None,
        transform: SegmentationTransform = SegmentationTransform(),
        labelled: bool = True,
        size_mismatch: SizeMismatch = "resize",
    ):
        if size_mismatch not in ("resize", "skip", "error"):
            raise DataError(
                f"GTA5: size_mismatch must be 'resize', 'skip' or 'error', got {size_mismatch!r}"
            )
        root = check_root(root, "GTA5", "data.source.init_args.root", "images/ and labels/")
        names, images, labels = folder_pairs(
            "GTA5", root, "images/*.png", "labels/*.png", labelled, split_file, digits=5
        )
        if labels is not None:
            keep = _size_policy(images, labels, size_mismatch)
            names, images, labels = ([items[i] for i in keep] for items in (names, images, labels))
        super().__init__(
            images,
            labels,
            names,
            split=Path(split_file).stem if split_file is not None else None,
            transform=transform,
            labelled=labelled,
        )
        self.size_mismatch = "resize" if size_mismatch == "resize" else "error"


def _size_policy(images: list[Path], labels: list[Path], policy: SizeMismatch) -> list[int]:
    """Indices of the pairs to keep; raises or warns about pairs whose sizes differ."""
    mismatched = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        image_size, label_size = _png_size(image), _png_size(label)
        if image_size != label_size:
            mismatched.append((index, image_size, label_size))
    if not mismatched:
        return list(range(len(images)))
    index, (image_w, image_h), (label_w, label_h) = mismatched[0]
    first = (
        f"{labels[index]} is {label_w}x{label_h} but its image {images[index].name} is "
        f"{image_w}x{image_h}"
    )
    count = f"{len(mismatched)} of {len(images)} pairs differ in size"
    if policy == "error":
        raise DataError(
            f'GTA5 label {first} ({count}); pass size_mismatch="resize" to resize such labels '
            'with nearest neighbour, or size_mismatch="skip" to drop those pairs'
        )
    action = "labels resized (nearest) to their image's size" if policy == "resize" else "skipped"
    log.warning("GTA5: %s (first: %s); %s (size_mismatch=%r)", count, first, action, policy)
    if policy == "resize":
        return list(range(len(images)))
    dropped = {index for index, _, _ in mismatched}
    return [i for i in range(len(images)) if i not in dropped]


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's checked header (33 bytes); the pixels are not read."""
    png = read_png(path, header_only=True)
    return png.width, png.height
