"""Few-shot target data (the paper's Fig. 6): N labelled images of a dataset, repeated.

``FewShot`` only chooses and repeats items; it never changes them. The choice is a seeded random
draw, not class-balanced (nor could it be for segmentation, where every image holds many
classes). It passes on the wrapped set's dataset-level metadata (its ``info``), never its
per-item attributes (``labels``, ``images``, ``item_name``: they are indexed like the wrapped
set, not like the few-shot one).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dam_lightning.data.attributes import InfoAttributes, dataset_info, unwrap
from dam_lightning.data.labels import DatasetInfo
from dam_lightning.errors import DataError, WrongTypeError


class FewShot(InfoAttributes, Dataset):
    """``num_images`` labelled items of ``dataset``, repeated cyclically to ``length`` items.

    The items are the first ``num_images`` of a random permutation of ``dataset`` drawn with
    ``seed``: random, not class-balanced (with 5 digit images some classes have none, as in a
    real few-shot labelling). For one seed the choices are nested: the 5 images of
    ``num_images=5`` are among the 10 of ``num_images=10``, so a curve over N adds images rather
    than drawing new ones. Item ``i`` is image ``indices[i % num_images]``, so every image
    appears ``length / num_images`` times (within one) per pass over the items (the training
    loader drops a last partial batch, so an epoch may serve a few items fewer); the default
    ``length`` is ``len(dataset)``, so an epoch has as many items, and a validation schedule
    counted in epochs keeps its meaning. The training sampler shuffles the repeats.

    Args:
        dataset: a labelled dataset of ``(x, y)`` items (a set with ``labelled=False`` is
            refused).
        num_images: how many distinct images, ``1 <= num_images <= len(dataset)``.
        seed: chooses the images (independent of any global RNG).
        length: number of items; default ``len(dataset)``; at least ``num_images``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.arange(100.0), torch.arange(100) % 10)
        >>> few = FewShot(base, num_images=3, seed=0, length=9)
        >>> len(few), len(set(few.indices))
        (9, 3)
        >>> [int(few[i][0]) for i in range(9)] == few.indices * 3  # item i is indices[i % 3]
        True
        >>> set(FewShot(base, 3, seed=0).indices) <= set(FewShot(base, 5, seed=0).indices)
        True
    """

    def __init__(self, dataset: Dataset, num_images: int, seed: int = 0, length: int | None = None):
        size = len(dataset)
        _check_counts(num_images, length, size)
        if any(getattr(layer, "labelled", True) is False for layer in unwrap(dataset)):
            raise DataError(
                f"FewShot needs labelled images, but {dataset!r} is unlabelled; "
                "build it with labelled=True (from a config: --data.target.init_args.labelled "
                "true)"
            )
        self.dataset, self.num_images, self.seed = dataset, num_images, seed
        self.length = size if length is None else length
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        self.indices: list[int] = order[:num_images].tolist()
        """The chosen items of ``dataset``, in the order they repeat."""

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        return self.dataset[self.indices[index % self.num_images]]

    @property
    def info(self) -> DatasetInfo | None:
        """The wrapped set's ``info`` (``few.classes``, ``few.num_classes``... derive from it);
        None when it declares none."""
        return dataset_info(self.dataset, None)

    def __getattr__(self, name: str):
        # Only called for names the instance lacks; guarded so unpickling (DataLoader workers
        # under spawn) never recurses before ``dataset`` is set.
        dataset = self.__dict__.get("dataset")
        if dataset is not None and name == "eval_view" and hasattr(dataset, "eval_view"):
            return self._eval_view
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _eval_view(self) -> FewShot:
        """The same images through the wrapped set's ``eval_view()`` (no random augmentation)."""
        view = FewShot.__new__(FewShot)
        view.__dict__.update(self.__dict__, dataset=self.dataset.eval_view())
        return view

    def __repr__(self) -> str:
        return (
            f"FewShot({self.dataset!r}, num_images={self.num_images}, seed={self.seed}, "
            f"length={self.length})"
        )


def _check_counts(num_images, length, size: int) -> None:
    """Refuse a number of images the dataset cannot give, naming the value, the size and the fix."""
    if isinstance(num_images, bool) or not isinstance(num_images, int):
        raise WrongTypeError(f"num_images must be a whole number of images, got {num_images!r}")
    if not 1 <= num_images <= size:
        raise DataError(
            f"num_images={num_images} but the dataset has {size} images: choose 1 <= num_images "
            f"<= {size} (N = 0, no fine-tuning, is the starting network itself: validate its "
            "checkpoint with the config that trained it)"
        )
    if length is not None and (isinstance(length, bool) or length < num_images):
        raise DataError(
            f"length={length} is shorter than num_images={num_images}: some chosen images would "
            f"never be served; pass length >= {num_images} (default: len(dataset) = {size})"
        )
