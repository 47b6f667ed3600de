"""What the loader decodes and sends (issue 19): uint8 labels to the device, no label decoded
that training drops, workers and pinned memory from the hardware."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dam_lightning.data import GTA5, DomainAdaptationDataModule, SegmentationDataset
from dam_lightning.data.datamodule import Unlabelled
from dam_lightning.data.labels import CITYSCAPES_ID_TO_TRAIN_ID
from dam_lightning.data.transforms import SegmentationTransform
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule

from .conftest import quiet_trainer
from .segmentation_fixtures import write_gta5


@pytest.fixture
def gta5(tmp_path):
    written = write_gta5(tmp_path / "gta5")
    transform = SegmentationTransform(size=(16, 32), train_augment=True, crop_size=(8, 16))
    return GTA5(written.root, transform=transform)


def test_labels_are_uint8_train_ids_and_int64_on_the_device(gta5):
    eval_set = gta5.eval_view()
    image, label = eval_set[0]
    assert label.dtype == torch.uint8
    raw = eval_set.read_label(eval_set.labels[0])
    _, expected = eval_set.transform(eval_set.read_image(eval_set.images[0]), raw)
    assert torch.equal(label.long(), CITYSCAPES_ID_TO_TRAIN_ID[expected.long()])
    dm = DomainAdaptationDataModule(gta5, gta5, batch_size=2)
    batch = {"source": (image[None], label[None]), "target": image[None]}
    moved = dm.on_after_batch_transfer(batch, 0)
    assert moved["source"][1].dtype == torch.int64 and moved["target"].dtype == torch.float32
    assert torch.equal(moved["source"][1], label[None].long())


def test_dropped_labels_are_never_decoded_and_the_images_stay_the_same(gta5, monkeypatch):
    torch.manual_seed(3)
    expected = [gta5[i][0] for i in range(len(gta5))]  # the same augmentation draws below

    def refuse(self, path):
        raise AssertionError(f"{path} was decoded for nothing")

    monkeypatch.setattr(SegmentationDataset, "read_label", refuse)
    torch.manual_seed(3)
    images = Unlabelled(torch.utils.data.Subset(gta5, range(len(gta5))))
    assert all(torch.equal(images[i], expected[i]) for i in range(len(gta5)))
    dm = DomainAdaptationDataModule(gta5, gta5, batch_size=2)
    assert next(iter(dm.source_dataloader(labelled=False))).shape == (2, 3, 8, 16)
    assert next(iter(dm.target_dataloader())).shape == (2, 3, 8, 16)


def test_gam_reads_source_labels_only_while_it_trains_the_source_network():
    from_file = GAMAdaptModule(LeNet, num_classes=10, source_weights="source.ckpt")
    assert not from_file.uses_source_labels
    staged = GAMAdaptModule(LeNet, num_classes=10, source_steps=3)
    assert staged.uses_source_labels
    staged.source_ready.fill_(True)
    staged.load_state_dict(staged.state_dict())  # as a resume from an adapting checkpoint
    assert not staged.uses_source_labels


def test_cpu_runs_keep_workers_in_the_process_and_unpinned_memory(gta5):
    dm = DomainAdaptationDataModule(gta5, gta5, batch_size=2)
    dm.trainer = quiet_trainer()
    assert dm.num_workers == 0 and not dm.pin_memory
    loader = dm.source_dataloader()
    assert loader.num_workers == 0 and not loader.pin_memory
    assert DomainAdaptationDataModule(gta5, gta5, batch_size=2, num_workers=3).num_workers == 3


def test_the_label_lookup_matches_a_pixel_loop():
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    table = CITYSCAPES_ID_TO_TRAIN_ID.to(torch.uint8).numpy()
    looped = np.array([[int(CITYSCAPES_ID_TO_TRAIN_ID[v]) for v in row] for row in ids], np.uint8)
    assert np.array_equal(table[ids], looped)
