"""SegmentationTask and the modules' one evaluation path on a tiny segmentation network."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dam_lightning.data.datamodule import DomainAdaptationDataModule, Unlabelled
from dam_lightning.modules import SourceModule
from dam_lightning.modules.task import SegmentationTask, make_task

from .conftest import quiet_trainer
from .toy_segmentation import CLASSES, Scenes, TinySegNet


def test_loss_ignores_255_and_upsamples_logits_to_the_label_size():
    task = SegmentationTask(3, CLASSES)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 8, 8), 255)
    labels[:, :4, :4] = 1
    loss = task.loss(logits, labels)
    up = nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    expected = nn.functional.cross_entropy(up[:, :, :4, :4], labels[:, :4, :4])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None


def test_class_weights_weigh_the_loss():
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 0] = 1.0
    labels = torch.tensor([[[0, 1], [1, 1]]])
    plain = SegmentationTask(3).loss(logits, labels)
    weighted = SegmentationTask(3, class_weights=[0.0, 1.0, 1.0]).loss(logits, labels)
    assert weighted > plain  # the one well-predicted pixel no longer counts


def test_labels_outside_the_classes_are_refused_but_255_is_ignored():
    task = SegmentationTask(3)
    task.check_labels(torch.tensor([0, 2, 255]), "here")
    with pytest.raises(ValueError, match=r"here: label 7 is outside 0..2 or 255 \(ignored\)"):
        task.check_labels(torch.tensor([0, 7]), "here")
    with pytest.raises(ValueError, match="label 255 is outside 0..2"):
        make_task("classification", 3).check_labels(torch.tensor([255]), "x")


def test_evaluate_scores_at_the_label_resolution_against_a_hand_built_confusion_matrix():
    task = SegmentationTask(3, CLASSES)
    net = TinySegNet()
    data = Scenes()
    result = task.evaluate(net, DataLoader(data, batch_size=3), torch.device("cpu"))
    with torch.no_grad():
        logits = nn.functional.interpolate(net(data.images), size=(8, 8), mode="bilinear")
    predicted, labels = logits.argmax(1).flatten(), data.labels.flatten()
    keep = labels != 255
    confusion = torch.zeros(3, 3)
    for y, p in zip(labels[keep].tolist(), predicted[keep].tolist(), strict=True):
        confusion[y, p] += 1
    tp = confusion.diag()
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)
    assert result["pixel_acc"] == pytest.approx((tp.sum() / confusion.sum()).item(), rel=1e-6)
    assert result["miou"] == pytest.approx(iou.mean().item(), rel=1e-6)
    assert result["iou/car"] == pytest.approx(iou[1].item(), rel=1e-6)


def test_the_data_module_names_the_task_and_classes_through_wrappers():
    subset = torch.utils.data.Subset(Scenes(), range(4))
    dm = DomainAdaptationDataModule(subset, Scenes(seed=1), batch_size=2)
    assert (dm.task, dm.class_names, dm.num_classes) == ("segmentation", CLASSES, 3)
    assert dm.class_subsets is None


def test_unlabelled_accepts_images_tuples_and_lists_and_refuses_the_rest():
    class Items(Dataset):
        def __init__(self, item):
            self.item = item

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return self.item

    image = torch.ones(3, 2, 2)
    for item in (image, (image, 1), [image, torch.tensor(1)]):
        assert torch.equal(Unlabelled(Items(item))[0], image)
    with pytest.raises(TypeError, match=r"returned a dict item.*image tensor or an \(image, label"):
        Unlabelled(Items({"image": image}))[0]


def test_calibration_batches_use_the_evaluation_view_of_the_dataset():
    class Augmented(Scenes):
        augment = True

        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x + torch.rand(1) if self.augment else x), y

        def eval_view(self):
            view = Augmented()
            view.augment = False
            return view

    dm = DomainAdaptationDataModule(Augmented(), Augmented(), batch_size=2)
    first = dm.calibration_batches("source", 2)
    again = dm.calibration_batches("target", 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_source_module_validates_segmentation_with_miou_and_per_class_iou():
    module = SourceModule(TinySegNet, num_classes=3, task="segmentation", class_names=CLASSES)
    dm = DomainAdaptationDataModule(Scenes(), Scenes(seed=1), source_val=Scenes(seed=2),
                                    batch_size=4)  # fmt: skip
    trainer = quiet_trainer(max_steps=4, limit_val_batches=None)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("val/target/miou", "val/target/pixel_acc", "val/target/class_acc",
                "val/target/iou/sky", "val/source/miou", "miou"):  # fmt: skip
        assert key in metrics, key
    expected = module.task.evaluate(module.net, dm.val_dataloader()[0], torch.device("cpu"))
    assert metrics["val/target/miou"].item() == pytest.approx(expected["miou"], rel=1e-6)


def test_results_are_written_readable_and_run_files_never_share_a_name(tmp_path):
    import os
    import stat
    from concurrent.futures import ThreadPoolExecutor

    from dam_lightning.runs import atomic_write_text, unused_path

    atomic_write_text(str(tmp_path / "summary.json"), "{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH  # not mkstemp's 0o600
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: unused_path(str(tmp_path / "config.yaml")), range(16)))
    assert len(set(names)) == 16


def test_source_module_trains_in_bf16_mixed_precision_with_finite_loss_and_metrics():
    import math

    module = SourceModule(TinySegNet, num_classes=3, task="segmentation", class_names=CLASSES)
    dm = DomainAdaptationDataModule(Scenes(), Scenes(seed=1), batch_size=4)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=None, precision="bf16-mixed")
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert math.isfinite(trainer.callback_metrics["val/target/pixel_acc"].item())
