"""The data of a domain-adaptation run: labelled source, unlabelled target, evaluation sets.

Training batches are ``{"source": (x_s, y_s), "target": x_t}`` (a CombinedLoader in
``max_size_cycle`` mode); target labels are dropped before they reach any training code.
Validation/test loaders are ``[target, source?]``. Datasets are built elsewhere (``digits.py``).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

DOMAINS = ("source", "target")


class Unlabelled(Dataset):
    """A view of a labelled dataset that returns only the input: target labels never train."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch, pass within the epoch).

    Unlike ``shuffle=True`` it does not draw from the global RNG, so a run resumed from a
    checkpoint sees exactly the batches the uninterrupted run would have seen. Lightning calls
    ``set_epoch`` on it at every epoch; a loader cycled within an epoch gets a new order per pass.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self._passes = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._passes = epoch, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        seed = (self.seed * 1_000_003 + self.epoch) * 1_009 + self._passes
        generator = torch.Generator().manual_seed(seed)
        self._passes += 1
        return iter(torch.randperm(self.size, generator=generator).tolist())


class DomainAdaptationDataModule(L.LightningDataModule):
    """Source and target datasets for SourceModule and GAMAdaptModule.

    Args:
        source: labelled source training set (items ``(x, y)``).
        target: target training set; its labels are dropped (items become ``x``).
        target_val: labelled target evaluation set; default ``target`` itself (the transductive
            protocol of the paper's digits code: evaluate on the images adapted to).
        source_val: optional labelled source evaluation set (reported as ``val/source/*``).
        target_test: set for ``test``; default ``target_val``.
        batch_size: source batch size (and target, unless ``target_batch_size`` is given).
        target_batch_size: target batch size; default ``batch_size``.
        eval_batch_size: batch size for validation/test/prediction; default ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffles and the choice of calibration batches.

    The training loaders served depend on the LightningModule: ``SourceModule`` declares
    ``train_domains = ("source",)``, ``GAMAdaptModule`` both domains.

    Example:
        >>> from dam_lightning.data.digits import SynDigits
        >>> dm = DomainAdaptationDataModule(SynDigits(100, seed=0), SynDigits(50, seed=1),
        ...                                 batch_size=10)
        >>> dm.num_classes, len(dm.source_dataloader())
        (10, 10)
    """

    def __init__(
        self,
        source: Dataset,
        target: Dataset,
        target_val: Dataset | None = None,
        source_val: Dataset | None = None,
        target_test: Dataset | None = None,
        batch_size: int = 128,
        target_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.source, self.target = source, target
        self.target_val = target_val if target_val is not None else target
        self.source_val = source_val
        self.target_test = target_test if target_test is not None else self.target_val
        self.batch_sizes = {
            "source": batch_size,
            "target": target_batch_size or batch_size,
            "eval": eval_batch_size or batch_size,
        }
        self.num_workers, self.seed = num_workers, seed
        self._check_datasets()

    def _check_datasets(self) -> None:
        for role in ("source", "target", "target_val", "source_val", "target_test"):
            dataset = getattr(self, role)
            if dataset is not None and len(dataset) == 0:
                raise ValueError(f"the {role} dataset ({dataset!r}) is empty")
        counts = {r: _num_classes(getattr(self, r)) for r in ("source", "target", "target_val")}
        if len({c for c in counts.values() if c is not None}) > 1:
            raise ValueError(f"the datasets disagree on the number of classes: {counts}")

    @property
    def num_classes(self) -> int:
        """Number of classes, read from the source dataset's ``num_classes``."""
        n = _num_classes(self.source)
        if n is None:
            raise ValueError(
                f"the source dataset {self.source!r} has no num_classes attribute; "
                "set model.init_args.num_classes explicitly"
            )
        return n

    def _loader(self, dataset: Dataset, batch_size: int, shuffle_seed: int | None) -> DataLoader:
        if shuffle_seed is not None:
            sampler = EpochShuffleSampler(len(dataset), shuffle_seed)
        elif dist.is_available() and dist.is_initialized():
            # Lightning's default evaluation sampler pads the last rank with repeated images,
            # which would count them twice; this one splits the set without repeats.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        else:
            sampler = None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle_seed is not None and len(dataset) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def source_dataloader(self) -> DataLoader:
        """Shuffled labelled source batches (also used to train F_s inside a GAM run)."""
        return self._loader(self.source, self.batch_sizes["source"], self.seed)

    def target_dataloader(self) -> DataLoader:
        """Shuffled unlabelled target batches (inputs only)."""
        return self._loader(Unlabelled(self.target), self.batch_sizes["target"], self.seed + 1)

    def train_dataloader(self) -> dict[str, DataLoader]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        domains = getattr(module, "train_domains", DOMAINS)
        loaders = {"source": self.source_dataloader, "target": self.target_dataloader}
        return {domain: loaders[domain]() for domain in domains}

    def val_dataloader(self) -> list[DataLoader]:
        sets = [self.target_val] + ([self.source_val] if self.source_val is not None else [])
        return [self._loader(d, self.batch_sizes["eval"], None) for d in sets]

    def test_dataloader(self) -> list[DataLoader]:
        sets = [self.target_test] + ([self.source_val] if self.source_val is not None else [])
        return [self._loader(d, self.batch_sizes["eval"], None) for d in sets]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.target_test, self.batch_sizes["eval"], None)

    def calibration_batches(
        self, domain: str, num_batches: int, rank: int = 0, world_size: int = 1
    ) -> list[torch.Tensor]:
        """Input batches for Gaussian matching: a fixed random subset of the training images.

        The subset depends only on ``seed`` (the same at every epoch, so statistics are
        comparable and a resumed run matches). Under DDP each rank takes its own batches.
        """
        dataset = {"source": self.source, "target": Unlabelled(self.target)}[domain]
        batch_size = self.batch_sizes[domain]
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        batches = []
        for b in range(rank, num_batches * world_size, world_size):
            indices = order[b * batch_size : (b + 1) * batch_size].tolist()
            if not indices:
                break
            items = [dataset[i] for i in indices]
            batches.append(torch.stack([x[0] if isinstance(x, tuple) else x for x in items]))
        if not batches:
            raise ValueError(
                f"no {domain} calibration batch for rank {rank}: the {domain} set has "
                f"{len(dataset)} images, fewer than world_size x batch size"
            )
        return batches


def _num_classes(dataset: Dataset | None) -> int | None:
    return getattr(dataset, "num_classes", None)
