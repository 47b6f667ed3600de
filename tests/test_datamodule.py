"""DomainAdaptationDataModule: what each stage is served, and that target labels never train."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from dam_lightning.data import FewShot, LabelShift, Unlabelled, dataset_info
from dam_lightning.data.datamodule import DomainAdaptationDataModule, EpochShuffleSampler
from dam_lightning.data.labels import DatasetInfo
from dam_lightning.errors import ConfigError


class Labelled(TensorDataset):
    def __init__(self, n: int, num_classes: int = 10, offset: float = 0.0):
        super().__init__(
            torch.arange(n, dtype=torch.float32).view(n, 1) + offset, torch.arange(n) % num_classes
        )
        self.info = DatasetInfo("classification", num_classes)


def _with_module(dm: DomainAdaptationDataModule, module) -> DomainAdaptationDataModule:
    dm.trainer = SimpleNamespace(lightning_module=module, accelerator=None, num_devices=1)
    return dm


def test_gam_gets_both_domains_and_the_target_without_labels():
    dm = _with_module(
        DomainAdaptationDataModule(Labelled(40), Labelled(20, offset=1000), batch_size=8),
        SimpleNamespace(train_domains=("source", "target"), uses_source_labels=True),
    )
    loaders = dm.train_dataloader()
    assert set(loaders) == {"source", "target"}
    x_s, y_s = next(iter(loaders["source"]))
    x_t = next(iter(loaders["target"]))
    assert isinstance(x_t, torch.Tensor) and x_t.shape == (8, 1) and (x_t >= 1000).all()
    assert y_s.shape == (8,)


def test_source_module_gets_only_the_source():
    dm = _with_module(
        DomainAdaptationDataModule(Labelled(40), Labelled(20), batch_size=8),
        SimpleNamespace(train_domains=("source",), uses_source_labels=True),
    )
    assert set(dm.train_dataloader()) == {"source"}


def test_a_module_that_reads_no_source_labels_gets_source_images_alone():
    dm = _with_module(
        DomainAdaptationDataModule(Labelled(40), Labelled(20), batch_size=8),
        SimpleNamespace(train_domains=("source", "target"), uses_source_labels=False),
    )
    x_s = next(iter(dm.train_dataloader()["source"]))
    assert isinstance(x_s, torch.Tensor) and x_s.shape == (8, 1)


def test_a_module_that_does_not_declare_what_it_reads_is_refused_naming_the_seam():
    dm = _with_module(
        DomainAdaptationDataModule(Labelled(40), Labelled(20), batch_size=8),
        SimpleNamespace(train_domains=("source",)),
    )
    with pytest.raises(ConfigError, match="does not say uses_source_labels.*FedModule"):
        dm.train_dataloader()


def test_evaluation_defaults_to_the_target_training_images_and_adds_source_val():
    target = Labelled(20)
    dm = DomainAdaptationDataModule(Labelled(40), target, source_val=Labelled(10), batch_size=8)
    val = dm.val_dataloader()
    assert [loader.dataset for loader in val] == [target, dm.source_val]
    assert len(val[0].dataset) == 20  # no sample dropped in evaluation


def test_shuffle_is_a_function_of_seed_and_epoch_only():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(b) == first
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert sorted(first) == list(range(50))


def test_calibration_batches_are_fixed_and_disjoint_across_ranks():
    dm = DomainAdaptationDataModule(Labelled(100), Labelled(100), batch_size=10)
    rank0 = dm.calibration_batches("target", 3, rank=0, world_size=2)
    rank1 = dm.calibration_batches("target", 3, rank=1, world_size=2)
    assert len(rank0) == len(rank1) == 3
    seen0 = set(torch.cat(rank0).flatten().tolist())
    seen1 = set(torch.cat(rank1).flatten().tolist())
    assert not seen0 & seen1
    again = dm.calibration_batches("target", 3, rank=0, world_size=2)
    assert all(torch.equal(x, y) for x, y in zip(rank0, again, strict=True))


def test_inconsistent_or_empty_datasets_are_refused():
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        DomainAdaptationDataModule(Labelled(10, num_classes=10), Labelled(10, num_classes=5))
    with pytest.raises(ValueError, match="target dataset .* is empty"):
        DomainAdaptationDataModule(Labelled(10), Labelled(0))


def test_dataset_info_is_read_through_every_wrapper():
    base = Labelled(20, num_classes=10)
    wrapped = [
        Subset(base, range(5)),
        Unlabelled(base),
        LabelShift(base, drop="odd"),
        FewShot(base, 2),
        Unlabelled(Subset(LabelShift(base), range(3))),
    ]
    for dataset in wrapped:
        assert dataset_info(dataset) is base.info
    plain = TensorDataset(torch.zeros(2))
    with pytest.raises(ValueError, match="declares no dataset info"):
        dataset_info(plain)
    assert dataset_info(plain, None) is None
    dm = DomainAdaptationDataModule(plain, plain, batch_size=1)
    assert dm.task == "classification" and dm.class_names is None
    with pytest.raises(ValueError, match="declares no info"):
        _ = dm.num_classes
