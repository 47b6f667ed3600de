"""The data of a domain-adaptation run: labelled source, unlabelled target, evaluation sets.

Training batches are ``{"source": (x_s, y_s), "target": x_t}`` (a CombinedLoader in
``max_size_cycle`` mode); target labels are dropped before they reach any training code.
Validation/test loaders are ``[target, source?]``. Datasets are built elsewhere (``digits.py``).
"""

from __future__ import annotations

import os
import warnings
from typing import Protocol

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from dam_lightning.data.attributes import dataset_info
from dam_lightning.data.few_shot import FewShot
from dam_lightning.data.segmentation import SegmentationDataset
from dam_lightning.errors import ConfigError, WrongTypeError

DOMAINS = ("source", "target")


class FedModule(Protocol):
    """What ``DomainAdaptationDataModule`` asks of the LightningModule it feeds: the one seam
    between them (``SourceModule`` and ``GAMAdaptModule`` inherit both from ``EvaluatingModule``).

    Attributes:
        train_domains: the domains whose batches its training reads, from ``DOMAINS``: the
            training loaders are exactly these (a SourceModule reads ``("source",)``).
        uses_source_labels: whether this fit's training reads source labels; when it does not
            (GAM adapting from a finished F_s) the source loader serves images alone, so no
            label is decoded for nothing.
    """

    train_domains: tuple[str, ...]
    uses_source_labels: bool


class Unlabelled(Dataset):
    """A view of a dataset that returns only the input: target labels never train.

    Items may be an image tensor (an unlabelled set, e.g. ``Cityscapes(labelled=False)``) or an
    ``(image, label)`` tuple or list; anything else is refused with a message.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = _without_labels(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return input_of(self.dataset[index], self.dataset)


def _without_labels(dataset: Dataset) -> Dataset:
    """``dataset`` with its label files never read where it can say so (a segmentation set,
    also inside a ``Subset``): a dropped label costs its decoding for nothing."""
    if isinstance(dataset, SegmentationDataset):
        return dataset.without_labels()
    if isinstance(dataset, Subset):
        return Subset(_without_labels(dataset.dataset), dataset.indices)
    return dataset


def input_of(item, dataset=None) -> torch.Tensor:
    """The input of one dataset item: the item itself if it is a tensor, else ``item[0]`` of an
    ``(x, y)`` tuple or list.

    Example:
        >>> input_of((torch.zeros(2), 1)).shape, input_of(torch.ones(3)).shape
        (torch.Size([2]), torch.Size([3]))
    """
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and torch.is_tensor(item[0]):
        return item[0]
    while isinstance(dataset, (Subset, Unlabelled)):  # name the dataset of the config
        dataset = dataset.dataset
    raise WrongTypeError(
        f"{dataset!r} returned a {type(item).__name__} item; a domain-adaptation dataset must "
        "return an image tensor or an (image, label) tuple or list"
    )


class EpochShuffleSampler(DistributedSampler):
    """A random permutation that depends only on (seed, epoch, pass within the epoch), each
    DDP rank taking its own share, and that can start in the middle of an epoch.

    Unlike ``shuffle=True`` it does not draw from the global RNG, so a resumed run sees exactly
    the batches the uninterrupted run would have seen. Lightning calls ``set_epoch`` at every
    epoch; a loader cycled within an epoch (the shorter domain) gets a new order per pass. With
    ``world_size > 1`` it yields only this ``rank``'s share of each permutation (every rank the
    same number of indices); it derives from ``DistributedSampler`` so that Lightning uses it
    as it is instead of wrapping it (rank and world size default to the process group's).
    ``resume_at(epoch, batches, batch_size)`` (from a mid-epoch checkpoint) makes epoch
    ``epoch`` start after its first ``batches`` batches: the pass and position they reached.

    Example:
        >>> sampler = EpochShuffleSampler(6, seed=0)
        >>> first, second = list(sampler), list(sampler)  # two passes, two orders
        >>> sampler.set_epoch(0); list(sampler) == first
        True
        >>> shares = [list(EpochShuffleSampler(6, 0, rank=r, world_size=2)) for r in (0, 1)]
        >>> sorted(shares[0] + shares[1]) == list(range(6))
        True
        >>> sampler.resume_at(0, batches=4, batch_size=2)  # 6 indices = 3 batches of 2 a pass
        >>> sampler.set_epoch(0); list(sampler) == second[2:]  # pass 1, after its first batch
        True
    """

    def __init__(
        self, size: int, seed: int, rank: int | None = None, world_size: int | None = None
    ):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = world_size or (dist.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..{world_size - 1}")
        # DistributedSampler's own state is not used: only its type tells Lightning not to wrap.
        self.num_replicas, self.rank, self.world_size = world_size, rank, world_size
        self.size, self.seed = size, seed
        self.epoch, self._passes, self._skip = 0, 0, 0
        self._resume: tuple[int, int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._passes, self._skip = epoch, 0, 0
        if self._resume is not None and self._resume[0] == epoch:
            _, batches, batch_size = self._resume
            per_pass = max(len(self) // batch_size, 1)  # the loaders drop a last partial batch
            self._passes, self._skip = divmod(batches, per_pass)
            self._skip *= batch_size
        self._resume = None

    def resume_at(self, epoch: int, batches: int, batch_size: int) -> None:
        """Start epoch ``epoch`` after ``batches`` batches of ``batch_size`` (applied by the
        ``set_epoch(epoch)`` that Lightning calls when the resumed epoch starts)."""
        self._resume = (epoch, batches, batch_size)

    def __len__(self) -> int:
        return self.size // self.world_size if self.world_size > 1 else self.size

    def __iter__(self):
        seed = (self.seed * 1_000_003 + self.epoch) * 1_009 + self._passes
        generator = torch.Generator().manual_seed(seed)
        self._passes += 1
        order = torch.randperm(self.size, generator=generator)
        if self.world_size > 1:
            order = order[: len(self) * self.world_size][self.rank :: self.world_size]
        skip, self._skip = self._skip, 0
        return iter(order[skip:].tolist())


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
        num_workers: DataLoader worker processes; default (None): on a GPU, the CPUs this
            process may use shared among the devices, one left to the training process (at
            most 8), on the CPU 0 (the cores train). Loaders pin their batches on a GPU.
        seed: seeds the training shuffles and the choice of calibration batches.
        few_shot: few-shot fine-tuning on the target (the paper's Fig. 6): the labelled training
            set becomes ``FewShot(target, few_shot, few_shot_seed)``, this many labelled images
            of the *target training set* (repeated to ``len(target)`` items), instead of the
            source set. For ``SourceModule`` only (a GAM run, which needs the source domain, is
            refused). Class names, task and number of classes still come from the source set
            (which must agree with the target's). Validation and test are unchanged: note that
            where ``target_val`` is ``target`` (the transductive digits protocol), the N
            labelled images are among the scored ones.
        few_shot_seed: chooses the ``few_shot`` images (nested: the images of a smaller N are
            among those of a larger one for the same seed).
        few_shot_with_source: with ``few_shot``, train on the source set *and* the N target
            images, these repeated to as many items as the source set (so about half of each
            batch): the source labels keep every class in view. Fine-tuning on a handful of
            target images alone forgets the classes they lack (measured on MNIST -> USPS:
            docs/results/few_shot.md).

    The training loaders served depend on the LightningModule: ``SourceModule`` declares
    ``train_domains = ("source",)``, ``GAMAdaptModule`` both domains. ``labelled_train`` is
    the labelled set the "source" loader serves (``source``, or the few-shot target images).

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
        num_workers: int | None = None,
        seed: int = 0,
        few_shot: int | None = None,
        few_shot_seed: int = 0,
        few_shot_with_source: bool = False,
    ):
        super().__init__()
        _check_sizes(batch_size, target_batch_size, eval_batch_size, num_workers)
        self.source, self.target = source, target
        self.few_shot, self.few_shot_seed = few_shot, few_shot_seed
        self._resume: tuple[int, int] | None = None  # (epoch, batches) of a mid-epoch checkpoint
        self.few_shot_with_source = few_shot_with_source
        self.target_val = target_val if target_val is not None else target
        self.source_val = source_val
        self.target_test = target_test if target_test is not None else self.target_val
        self.batch_sizes = {
            "source": batch_size,
            "target": target_batch_size or batch_size,
            "eval": eval_batch_size or batch_size,
        }
        self.workers_setting, self.seed = num_workers, seed
        self._check_datasets()
        self.labelled_train = self._labelled_training_set()

    def _labelled_training_set(self) -> Dataset:
        """What the "source" training loader serves: the source set, or with ``few_shot`` that
        many labelled target images (with ``few_shot_with_source``: beside the source set)."""
        if self.few_shot is None:
            return self.source

        source_names, target_names = _classes(self.source), _classes(self.target)
        if None not in (source_names, target_names) and list(source_names) != list(target_names):
            raise ConfigError(
                "data.few_shot trains on target labels, but the target set's classes are not "
                "the source set's, under whose names the metrics are reported: target "
                f"{list(target_names)}, source {list(source_names)}"
            )
        length = len(self.source) if self.few_shot_with_source else None
        try:
            few = FewShot(self.target, self.few_shot, self.few_shot_seed, length=length)
        except (TypeError, ValueError) as err:
            raise type(err)(f"data.few_shot: {err}") from None
        return ConcatDataset([self.source, few]) if self.few_shot_with_source else few

    def setup(self, stage: str) -> None:
        """Refuse ``few_shot`` for a module that trains on both domains (GAM), before any of
        its training starts: its "source" batches would be target images."""
        if stage != "fit" or self.few_shot is None:
            return
        module = self._fed_module()
        if module is not None and "target" in module.train_domains:
            raise ConfigError(
                f"data.few_shot fine-tunes a SourceModule on {self.few_shot} labelled target "
                f"images; {type(module).__name__} trains on the source and target domains and "
                "would take those images for its source domain. Use a *_source.yaml config "
                "with configs/few_shot.yaml, or remove data.few_shot"
            )

    def _fed_module(self) -> FedModule | None:
        """The trainer's LightningModule (None without one), refused if it does not declare
        ``FedModule``'s attributes: a module this data module cannot tell what to serve."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            return None
        missing = [name for name in FedModule.__annotations__ if not hasattr(module, name)]
        if missing:
            raise ConfigError(
                f"{type(module).__name__} does not say {' or '.join(missing)}, which "
                f"{type(self).__name__} reads to build its training loaders: derive it from "
                "dam_lightning.modules.base.EvaluatingModule, or define them (see "
                "dam_lightning.data.datamodule.FedModule)"
            )
        return module

    def _check_datasets(self) -> None:
        for role in ("source", "target", "target_val", "source_val", "target_test"):
            dataset = getattr(self, role)
            if dataset is not None and len(dataset) == 0:
                raise ConfigError(f"the {role} dataset ({dataset!r}) is empty")
        counts = {r: _num_classes(getattr(self, r)) for r in ("source", "target", "target_val")}
        if len({c for c in counts.values() if c is not None}) > 1:
            raise ConfigError(f"the datasets disagree on the number of classes: {counts}")

    @property
    def task(self) -> str:
        """``"classification"`` or ``"segmentation"``: the source dataset's ``info.task``
        (default classification). The CLI links it to the module's ``task``."""
        info = dataset_info(self.source, None)
        return "classification" if info is None else info.task

    @property
    def class_names(self) -> list[str] | None:
        """The source dataset's ``info.classes`` (class names in index order), if it has them."""
        names = _classes(self.source)
        return None if names is None else list(names)

    @property
    def class_subsets(self) -> dict[str, list[str]] | None:
        """Named class subsets scored by their own mIoU (SYNTHIA: 16 and 13 classes)."""
        info = dataset_info(self.source, None)
        subsets = None if info is None else info.class_subsets
        return {k: list(v) for k, v in subsets.items()} if subsets else None

    @property
    def num_classes(self) -> int:
        """Number of classes, read from the source dataset's ``info.num_classes``."""
        n = _num_classes(self.source)
        if n is None:
            raise ConfigError(
                f"the source dataset {self.source!r} declares no info (a DatasetInfo class "
                "attribute, dam_lightning.data.labels); set model.init_args.num_classes explicitly"
            )
        return n

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Segmentation labels travel as uint8 (an eighth of int64's bytes: 0.5 MiB at
        512x1024) and become int64 here, on the device, for the losses, the metrics and every
        hook that sees the batch (the tasks also take uint8 labels from plain loaders)."""
        return apply_to_collection(batch, torch.Tensor, _widen_labels)

    @property
    def num_workers(self) -> int:
        """DataLoader workers: the ``num_workers`` setting, or derived from the CPUs per device
        (``workers_per_device``) once a trainer is attached."""
        if self.workers_setting is not None:
            return self.workers_setting
        trainer = self.trainer
        if trainer is None or not isinstance(trainer.accelerator, CUDAAccelerator):
            return 0
        return workers_per_device(len(os.sched_getaffinity(0)), trainer.num_devices)

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches on a GPU: their copy to the device does not block the host."""
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle_seed: int | None,
    ) -> DataLoader:
        if shuffle_seed is not None:  # each DDP rank its share; mid-epoch resume
            sampler = EpochShuffleSampler(len(dataset), shuffle_seed)
            if self._resume is not None:
                sampler.resume_at(*self._resume, batch_size)
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
            drop_last=shuffle_seed is not None and len(sampler) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def source_dataloader(self, labelled: bool = True) -> DataLoader:
        """Shuffled labelled batches of ``labelled_train`` (the source set, or the few-shot
        target images); with ``labelled=False`` the images alone (labels never decoded)."""
        dataset = self.labelled_train if labelled else Unlabelled(self.labelled_train)
        return self._loader(dataset, self.batch_sizes["source"], self.seed)

    def target_dataloader(self) -> DataLoader:
        """Shuffled unlabelled target batches (inputs only)."""
        return self._loader(Unlabelled(self.target), self.batch_sizes["target"], self.seed + 1)

    def state_dict(self) -> dict:
        """Where the training epoch stands, saved by Lightning in every checkpoint: a run
        resumed from a checkpoint written in the middle of an epoch (``every_n_train_steps``)
        starts its training loaders after the batches that epoch already trained on, so it sees
        exactly the batches the uninterrupted run sees. (Lightning itself cannot fast-forward a
        plain DataLoader; ``batch_progress`` is its loop's count of this epoch's batches.)"""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = (state_dict["epoch"], state_dict["batches"]) if state_dict else None
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; these loaders do.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")

    def train_dataloader(self) -> dict[str, DataLoader]:
        module = self._fed_module()
        domains = DOMAINS if module is None else module.train_domains
        labelled = module is None or module.uses_source_labels
        loaders = {
            "source": lambda: self.source_dataloader(labelled),
            "target": self.target_dataloader,
        }
        return {domain: loaders[domain]() for domain in domains}

    def val_dataloader(self) -> list[DataLoader]:
        sets = [self.target_val] + ([self.source_val] if self.source_val is not None else [])
        return [self._loader(d, self.batch_sizes["eval"], None) for d in sets]

    def test_dataloader(self) -> list[DataLoader]:
        sets = [self.target_test] + ([self.source_val] if self.source_val is not None else [])
        return [self._loader(d, self.batch_sizes["eval"], None) for d in sets]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.target_test, self.batch_sizes["eval"], None)

    def calibration_loader(
        self, domain: str, num_batches: int, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        """Input batches for Gaussian matching: a fixed random subset of the training images,
        through a DataLoader (decoded in workers) with the evaluation transforms.

        The subset depends only on ``seed`` (the same at every epoch, so statistics are
        comparable and a resumed run matches); a dataset with an ``eval_view()`` (the
        segmentation datasets) is read without its random training augmentation, so the
        batches are the same at every epoch too. Under DDP each rank takes its own batches.
        """
        dataset = {"source": self.source, "target": self.target}[domain]
        view = dataset.eval_view() if hasattr(dataset, "eval_view") else dataset
        batch_size = self.batch_sizes[domain]
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        indices = [
            i
            for b in range(rank, num_batches * world_size, world_size)
            for i in order[b * batch_size : (b + 1) * batch_size].tolist()
        ]
        if not indices:
            raise ConfigError(
                f"no {domain} calibration batch for rank {rank}: the {domain} set has "
                f"{len(dataset)} images, fewer than world_size x batch size"
            )
        return DataLoader(
            Unlabelled(Subset(view, indices)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def calibration_batches(
        self, domain: str, num_batches: int, rank: int = 0, world_size: int = 1
    ) -> list[torch.Tensor]:
        """The batches of ``calibration_loader``, as a list of CPU tensors."""
        return list(self.calibration_loader(domain, num_batches, rank, world_size))


def _widen_labels(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.long() if tensor.dtype == torch.uint8 else tensor


def workers_per_device(cpus: int, devices: int) -> int:
    """DataLoader workers per training process on a GPU host: its share of ``cpus`` less one
    for the process itself, at least 1, at most 8 (beyond that a loader rarely gains).

    Example:
        >>> workers_per_device(16, 1), workers_per_device(16, 2), workers_per_device(2, 4)
        (8, 7, 1)
    """
    return max(1, min(8, cpus // max(1, devices) - 1))


def _check_sizes(batch_size, target_batch_size, eval_batch_size, num_workers) -> None:
    """Refuse impossible loader settings at construction, before any run starts."""
    sizes = {"batch_size": batch_size, "target_batch_size": target_batch_size,
             "eval_batch_size": eval_batch_size}  # fmt: skip
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"data.{name} must be a positive number of images, got {value}")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")


def _num_classes(dataset: Dataset | None) -> int | None:
    info = dataset_info(dataset, None)
    return None if info is None else info.num_classes


def _classes(dataset: Dataset | None) -> tuple[str, ...] | None:
    info = dataset_info(dataset, None)
    return None if info is None else info.classes
