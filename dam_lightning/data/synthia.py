"""SYNTHIA-RAND-CITYSCAPES in its released layout: RGB/NNNNNNN.png + GT/LABELS/NNNNNNN.png.

Only says where the files are and how its 16-bit label PNGs are read (class id in channel 0,
instance id in channel 1; PIL would silently reduce them to 8 bits, so torchvision.io decodes
them, after ``read_png`` and ``PngFile.check_pixels`` made sure libpng meets no damage: it
crashes the process on some). Decoding of images, transforms and checks live in
``segmentation.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_png

from dam_lightning.data.labels import SYNTHIA_ID_TO_TRAIN_ID, SYNTHIA_INFO
from dam_lightning.data.segmentation import (
    DecodeError,
    SegmentationDataset,
    check_root,
    decode_error,
    folder_pairs,
    read_png,
)
from dam_lightning.data.transforms import SegmentationTransform
from dam_lightning.errors import DataError

__all__ = ["SYNTHIA"]


class SYNTHIA(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES pairs ``RGB/NNNNNNN.png`` + ``GT/LABELS/NNNNNNN.png``.

    Class ids (channel 0 of the 16-bit label PNGs) are mapped to Cityscapes trainIds, so
    predictions and metrics use the 19 Cityscapes classes; ``info.class_subsets`` names the 16- and
    13-class protocols it is scored on. Images may be RGB or RGBA (alpha is dropped). Item names
    are the 7-digit stems (``"0000042"``); ``split_file`` optionally lists the items to use. See
    ``SegmentationDataset`` for the other arguments.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "RGB").mkdir(); (root / "GT" / "LABELS").mkdir(parents=True)
        >>> Image.new("RGBA", (16, 8)).save(root / "RGB" / "0000001.png")
        >>> ids = np.full((8, 16), 8, np.uint16)  # 16-bit greyscale (the release's are 16-bit RGB)
        >>> Image.fromarray(ids).save(root / "GT" / "LABELS" / "0000001.png")
        >>> ds = SYNTHIA(root, transform=SegmentationTransform(size=(4, 8)))
        >>> ds, ds.item_name(0), ds[0][1].unique().tolist()  # class 8 (car) -> trainId 13
        (SYNTHIA(size=(4, 8), images=1), '0000001', [13])
        >>> sorted(ds.class_subsets), len(ds.class_subsets["13"])
        (['13', '16'], 13)
    """

    info = SYNTHIA_INFO
    id_to_train_id = SYNTHIA_ID_TO_TRAIN_ID
    max_label_id = 255
    label_hint = (
        "SYNTHIA class ids are below 256; expected GT/LABELS/*.png of SYNTHIA-RAND-CITYSCAPES "
        "(class id in the first channel), not GT/COLOR/*.png"
    )

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path | None = None,
        transform: SegmentationTransform = SegmentationTransform(),
        labelled: bool = True,
    ):
        root = check_root(root, "SYNTHIA", "data.source.init_args.root", "RGB/ and GT/LABELS/")
        names, images, labels = folder_pairs(
            "SYNTHIA", root, "RGB/*.png", "GT/LABELS/*.png", labelled, split_file, digits=7
        )
        super().__init__(
            images,
            labels,
            names,
            split=Path(split_file).stem if split_file is not None else None,
            transform=transform,
            labelled=labelled,
        )

    def read_label(self, path: Path) -> Tensor:
        """Channel 0 (the class id) of the 16-bit label PNG as uint8 (H, W), checked to be
        < 256. The file is checked whole first (structure, CRCs, then the decompressed data:
        libpng kills the process on damage it meets) and must be 16-bit: an 8-bit one has lost
        its ids. Only the critical chunks reach the decoder."""
        png = read_png(path)
        if png.bit_depth != 16:
            raise DataError(
                f"{path} has bit depth {png.bit_depth} ({png.kind} PNG), but SYNTHIA's GT/LABELS "
                "are 16-bit (class id in channel 0): an 8-bit copy has lost the ids. Restore it "
                "from the SYNTHIA-RAND-CITYSCAPES archive; convert labels only with a 16-bit "
                "reader (cv2.IMREAD_UNCHANGED)"
            )
        png.check_pixels(path)
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders for TorchCodec, which is no
                # dependency here; nothing else installed reads 16-bit multi-channel PNGs.
                warnings.simplefilter("ignore", DeprecationWarning)
                encoded = torch.frombuffer(bytearray(png.essential()), dtype=torch.uint8)
                decoded = decode_png(encoded, ImageReadMode.UNCHANGED)
        except DecodeError as err:
            raise decode_error(path, err) from err
        class_ids = decoded[0].to(torch.int32)  # torch has no max() for uint16
        return self.check_label_values(class_ids, path).to(torch.uint8)
