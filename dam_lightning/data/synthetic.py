"""Random stand-ins for a configured dataset that is not on disk yet: what ``preflight
--synthetic true`` measures with (the cost of a run, never its accuracy). Items have the shape,
dtype, classes and labelled-ness the real dataset's items would have; nothing is read from disk.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dam_lightning.data.attributes import InfoAttributes, dataset_info
from dam_lightning.data.labels import DatasetInfo
from dam_lightning.data.transforms import SegmentationTransform
from dam_lightning.errors import ConfigError

__all__ = ["SyntheticLike", "dataset_class", "synthetic_item_shape"]

DIGIT_SHAPE = (1, 28, 28)  # every DigitDataset item (digits.py checks it)
DISTINCT_ITEMS = 4  # items are cycled: making one costs time the real loader is not charged


def dataset_class(class_path: str) -> type:
    """The dataset class a config's ``class_path`` names."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"synthetic data: cannot import the dataset class {class_path!r}"
        ) from None


def synthetic_item_shape(class_path: str, transform: dict | None = None) -> tuple[int, ...]:
    """(C, H, W) of one training input of ``class_path`` with ``transform`` (its init args):
    a segmentation set's ``crop_size`` when it augments, else its ``size``; a digit set's
    (1, 28, 28).

    Example:
        >>> synthetic_item_shape("dam_lightning.data.GTA5", {"size": [64, 128]})
        (3, 64, 128)
        >>> synthetic_item_shape("dam_lightning.data.MNIST")
        (1, 28, 28)
    """
    info = dataset_info(dataset_class(class_path), None)
    if info is None:
        raise ConfigError(
            f"synthetic data: {class_path} declares no DatasetInfo, so its items' shape and "
            "classes are unknown; run preflight on the real data (leave --synthetic out)"
        )
    if info.task == "classification":
        return DIGIT_SHAPE
    settings = SegmentationTransform(**(transform or {}))
    size = settings.crop_size if settings.train_augment and settings.crop_size else settings.size
    if size is None:
        raise ConfigError(
            f"synthetic data: {class_path} keeps its files' resolution (transform.size: null); "
            "give transform.size so preflight knows the input size"
        )
    return (3, *size)


class SyntheticLike(InfoAttributes, Dataset):
    """``length`` random items shaped like ``like``'s (a dataset class path), with its
    ``DatasetInfo``: normal images and uniformly random labels in ``[0, num_classes)``.

    Args:
        like: the class path of the dataset it stands in for, e.g. ``dam_lightning.data.GTA5``.
        shape: one input's (C, H, W) (``synthetic_item_shape``).
        length: number of items.
        labelled: items are ``(image, label)`` when True, the image alone when False.
        seed: the items depend only on it.

    Example:
        >>> ds = SyntheticLike("dam_lightning.data.GTA5", (3, 8, 16), length=5)
        >>> x, y = ds[4]
        >>> len(ds), tuple(x.shape), y.dtype, ds.num_classes
        (5, (3, 8, 16), torch.uint8, 19)
    """

    def __init__(
        self,
        like: str,
        shape: tuple[int, ...],
        length: int = 64,
        labelled: bool = True,
        seed: int = 0,
    ):
        self.like, self.shape, self.length, self.labelled = like, tuple(shape), length, labelled
        self.info: DatasetInfo = dataset_info(dataset_class(like))
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(DISTINCT_ITEMS, *self.shape, generator=g)
        label_shape = (DISTINCT_ITEMS, *self.shape[1:]) if self.task == "segmentation" else (4,)
        # uint8 segmentation masks, as the real sets deliver them (int64 on the device)
        dtype = torch.uint8 if self.task == "segmentation" else torch.int64
        self.labels = torch.randint(0, self.num_classes, label_shape, generator=g, dtype=dtype)

    @property
    def name(self) -> str:
        return f"Synthetic({self.like.rpartition('.')[2]})"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"{self.name} has {self.length} items, not {index + 1}")
        image = self.images[index % DISTINCT_ITEMS]
        return (image, self.labels[index % DISTINCT_ITEMS]) if self.labelled else image

    def __repr__(self) -> str:
        return f"{self.name}(shape={self.shape}, length={self.length})"
