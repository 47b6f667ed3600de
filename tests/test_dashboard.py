"""The W&B dashboard of an adaptation: per-layer curves side by side, and ValidationDashboard's
masks, per-class table and confusion picture, read back from an offline run's own files."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn

from dam_lightning.callbacks import ValidationDashboard
from dam_lightning.callbacks.dashboard import confusion_figure, per_class_table, row_normalised
from dam_lightning.callbacks.predictions import default_palette
from dam_lightning.data.labels import CITYSCAPES_CLASSES, CITYSCAPES_ID_TO_TRAIN_ID
from dam_lightning.modules.task import make_task

from .conftest import quiet_trainer
from .segmentation_fixtures import write_cityscapes
from .toy_segmentation import CLASSES, Scenes, TinySegNet

PER_LAYER = ("acc_d", "loss_d", "loss_g", "mean_gap", "std_gap")


# ---- reading an offline W&B run back -------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a ``run-*.wandb`` file: W&B's LevelDB-style log (a 7-byte file
    header, 32 KiB blocks of chunks, each ``crc32 (4) | length (2) | type (1) | data``; type 1
    is a whole record, 2/3/4 its first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pieces = path.read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pieces.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(b"".join(pieces))
            pieces = []


def finished_offline_run(wandb_dir: Path) -> Path:
    """End the W&B run and wait until its offline files are whole; returns the run's folder.

    ``wandb.finish()`` only tells the W&B service (a process of its own) that the run ended; the
    service writes the last block of the run's transaction log (up to 32 KiB: the last rows) when
    it closes the run's stream, a moment later. Read at once on a busy machine, the file lacked
    its last rows (measured: right after ``finish`` the file held only its 7-byte header, 2 s
    later all of it). ``wandb.teardown()`` returns once the service process has exited, every
    file closed; the next ``wandb.init`` starts a new one."""
    import wandb

    wandb.finish()
    wandb.teardown()
    (run,) = (wandb_dir / "wandb").glob("offline-run-*")
    return run


def wandb_history(run: Path) -> list[dict]:
    """Every ``log`` call of the run, as ``{key: value}`` with media as their JSON dicts."""
    (log,) = run.glob("run-*.wandb")
    rows = []
    for record in wandb_records(log):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            *parents, leaf = list(item.nested_key) or [item.key]
            node = row
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = json.loads(item.value_json)
        rows.append(row)
    return rows


def mask_class_labels(run: Path) -> dict[str, dict[str, str]]:
    """``{mask key: {id: class name}}`` from the run's config, where W&B keeps mask labels."""
    (log,) = run.glob("run-*.wandb")
    labels = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                if item.key == "_wandb":
                    masks = json.loads(item.value_json).get("mask/class_labels", {})
                    labels.update({key: entry["value"] for key, entry in masks.items()})
    return labels


# ---- (a) a short offline W&B run on Cityscapes fixtures ------------------------------------------


class TinyEncoderNet(nn.Module):
    """A convolution block and a 1x1 classifier, with a dotted layer name (``encoder.2``) as
    ERFNet's, logits at half the input's size."""

    example_input_shape = (3, 32, 64)

    def __init__(self, num_classes: int):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2)
        )
        self.output = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.output(self.encoder(x))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode (CI sets it disabled), its files under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_an_offline_wandb_run_holds_layer_curves_masks_iou_table_and_confusion(offline_wandb):
    from lightning.pytorch.loggers import WandbLogger

    from dam_lightning.data import Cityscapes, DomainAdaptationDataModule, SegmentationTransform
    from dam_lightning.modules import GAMAdaptModule

    root = offline_wandb / "cityscapes"
    write_cityscapes(root, "train", per_city=2, size=(32, 64))
    val = write_cityscapes(root, "val", per_city=1, size=(64, 128), seed=1)  # labels at 2x
    small = SegmentationTransform(size=(32, 64))
    data = DomainAdaptationDataModule(
        Cityscapes(root, "train", small),
        Cityscapes(root, "train", small, labelled=False),
        target_val=Cityscapes(root, "val", small),  # labels at their native size
        batch_size=2,
    )
    module = GAMAdaptModule(
        TinyEncoderNet, num_classes=19, task="segmentation", class_names=CITYSCAPES_CLASSES,
        layers={"encoder.2": 1.0, "output": 1.0}, gan_loss="lsgan", discriminator_width=8,
        source_steps=2,
    )  # fmt: skip
    logger = WandbLogger(project="dam-lightning-test", save_dir=str(offline_wandb), offline=True)
    trainer = quiet_trainer(
        # epoch 0: stage 1 (2 source batches), then 2 epochs of adaptation
        max_epochs=3, logger=logger, log_every_n_steps=1, limit_val_batches=None,
        default_root_dir=offline_wandb, callbacks=[ValidationDashboard(num_images=2)],
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=data)
    finally:
        run = finished_offline_run(offline_wandb)  # no W&B run left open for other tests
    history = wandb_history(run)

    # per-layer discriminator accuracy, losses and activation gap, under one prefix per layer
    training = [row for row in history if "train/drift" in row]
    assert len(training) == 4  # 2 epochs of 2 batches
    for layer in ("encoder.2", "output"):
        for metric in PER_LAYER:
            values = [row[f"layer/{layer}/{metric}"] for row in training]
            assert all(math.isfinite(v) for v in values), (layer, metric)
        assert all(0 <= row[f"layer/{layer}/acc_d"] <= 1 for row in training)
        assert all(row[f"layer/{layer}/mean_gap"] > 0 for row in training)
    assert not any(
        key.startswith(("train/acc_d", "train/loss_d")) for row in history for key in row
    )

    # three validations (F_s after stage 1, F_t after each adaptation epoch), each with its
    # metrics and its dashboard at the same trainer step
    scores = [row for row in history if "val/target/miou" in row]
    boards = [row for row in history if "val/target/per_class" in row]
    assert len(scores) == len(boards) == 3
    for score, board in zip(scores, boards, strict=True):
        assert board["trainer/global_step"] == score["trainer/global_step"]
        table = json.loads((run / "files" / board["val/target/per_class"]["path"]).read_text())
        assert table["columns"] == ["class", "iou", "accuracy", "pixel_share"]
        assert [row[0] for row in table["data"]] == list(CITYSCAPES_CLASSES)
        for name, iou, _, _ in table["data"]:  # the table's IoU is the logged metric's
            logged = score[f"val/target/iou/{name}"]
            assert (iou is None) if math.isnan(logged) else iou == pytest.approx(logged, abs=1e-6)
        assert sum(row[3] for row in table["data"]) == pytest.approx(1.0, abs=1e-4)
        picture = Image.open(run / "files" / board["val/target/confusion_matrix"]["path"])
        assert min(picture.size) > 300  # a readable picture, not a thumbnail

    # the masks: the first target val images, the same at each validation, at the input size
    masks = [board["val/target/masks"] for board in boards]
    assert [m["count"] for m in masks] == [2, 2, 2]
    assert masks[0]["captions"] == masks[1]["captions"] == masks[2]["captions"] == val.names
    for index, name in enumerate(val.names):
        truth_file = masks[1]["all_masks"][index]["ground_truth"]["path"]
        truth = np.asarray(Image.open(run / "files" / truth_file))
        native = torch.from_numpy(val.labels[name][1::2, 1::2])  # nearest, at pixel centres
        assert np.array_equal(truth, CITYSCAPES_ID_TO_TRAIN_ID[native].numpy())
        prediction_file = masks[1]["all_masks"][index]["prediction"]["path"]
        predicted = np.asarray(Image.open(run / "files" / prediction_file))
        assert predicted.shape == (32, 64) and predicted.max() < 19
        shown = np.asarray(Image.open(run / "files" / masks[0]["filenames"][index]).convert("RGB"))
        resized = Image.fromarray(val.images[name]).resize((64, 32), Image.Resampling.BILINEAR)
        difference = np.abs(shown.astype(int) - np.asarray(resized).astype(int))
        assert difference.mean() < 2  # the dataset's normalisation undone for display
    labels = mask_class_labels(run)
    (truth_key,) = [key for key in labels if key.endswith("ground_truth")]
    assert labels[truth_key]["255"] == "ignore" and labels[truth_key]["0"] == "road"
    (prediction_key,) = [key for key in labels if key.endswith("prediction")]
    assert list(labels[prediction_key].values()) == list(CITYSCAPES_CLASSES)


# ---- (b) the picture and the table against a hand-built confusion matrix -------------------------


def test_confusion_picture_and_table_agree_with_a_hand_built_confusion_matrix():
    task = make_task("segmentation", 3, CLASSES)
    metrics = task.metrics()
    labels = torch.tensor([[[0, 0, 0, 1], [1, 1, 255, 255]]])
    predicted = torch.tensor([[[0, 0, 1, 1], [2, 1, 0, 2]]])
    metrics.update(predicted, labels)
    metrics.compute()
    metrics.reset()  # the matrix a dashboard reads outlives the reset after logging
    # rows = label: road 2 right, 1 as car; car 2 right, 1 as sky; sky never labelled
    hand = torch.tensor([[2, 1, 0], [0, 2, 1], [0, 0, 0]])
    assert torch.equal(task.confusion_matrix(metrics), hand)

    figure = confusion_figure(hand, CLASSES)
    shown = np.ma.filled(figure.axes[0].images[0].get_array(), np.nan)
    expected = [[2 / 3, 1 / 3, 0], [0, 2 / 3, 1 / 3], [math.nan] * 3]
    np.testing.assert_allclose(shown, expected)
    assert torch.allclose(row_normalised(hand), torch.tensor(expected, dtype=torch.float64),
                          equal_nan=True)  # fmt: skip
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in axes.get_yticklabels()] == CLASSES
    assert {t.get_text() for t in axes.texts} == {"67", "33", "0"}

    columns, rows = per_class_table(hand, CLASSES, "segmentation")
    assert columns == ["class", "iou", "accuracy", "pixel_share"]
    # IoU = TP / (TP + FP + FN): road 2/3, car 2/4, sky 0/1 (predicted once, never labelled)
    assert rows == [
        ["road", pytest.approx(2 / 3), pytest.approx(2 / 3), 0.5],
        ["car", 0.5, pytest.approx(2 / 3), 0.5],
        ["sky", 0.0, None, 0.0],
    ]


def test_classification_has_its_confusion_matrix_and_a_per_class_accuracy_table():
    task = make_task("classification", 3)
    metrics = task.metrics()
    metrics.update(torch.eye(3)[[0, 0, 1, 2, 2]], torch.tensor([0, 1, 1, 1, 2]))
    result = metrics.compute()
    hand = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 1]])
    assert torch.equal(task.confusion_matrix(metrics), hand)
    assert result["worst_class_acc"].item() == pytest.approx(1 / 3)  # as before: class 1
    columns, rows = per_class_table(hand, task.class_names, "classification")
    assert columns == ["class", "accuracy", "image_share"]
    assert rows == [["0", 1.0, 0.2], ["1", pytest.approx(1 / 3), 0.6], ["2", 1.0, 0.2]]


# ---- (c) loggers that cannot show pictures, or only some ----------------------------------------


def test_every_n_validations_counts_validation_runs_but_not_sanity_checks():
    dashboard = ValidationDashboard(every_n_validations=2)
    runs = [SimpleNamespace(sanity_checking=flag) for flag in (True, False, False, False, False)]
    assert [dashboard._due(trainer) for trainer in runs] == [False, True, False, True, False]
    assert dashboard.state_dict() == {"validations": 4}


class RecordingTensorBoard(TensorBoardLogger):
    """A TensorBoardLogger whose writer only records ``add_image`` (needs no tensorboard)."""

    def __init__(self):  # no SummaryWriter, so no tensorboard install
        self.images: dict[str, tuple[np.ndarray, int, str]] = {}

    @property
    def experiment(self):
        return self

    def add_image(self, tag, image, step, dataformats):
        self.images[tag] = (image, step, dataformats)


def test_a_csv_logged_run_with_the_dashboard_keeps_its_metrics_and_tensorboard_gets_pictures(
    tmp_path,
):
    from lightning.pytorch.loggers import CSVLogger

    from dam_lightning.callbacks.dashboard import publish
    from dam_lightning.data.datamodule import DomainAdaptationDataModule
    from dam_lightning.modules import GAMAdaptModule

    module = GAMAdaptModule(
        TinySegNet, num_classes=3, task="segmentation", class_names=CLASSES,
        layers={"conv": 1.0, "pool": 1.0}, gan_loss="lsgan", discriminator_width=8,
        source_steps=2,
    )  # fmt: skip
    data = DomainAdaptationDataModule(Scenes(8, 8), Scenes(6, 8, seed=1, shift=0.5), batch_size=4)
    logger = CSVLogger(tmp_path, name="csv")
    dashboard = ValidationDashboard(num_images=2)
    trainer = quiet_trainer(
        max_epochs=2, logger=logger, log_every_n_steps=1, limit_val_batches=None,
        default_root_dir=tmp_path, callbacks=[dashboard],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert dashboard.validations == 2
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        header = next(csv.reader(file))
    assert {"layer/conv/acc_d", "layer/pool/mean_gap", "val/target/miou"} <= set(header)
    assert not any("confusion" in key or "per_class" in key for key in header)

    # TensorBoard gets the confusion picture and one strip per image: image | prediction | labels
    confmat = module.task.confusion_matrix(module.val_metrics["target"])
    tensorboard = RecordingTensorBoard()
    publish(tensorboard, dashboard.build(trainer, module, confmat), step=7)
    assert set(tensorboard.images) == {
        "val/target/confusion_matrix", "val/target/masks/0", "val/target/masks/1"
    }  # fmt: skip
    picture, step, layout = tensorboard.images["val/target/confusion_matrix"]
    assert (step, layout, picture.dtype, picture.shape[2]) == (7, "HWC", np.uint8, 3)
    strip = tensorboard.images["val/target/masks/0"][0]
    assert strip.shape == (8, 3 * 8, 3)
    image, labels = data.target_val[0]
    truth_colours = strip[:, 16:]
    palette = np.array(default_palette(3), dtype=np.uint8)
    labelled = labels != 255
    assert np.array_equal(truth_colours[labelled.numpy()], palette[labels[labelled].numpy()])


# ---- (d) diagnose's figures in an offline W&B run ----------------------------------------------


def test_diagnose_logs_its_figures_to_an_offline_wandb_run(offline_wandb):
    from lightning.pytorch.loggers import WandbLogger

    from dam_lightning.data import DomainAdaptationDataModule, SynDigits
    from dam_lightning.models import LeNet
    from dam_lightning.modules import SourceModule
    from dam_lightning.trainer import DamTrainer

    torch.manual_seed(0)
    weights = offline_wandb / "source.pt"
    torch.save(LeNet(10).state_dict(), weights)
    data = DomainAdaptationDataModule(SynDigits(64, seed=0), SynDigits(64, seed=1), batch_size=16)
    logger = WandbLogger(project="dam-lightning-test", save_dir=str(offline_wandb), offline=True)
    trainer = DamTrainer(accelerator="cpu", logger=logger, enable_progress_bar=False,
                         default_root_dir=str(offline_wandb))  # fmt: skip
    try:
        trainer.diagnose(SourceModule(LeNet), data, ckpt_path=str(weights), calibration_batches=2)
    finally:
        run = finished_offline_run(offline_wandb)
    logged = {key: value for row in wandb_history(run) for key, value in row.items()}
    for figure in ("gap_by_layer", "histograms"):
        picture = Image.open(run / "files" / logged[f"diagnose/{figure}"]["path"])
        assert min(picture.size) > 200, figure
