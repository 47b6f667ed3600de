"""Cityscapes in its released layout (leftImg8bit/ + gtFine/ labelIds PNGs), the target domain.

Only says where the files are and which table maps them; decoding, transforms and checks live in
``segmentation.py``. Never reads ``*_labelTrainIds.png`` or colour PNGs, and an unlabelled set
never opens gtFine/ at all.
"""

from __future__ import annotations

from pathlib import Path

from dam_lightning.data.segmentation import (
    LabelSize,
    SegmentationDataset,
    check_root,
    files_by_name,
    no_files_error,
    pair_by_name,
)
from dam_lightning.data.transforms import SegmentationTransform

__all__ = ["Cityscapes"]

IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


class Cityscapes(SegmentationDataset):
    """Cityscapes ``split`` ("train", "val" or "test"), items in sorted (city, frame) order.

    Files: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``, labelIds mapped to the
    19 trainIds. Item names are ``"<city>/<city>_<seq>_<frame>"``. Defaults follow the split:
    labels at ``transform.size`` for "train", at file resolution (2048x1024) for "val"/"test"
    (unless ``transform.label_size`` says otherwise); "test" is unlabelled (its public labels
    are all void). See ``SegmentationDataset`` for the arguments.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for folder, suffix in [("leftImg8bit", IMAGE_SUFFIX), ("gtFine", LABEL_SUFFIX)]:
        ...     (root / folder / "val" / "ulm").mkdir(parents=True)
        ...     image = Image.fromarray(np.full((8, 16), 26, np.uint8)).convert("RGB")
        ...     (image if folder == "leftImg8bit" else image.convert("L")).save(
        ...         root / folder / "val" / "ulm" / f"ulm_000000_000019{suffix}")
        >>> ds = Cityscapes(root, "val", SegmentationTransform(size=(4, 8)))
        >>> ds, ds.name, ds.item_name(0)
        (Cityscapes(split='val', size=(4, 8), images=1), 'Cityscapes-val', 'ulm/ulm_000000_000019')
        >>> image, label = ds[0]  # label at file resolution; labelId 26 (car) is trainId 13
        >>> tuple(image.shape), tuple(label.shape), label.unique().tolist()
        ((3, 4, 8), (8, 16), [13])
        >>> Cityscapes("../shared/data/cityscapes", "val")  # doctest: +SKIP
        Cityscapes(split='val', size=(512, 1024), images=500)
    """

    label_hint = (
        "Cityscapes labelIds run 0..33; expected the *_gtFine_labelIds.png files, not "
        "*_gtFine_labelTrainIds.png, *_gtFine_instanceIds.png or *_gtFine_color.png"
    )

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        transform: SegmentationTransform = SegmentationTransform(),
        labelled: bool | None = None,
    ):
        root = check_root(
            root, "Cityscapes", "data.target.init_args.root", "leftImg8bit/ and gtFine/"
        )
        labelled = split != "test" if labelled is None else labelled
        image_pattern = f"leftImg8bit/{split}/*/*{IMAGE_SUFFIX}"
        images = files_by_name(root, image_pattern, IMAGE_SUFFIX, keep_folder=True)
        if not images:
            found = sorted(p.name for p in (root / "leftImg8bit").glob("*") if p.is_dir())
            raise no_files_error(
                "Cityscapes", root, image_pattern,
                f"check root and split (splits found under leftImg8bit/: {found or 'none'})",
            )  # fmt: skip
        names, labels = sorted(images), None
        if labelled:
            label_pattern = f"gtFine/{split}/*/*{LABEL_SUFFIX}"
            label_files = files_by_name(root, label_pattern, LABEL_SUFFIX, keep_folder=True)
            fix = "Restore the missing files, or pass labelled=False for an unlabelled set."
            pair_by_name("Cityscapes", images, label_files, image_pattern, label_pattern, fix)
            labels = [label_files[name] for name in names]
        super().__init__(
            [images[name] for name in names],
            labels,
            names,
            split=split,
            transform=transform,
            labelled=labelled,
        )

    def default_label_size(self, split: str | None) -> LabelSize:
        """``"input"`` for "train"; "val" and "test" are scored at label resolution."""
        return "input" if split == "train" else "native"
