"""Label shift (paper, Table 2): a view of a labelled dataset with part of some classes removed.

"odd" drops a fraction of every odd digit's images, "even" of every even digit's. The images
kept are a deterministic function of the seed. Works with any dataset of ``(x, y)`` items; its
``info`` is read through the view (``attributes.dataset_info``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import Dataset

from dam_lightning.errors import DataError


class LabelShift(Dataset):
    """Remove ``fraction`` of the images of the odd (or even) classes of ``dataset``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.zeros(20, 1), torch.arange(20) % 10)
        >>> len(LabelShift(base, drop="odd", fraction=0.5, seed=0))
        15
    """

    def __init__(
        self,
        dataset: Dataset,
        drop: Literal["odd", "even"] = "odd",
        fraction: float = 0.5,
        seed: int = 0,
    ):
        if drop not in ("odd", "even"):
            raise DataError(f"drop must be 'odd' or 'even', got {drop!r}")
        if not 0.0 <= fraction <= 1.0:
            raise DataError(f"fraction must be in [0, 1], got {fraction}")
        self.dataset, self.drop, self.fraction = dataset, drop, fraction
        self.indices = self._kept_indices(seed)

    def _labels(self) -> torch.Tensor:
        labels = getattr(self.dataset, "labels", None)
        if labels is None:
            labels = torch.tensor([int(self.dataset[i][1]) for i in range(len(self.dataset))])
        return torch.as_tensor(labels)

    def _kept_indices(self, seed: int) -> list[int]:
        labels = self._labels()
        parity = 1 if self.drop == "odd" else 0
        generator = torch.Generator().manual_seed(seed)
        dropped: list[int] = []
        for label in labels.unique().tolist():
            if label % 2 != parity:
                continue
            members = (labels == label).nonzero().flatten()
            order = members[torch.randperm(len(members), generator=generator)]
            dropped += order[: round(self.fraction * len(members))].tolist()
        dropped_set = set(dropped)
        return [i for i in range(len(labels)) if i not in dropped_set]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def __repr__(self) -> str:
        return f"LabelShift({self.dataset!r}, drop={self.drop}, fraction={self.fraction})"
