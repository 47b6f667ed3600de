"""A fixed random part of a dataset: one side of a seeded split into two disjoint parts.

The paper's "supervised on target" row trains on the labels of a random half of the target
images and scores the other half; ``RandomPart(..., part="train")`` and ``part="held_out"`` with
the same ``fraction`` and ``seed`` are those two halves, so both can be named in a config. It
only chooses items; it never changes them, and passes on the wrapped set's ``info``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import Dataset

from dam_lightning.data.attributes import InfoAttributes, dataset_info
from dam_lightning.data.labels import DatasetInfo
from dam_lightning.errors import DataError

Part = Literal["train", "held_out"]


class RandomPart(InfoAttributes, Dataset):
    """The ``train`` or ``held_out`` part of ``dataset``, split at random with ``seed``.

    A permutation of the items is drawn with ``seed`` (independent of any global RNG); its first
    ``round(fraction * len(dataset))`` items are the ``train`` part, in that order, the rest
    the ``held_out`` part. The two parts of one ``(fraction, seed)`` are disjoint and together
    hold every item once.

    Args:
        dataset: any dataset (labelled or not).
        part: ``"train"`` or ``"held_out"``.
        fraction: the share of the items in the ``train`` part, in (0, 1).
        seed: chooses the split.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.arange(10.0), torch.arange(10) % 2)
        >>> train = RandomPart(base, "train", fraction=0.5, seed=0)
        >>> held_out = RandomPart(base, "held_out", fraction=0.5, seed=0)
        >>> len(train), len(held_out), sorted(train.indices + held_out.indices) == list(range(10))
        (5, 5, True)
    """

    def __init__(
        self, dataset: Dataset, part: Part = "train", fraction: float = 0.5, seed: int = 0
    ):
        if part not in ("train", "held_out"):
            raise DataError(f"part must be 'train' or 'held_out', got {part!r}")
        if isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
            raise DataError(
                f"fraction must be strictly between 0 and 1 (the train part's share), got "
                f"{fraction!r}; e.g. 0.5 for the paper's halves"
            )
        size = len(dataset)
        cut = round(fraction * size)
        if not 0 < cut < size:
            empty = "train" if cut == 0 else "held_out"
            raise DataError(
                f"fraction={fraction} of {size} items leaves the {empty} part empty: choose a "
                f"fraction between {1 / size:.3g} and {1 - 1 / size:.3g}"
            )
        self.dataset, self.part, self.fraction, self.seed = dataset, part, fraction, seed
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        self.indices: list[int] = order[:cut] if part == "train" else order[cut:]
        """The items of ``dataset`` in this part, in the order they are served."""

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    @property
    def info(self) -> DatasetInfo | None:
        """The wrapped set's ``info`` (classes, task...); None when it declares none."""
        return dataset_info(self.dataset, None)

    def __repr__(self) -> str:
        return (
            f"RandomPart({self.dataset!r}, part={self.part!r}, fraction={self.fraction}, "
            f"seed={self.seed})"
        )
