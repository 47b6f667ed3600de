"""PredictionWriter through a real ``Trainer.predict``: a fake module returning fixed predictions
in the ``predict_step`` contract; tiny datasets with and without names, images, palettes, ids."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dam_lightning.callbacks import PredictionWriter
from dam_lightning.data.labels import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_INFO,
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
)

H, W = 8, 16  # prediction size


class FixedPredictions(L.LightningModule):
    """Returns ``table[index]`` for each item, in the contract
    ``{"prediction", "confidence", "label"}``; the batch is ``(image, index)``."""

    def __init__(self, table: torch.Tensor, labels: torch.Tensor | None = None):
        super().__init__()
        self.table, self.labels = table, labels

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        _, index = batch
        prediction = self.table[index]
        return {
            "prediction": prediction,
            "confidence": torch.full(prediction.shape, 0.75) - 0.25 * (prediction % 2),
            "label": None if self.labels is None else self.labels[index],
        }


class TinyCityscapes(Dataset):
    """Cityscapes-like items ``(image, index)`` with names in city folders and RGB images on disk
    of ``image_size`` (W, H)."""

    info = CITYSCAPES_INFO

    def __init__(self, root: Path, count: int, image_size: tuple[int, int] = (W, H)):
        self.root, self.count = root, count
        rng = np.random.default_rng(0)
        for index in range(count):
            path = self.image_path(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return torch.zeros(3, H, W), index

    def city(self, index: int) -> str:
        return "frankfurt" if index % 2 == 0 else "lindau"

    def item_name(self, index: int) -> str:
        return f"{self.city(index)}/{self.city(index)}_000000_{index:06d}"

    def image_path(self, index: int) -> Path:
        name = f"{self.item_name(index)}_leftImg8bit.png"
        return self.root / "leftImg8bit" / "test" / name


def seg_table(count: int) -> torch.Tensor:
    """Per item a distinct (H, W) trainId map covering all 19 classes and an ignored pixel."""
    base = torch.arange(H * W).reshape(H, W) % 19
    table = torch.stack([(base + 3 * i) % 19 for i in range(count)])
    table[:, 0, 0] = IGNORE_INDEX
    return table


def predict(module, dataset, writer, batch_size: int = 2, **trainer_kwargs) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
        **trainer_kwargs,
    )
    trainer.predict(module, DataLoader(dataset, batch_size=batch_size), return_predictions=False)


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def hidden_files(folder: Path) -> list[Path]:
    return list(folder.rglob(".*"))


def test_segmentation_writes_label_ids_colours_and_overlays(tmp_path, capsys):
    dataset = TinyCityscapes(tmp_path / "data", count=4)
    subset = Subset(dataset, [3, 1, 2])  # names must follow the dataset's own indices
    table = seg_table(4)
    out = tmp_path / "out"
    predict(FixedPredictions(table), subset, PredictionWriter(str(out), overlay_alpha=0.5))

    for index in (3, 1, 2):
        name = dataset.item_name(index)
        with Image.open(out / "labelIds" / f"{name}.png") as png:
            assert png.mode == "L" and png.size == (W, H)
            label_ids = torch.from_numpy(np.array(png)).long()
        assert torch.equal(CITYSCAPES_ID_TO_TRAIN_ID[label_ids], table[index]), name
        assert label_ids[0, 0] == 0  # ignored -> void

        colour = read(out / "colour" / f"{name}.png")
        expected = np.array(CITYSCAPES_PALETTE + ((0, 0, 0),) * 237, dtype=np.uint8)
        assert np.array_equal(colour, expected[table[index].numpy()])

        overlay = read(out / "overlay" / f"{name}.png").astype(int)
        image = read(dataset.image_path(index)).astype(int)
        assert overlay.shape == (H, W, 3)
        assert np.array_equal(overlay[0, 0], image[0, 0])  # ignored pixel: the image only
        blended = np.rint(0.5 * image[1:] + 0.5 * colour[1:].astype(int))
        assert np.abs(overlay[1:] - blended).max() <= 1

    assert not (out / "labelIds" / f"{dataset.item_name(0)}.png").exists()  # not in the subset
    assert not (out / "trainIds").exists() and not hidden_files(out)
    printed = capsys.readouterr().out
    assert f"Predictions: 3 images -> {out} (labelIds/, colour/, overlay/)" in printed


def test_predictions_are_resized_to_the_native_image_size_with_nearest(tmp_path):
    dataset = TinyCityscapes(tmp_path / "data", count=1, image_size=(2 * W, 2 * H))
    table = seg_table(1)
    predict(FixedPredictions(table), dataset, PredictionWriter(str(tmp_path / "out")))

    name = dataset.item_name(0)
    label_ids = torch.from_numpy(read(tmp_path / "out" / "labelIds" / f"{name}.png")).long()
    upsampled = table[0].repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)
    assert torch.equal(CITYSCAPES_ID_TO_TRAIN_ID[label_ids], upsampled)
    assert read(tmp_path / "out" / "colour" / f"{name}.png").shape == (2 * H, 2 * W, 3)
    assert read(tmp_path / "out" / "overlay" / f"{name}.png").shape == (2 * H, 2 * W, 3)


def test_plain_dataset_gets_train_ids_default_names_and_the_run_folder(tmp_path, capsys):
    table = seg_table(3)
    dataset = TensorDataset(torch.zeros(3, 3, H, W), torch.arange(3))
    predict(FixedPredictions(table), dataset, PredictionWriter(), default_root_dir=str(tmp_path))

    out = tmp_path / "predictions"
    assert sorted(p.name for p in (out / "trainIds").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
    assert np.array_equal(read(out / "trainIds" / "000002.png"), table[2].numpy())
    assert tuple(read(out / "colour" / "000002.png")[0, 1]) == CITYSCAPES_PALETTE[table[2, 0, 1]]
    assert not (out / "overlay").exists() and not (out / "labelIds").exists()
    assert f"Predictions: 3 images -> {out} (trainIds/, colour/)" in capsys.readouterr().out


@pytest.mark.parametrize("with_labels", [True, False])
def test_classification_writes_one_csv_in_batch_order(tmp_path, capsys, with_labels):
    table = torch.tensor([4, 7, 1, 0, 9])
    labels = torch.tensor([4, 2, 1, 0, 9]) if with_labels else None
    dataset = TensorDataset(torch.zeros(5, 1, 4, 4), torch.arange(5))
    out = tmp_path / "out"
    predict(FixedPredictions(table, labels), dataset, PredictionWriter(str(out)), batch_size=2)

    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "index,prediction,confidence,label"
    expected_label = ["4", "2", "1", "0", "9"] if with_labels else [""] * 5
    confidence = ["0.750000", "0.500000", "0.500000", "0.750000", "0.500000"]
    assert lines[1:] == [
        f"{i},{int(table[i])},{confidence[i]},{expected_label[i]}" for i in range(5)
    ]
    assert not hidden_files(out)
    assert f"Predictions: 5 images -> {out} (predictions.csv)" in capsys.readouterr().out


def test_ids_without_a_colour_are_refused(tmp_path):
    table = torch.full((1, H, W), 23)  # a 24th class with the 19-colour Cityscapes palette
    dataset = TensorDataset(torch.zeros(1, 3, H, W), torch.arange(1))
    with pytest.raises(ValueError, match="trainId 23, outside 0..18"):
        predict(FixedPredictions(table), dataset, PredictionWriter(str(tmp_path / "out")))
    assert not hidden_files(tmp_path)


def test_cityscapes_file_matching_finds_one_label_id_file_per_image(tmp_path):
    cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    dataset = TinyCityscapes(tmp_path / "data", count=2)
    out = tmp_path / "out"
    predict(FixedPredictions(seg_table(2)), dataset, PredictionWriter(str(out)))

    args = copy.copy(cs_eval.args)
    args.predictionPath, args.predictionWalk = str(out / "labelIds"), None
    for index in range(2):
        ground_truth = f"/gtFine/test/{dataset.item_name(index)}_gtFine_labelIds.png"
        found = cs_eval.getPrediction(args, ground_truth)
        assert Path(found) == out / "labelIds" / f"{dataset.item_name(index)}.png"


def test_under_ddp_each_rank_writes_its_own_csv_and_only_rank_zero_prints(tmp_path, capsys):
    dataset = TensorDataset(torch.zeros(4, 1, 4, 4), torch.arange(4))
    trainer = SimpleNamespace(  # what the writer reads from a rank-1 trainer of a 2-process run
        world_size=2,
        global_rank=1,
        is_global_zero=False,
        predict_dataloaders=[DataLoader(dataset)],
        strategy=SimpleNamespace(reduce=lambda count, reduce_op: 2 * count),
    )
    module = FixedPredictions(torch.tensor([3, 1, 4, 1]))
    writer = PredictionWriter(str(tmp_path))
    writer.on_predict_start(trainer, module)
    batch = (torch.zeros(2, 1, 4, 4), torch.tensor([1, 3]))
    outputs = module.predict_step(batch, 0)
    writer.write_on_batch_end(trainer, module, outputs, [1, 3], batch, 0, 0)
    writer.on_predict_end(trainer, module)

    lines = (tmp_path / "predictions-rank1.csv").read_text().splitlines()
    assert lines == ["index,prediction,confidence,label", "1,1,0.500000,", "3,1,0.500000,"]
    assert not (tmp_path / "predictions.csv").exists()
    assert capsys.readouterr().out == ""
