"""Class tables: the single source of truth for class names, id maps and palettes.

Every dataset, metric, prediction writer and figure reads its classes from here; nothing else
defines a class list. A dataset family declares what its labels mean as one ``DatasetInfo``
class attribute, ``info`` (one of the ``*_INFO`` tables below); ``attributes.dataset_info``
reads it through wrappers. Id maps are 256-entry lookup tables applied with one indexing operation
(``lut[label]``), never a Python loop over classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from dam_lightning.errors import DataError

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
"""The ten digit classes shared by MNIST, USPS, SynDigits and UCIDigits; index == digit."""

DIGIT_SCENE_CLASSES: tuple[str, ...] = (*DIGIT_CLASSES, "background")
"""The 11 classes of a ``DigitScenes`` scene: index == digit for 0..9, then the background (10)."""

DIGIT_SCENE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 255, 255),
    (64, 64, 64),
)  # fmt: skip
"""RGB per digit-scene class: matplotlib's tab10 for the digits (white for 9), dark grey for the
background (ignored rim pixels are black in colour masks)."""

IGNORE_INDEX = 255
"""Label value of pixels that are neither trained on nor scored (Cityscapes' trainId 255)."""

# ---- Cityscapes (the target domain of the segmentation benchmarks) -------------------------------

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
"""The 19 evaluated Cityscapes classes, in trainId order (index == trainId)."""

CITYSCAPES_LABEL_IDS: tuple[int, ...] = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
)  # fmt: skip
"""The Cityscapes labelId of each trainId (``CITYSCAPES_LABEL_IDS[train_id]``); every other
labelId (void, ground, parking, guard rail, ...) is ignored (trainId 255)."""

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
"""The official Cityscapes colour of each trainId (RGB)."""

IGNORE_COLOUR = (0, 0, 0)
"""Colour of ignored pixels (trainId 255) in colour masks."""

SYNTHIA_TO_CITYSCAPES: dict[int, int] = {
    1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6,
    17: 12, 19: 15, 21: 3,
}  # fmt: skip
"""SYNTHIA-RAND-CITYSCAPES class id -> Cityscapes trainId (16 classes); all others ignored."""

SYNTHIA_16_CLASSES: tuple[str, ...] = tuple(
    c for c in CITYSCAPES_CLASSES if c not in ("terrain", "truck", "train")
)
"""The 16 classes SYNTHIA -> Cityscapes is scored on: the 19 without terrain, truck, train."""

SYNTHIA_13_CLASSES: tuple[str, ...] = tuple(
    c for c in SYNTHIA_16_CLASSES if c not in ("wall", "fence", "pole")
)
"""The 13-class SYNTHIA protocol: the 16 without wall, fence and pole."""


def lookup_table(mapping: Mapping[int, int], size: int = 256, fill: int = IGNORE_INDEX) -> Tensor:
    """A ``size``-entry int64 table with ``table[k] = mapping[k]`` and ``fill`` elsewhere.

    Example:
        >>> lut = lookup_table({7: 0, 8: 1})
        >>> lut[torch.tensor([[7, 8], [0, 33]])].tolist()
        [[0, 1], [255, 255]]
    """
    table = torch.full((size,), fill, dtype=torch.int64)
    for key, value in mapping.items():
        if not 0 <= key < size:
            raise DataError(f"id {key} does not fit a {size}-entry lookup table")
        table[key] = value
    return table


CITYSCAPES_ID_TO_TRAIN_ID: Tensor = lookup_table(
    {label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS)}
)
"""Cityscapes labelId -> trainId (GTA5 labels hold Cityscapes labelIds too)."""

TRAIN_ID_TO_CITYSCAPES_ID: Tensor = lookup_table(dict(enumerate(CITYSCAPES_LABEL_IDS)), fill=0)
"""trainId -> Cityscapes labelId, for PNGs the Cityscapes benchmark accepts (255 -> 0, void)."""

SYNTHIA_ID_TO_TRAIN_ID: Tensor = lookup_table(SYNTHIA_TO_CITYSCAPES)
"""SYNTHIA class id -> Cityscapes trainId."""


def class_indices(subset: tuple[str, ...] | list[str], classes: tuple[str, ...]) -> list[int]:
    """Indices of the ``subset`` class names in ``classes``, refusing unknown names.

    Example:
        >>> class_indices(["sky", "road"], CITYSCAPES_CLASSES)
        [10, 0]
    """
    unknown = [name for name in subset if name not in classes]
    if unknown:
        raise DataError(f"unknown class names {unknown}; the classes are {list(classes)}")
    return [classes.index(name) for name in subset]


def colour_table(
    palette: tuple[tuple[int, int, int], ...] = CITYSCAPES_PALETTE,
) -> Tensor:
    """A (256, 3) uint8 table: ``colour_table()[train_ids]`` colours a mask, 255 -> black.

    Example:
        >>> colour_table()[torch.tensor([0, 255])].tolist()
        [[128, 64, 128], [0, 0, 0]]
    """
    table = torch.tensor([IGNORE_COLOUR] * 256, dtype=torch.uint8)
    table[: len(palette)] = torch.tensor(palette, dtype=torch.uint8)
    return table


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's labels mean: the one class attribute ``info`` of a dataset family
    (mmsegmentation's ``METAINFO`` in spirit), read through wrappers by
    ``attributes.dataset_info``. Subclasses inherit it; a family that differs replaces it
    (``dataclasses.replace(CITYSCAPES_INFO, class_subsets=...)``).

    Example:
        >>> info = DatasetInfo("segmentation", 2, ("road", "sky"), ((0, 0, 0), (9, 9, 9)))
        >>> info.num_classes, info.classes, info.ignore_index
        (2, ('road', 'sky'), 255)
        >>> DatasetInfo("classification", 3, ("a", "b"))
        Traceback (most recent call last):
        ...
        dam_lightning.errors.DataError: DatasetInfo: 2 class names for num_classes=3: ('a', 'b')
    """

    task: Literal["classification", "segmentation"]
    """What a label is: one class per image, or one class per pixel."""
    num_classes: int
    """Number of classes; labels run ``0..num_classes-1`` (and ``ignore_index``)."""
    classes: tuple[str, ...] | None = None
    """Class names in label order (``classes[i]`` names label ``i``); None: unnamed."""
    palette: tuple[tuple[int, int, int], ...] | None = None
    """RGB colour of each class for masks and overlays; None: a default palette."""
    label_ids: tuple[int, ...] | None = None
    """The dataset-native id of each class, written into prediction PNGs (None: class ids)."""
    class_subsets: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    """Named class subsets a benchmark also reports by their own mean (SYNTHIA's 16 and 13)."""
    ignore_index: int = IGNORE_INDEX
    """Label value of pixels that are neither trained on nor scored."""

    def __post_init__(self):
        if self.task not in ("classification", "segmentation"):
            raise DataError(
                f"DatasetInfo: task must be 'classification' or 'segmentation', got {self.task!r}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise DataError(f"DatasetInfo: num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise DataError(f"DatasetInfo: num_classes must be at least 1, got {self.num_classes}")
        normalised = {  # tuples, whatever sequences were given
            "classes": None if self.classes is None else tuple(self.classes),
            "palette": None if self.palette is None else tuple(tuple(c) for c in self.palette),
            "label_ids": None if self.label_ids is None else tuple(self.label_ids),
            "class_subsets": {k: tuple(v) for k, v in self.class_subsets.items()},
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        for name in ("classes", "label_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_classes:
                what = "class names" if name == "classes" else "label_ids"
                raise DataError(
                    f"DatasetInfo: {len(value)} {what} for num_classes={self.num_classes}: {value}"
                )
        if self.palette is not None and len(self.palette) < self.num_classes:
            raise DataError(
                f"DatasetInfo: {len(self.palette)} palette colours for {self.num_classes} classes"
            )
        for name, subset in self.class_subsets.items():
            if self.classes is None:
                raise DataError(f"DatasetInfo: class_subsets[{name!r}] needs named classes")
            class_indices(subset, self.classes)


DIGITS_INFO = DatasetInfo("classification", len(DIGIT_CLASSES), DIGIT_CLASSES)
"""MNIST, USPS, SynDigits, UCIDigits: ten digit classes, one per image."""

DIGIT_SCENES_INFO = DatasetInfo(
    "segmentation", len(DIGIT_SCENE_CLASSES), DIGIT_SCENE_CLASSES, DIGIT_SCENE_PALETTE
)
"""DigitScenes: the ten digits and the background, per pixel."""

CITYSCAPES_INFO = DatasetInfo(
    "segmentation",
    len(CITYSCAPES_CLASSES),
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    CITYSCAPES_LABEL_IDS,
)
"""Cityscapes and every set mapped to its 19 trainIds (GTA5): predictions as labelIds."""

SYNTHIA_INFO = replace(
    CITYSCAPES_INFO, class_subsets={"16": SYNTHIA_16_CLASSES, "13": SYNTHIA_13_CLASSES}
)
"""SYNTHIA: Cityscapes' 19 trainIds, scored on its 16- and 13-class subsets, each in both
conventions of the literature (``miou_16``: the subset's 19-class IoUs, every scored pixel
counting; ``miou_16_subset_only``: only pixels labelled with a subset class scored; see
``dam_lightning.metrics.segmentation_scores``)."""
