"""A dataset's metadata (its ``DatasetInfo``) read through the wrappers around it (``Subset``,
``FewShot``, ``LabelShift``, ``Unlabelled``...), and the attributes derived from it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dam_lightning.data.labels import DatasetInfo
from dam_lightning.errors import DataError

__all__ = ["DatasetInfo", "InfoAttributes", "dataset_info", "unwrap"]

_RAISE: Any = object()


def unwrap(dataset) -> Iterator[Any]:
    """``dataset``, then the dataset it wraps (``.dataset``), and so on down the chain."""
    while dataset is not None:
        yield dataset
        dataset = getattr(dataset, "dataset", None)


def dataset_info(dataset, default: Any = _RAISE) -> DatasetInfo:
    """The ``info`` of ``dataset`` or of the first dataset it wraps that declares one.

    Without one, ``default`` if given, else a ``DataError`` naming the dataset.

    Example:
        >>> from torch.utils.data import Subset
        >>> from dam_lightning.data import UCIDigits
        >>> dataset_info(Subset(UCIDigits(), range(5))).num_classes
        10
        >>> dataset_info([1, 2], None) is None
        True
    """
    for layer in unwrap(dataset):
        info = getattr(layer, "info", None)
        if isinstance(info, DatasetInfo):
            return info
    if default is _RAISE:
        raise DataError(
            f"{dataset!r} declares no dataset info: give its class an `info = DatasetInfo(...)` "
            "attribute (dam_lightning.data.labels) naming its task and classes"
        )
    return default


class InfoAttributes:
    """The fields of ``self.info`` as read-only attributes (``ds.num_classes``, ``ds.classes``,
    ``ds.task``...), for the code and users that read them; ``info`` stays the one source."""

    info: DatasetInfo

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self.info.classes

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...] | None:
        return self.info.palette

    @property
    def label_ids(self) -> tuple[int, ...] | None:
        return self.info.label_ids

    @property
    def class_subsets(self) -> Mapping[str, tuple[str, ...]]:
        return self.info.class_subsets
